"""The one `diffmix` entry point: a subcommand per stage.

This module declares the options and dispatches; the bodies live in :mod:`diffmix_core.commands`
(one module per group of subcommands). Options that mirror a config dataclass are generated
from its fields (:func:`add_config_args`), so every default lives in config.py; options several
commands share are declared once, in :data:`SHARED`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .commands import data, demo, generate, score, share, train
from .commands.options import PROFILED, add_config_args, config_from_args, fail, given_values, split_config_from_args
from .config import (CALIBRATE_MAX_JOBS, CALIBRATE_MAX_JOBS_ENV, DEFAULT_START_STRENGTH, PROFILE_SETTINGS,
                     CalibrateConfig, ClassifyConfig, DiffIIConfig, FinetuneConfig, PipelineConfig, ReferenceConfig,
                     ScoreConfig, SelftestConfig, SplitConfig, SynthesizeConfig, Thresholds, TranslateConfig)

__all__ = ["add_config_args", "add_dataset_args", "build_parser", "config_from_args", "given_values", "main",
           "split_config_from_args"]

TRANSLATE_MAX_JOBS = 4096   # one `diffmix translate` call holds all its images in memory
_BASE = "base model (Hub id or diffusers folder) for the real-* strategies"
_NO_BUNDLE_WORD = "super-class word for prompts without a bundle (e.g. bird)"

# Options several commands share: flags and argparse keywords, declared here once; a command
# adds them with shared(), changing a help text (or other keywords) where its meaning narrows.
SHARED: dict[str, tuple[tuple[str, ...], dict]] = {
    "out": (("--out",), {"type": Path, "required": True, "help": "output folder"}),
    "quiet": (("--quiet",), {"action": "store_true", "help": "no progress bars"}),
    "device": (("--device",), {"default": None, "help": "cuda, cpu, ... (default: CUDA when present)"}),
    "bundle": (("--bundle",), {"type": Path, "help": "adapter bundle folder"}),
    "base": (("--base",), {"help": "base model: Hub id or diffusers folder"}),
    "revision": (("--revision",), {"default": None, "help": "Hub revision of the base model"}),
    "superclass": (("--superclass",), {"default": "", "help": _NO_BUNDLE_WORD}),
    "reference": (("--reference",), {"type": Path, "default": None,
                                     "help": "reference classifier folder (default: the bundle's)"}),
    "seed": (("--seed",), {"type": int, "default": 0, "help": "seed of every translation (default: 0)"}),
    "strength": (("--strength",), {"type": float, "nargs": "+", "default": None, "help": "strength(s) s in [0, 1]"}),
    "data": (("--data",), {"type": Path, "default": None, "help": "dataset folder"}),
    "split_file": (("--split-file",), {"type": Path, "default": None, "help": "split file shared by every stage "
                                       "(default: diffmix_split.json in the dataset folder); made on first use"}),
    "max_pixels": (("--max-pixels",), {"type": int, "default": None, "help": "refuse images with more pixels "
                                       "(default: DIFFMIX_MAX_PIXELS or 40M)"}),
    "max_jobs": (("--max-jobs",), {"type": int, "default": None, "help": "refuse a request of more images than this"}),
    "overwrite": (("--overwrite",), {"action": "store_true", "help": "replace an existing --out"}),
    "dry_run": (("--dry-run",), {"action": "store_true", "help": "check, write nothing"}),
}


def shared(parser, *names: str, **changes) -> None:
    """Add the shared options ``names`` (and those ``changes`` names: a help text, or a dict of
    argparse keywords over its declaration in :data:`SHARED`)."""
    for name in [*names, *changes]:
        flags, kw = SHARED[name]
        change = changes.get(name, {})
        parser.add_argument(*flags, **{**kw, **({"help": change} if isinstance(change, str) else change)})


def add_dataset_args(parser: argparse.ArgumentParser, *, splits: bool = True) -> None:
    """--data, --strict, --max-pixels and (``splits``) --split-file plus the SplitConfig options.

    Split options default to "not given": an existing split file is then used as it is,
    and a given option that disagrees with the file is refused (data.resolve_splits).
    Read them back with :func:`split_config_from_args`. Other stages reuse this.
    """
    shared(parser, data={"required": True, "help": "dataset: a benchmark's folder in its official layout "
                         "(CUB-200-2011, FGVC-Aircraft, Flowers-102, Stanford Cars, Oxford-IIIT Pet: its train/test "
                         "split is kept), ImageFolder folder (one sub-folder per class), Hugging Face imagefolder "
                         "folder, or CSV with header path,label"})
    parser.add_argument("--strict", action="store_true", help="fail on unusable image files instead of skipping them")
    shared(parser, "max_pixels")
    if splits:
        shared(parser, "split_file")
        add_config_args(parser, SplitConfig, prefix="split_")


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    """--allow-base-mismatch and the PipelineConfig options, --base-model among them (with --base or
    --bundle added by the command: read back with commands.options.pipeline_config)."""
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="apply the bundle even though --base-model differs from the one it was trained on")
    add_config_args(parser, PipelineConfig)


def _command(sub, name: str, run: Callable, help: str, description: str, **defaults) -> argparse.ArgumentParser:
    """A subcommand parser that runs ``run(args)``."""
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(run=run, **defaults)
    return p


# --------------------------------------------------------------------------- images: translate, synthesize, calibrate
def add_translate_parser(sub) -> None:
    p = _command(sub, "translate", generate.run_translate, "translate real images toward other classes (img2img)",
                 "Translate source images toward target classes at chosen strengths. Writes one PNG per (image, "
                 "target, strength, seed) with its record in the PNG text chunk, and records.jsonl.")
    shared(p.add_mutually_exclusive_group(required=True),
           bundle="adapter bundle folder (from finetune or import-diffmix)", base=_BASE)
    p.add_argument("--image", type=Path, nargs="+", help="source image file(s); not needed for *-gen")
    p.add_argument("--source-class", help="class of the source image(s)")
    p.add_argument("--target", nargs="+", default=None, help="target class name(s); intra-class strategies "
                   "(diff-aug, ti-aug, real-aug, diff-ii) default to --source-class")
    p.add_argument("--partner", type=Path, default=None, help="diff-ii: the second image of the class (default: one "
                   "drawn, seeded, from --data or the bundle's examples)")
    shared(p, data="diff-ii: ImageFolder to draw partners from (default: the bundle's example images)",
           strength=f"strength(s) s in [0, 1] ({PROFILED} its recommended strength, else {DEFAULT_START_STRENGTH}; "
           "diff-ii: 0.3, the share of steps prompted with a context suffix)",
           seed={"nargs": "+", "default": [0], "help": "seed(s), one image per seed; -1 = a random seed (written "
                 "to the record) (default: 0)"})
    add_config_args(p, TranslateConfig, profiled=PROFILE_SETTINGS)
    add_config_args(p, DiffIIConfig)
    shared(p, "superclass")
    add_pipeline_args(p)
    shared(p, max_pixels="refuse source images with more pixels (default: DIFFMIX_MAX_PIXELS or 40,000,000)",
           max_jobs={"default": TRANSLATE_MAX_JOBS, "help": "refuse a request of more images than this (images x "
                     "targets x strengths x seeds), before any work; use diffmix synthesize for bulk sets "
                     f"(default: {TRANSLATE_MAX_JOBS})"})
    shared(p, "out", quiet="no progress bar")


def add_synthesize_parser(sub) -> None:
    from .export import FORMATS

    p = _command(sub, "synthesize", generate.run_synthesize,
                 "bulk synthetic set from the train split: planned, resumable, sharded",
                 "Plan M x |train| translations (docs/method.md §2), write the plan to --out, then make every planned "
                 "image not made yet. Rerun to resume; --shard i/n or accelerate launch to split the plan; the last "
                 "shard (or --merge) writes records.jsonl and --export layouts.")
    shared(p.add_mutually_exclusive_group(),
           bundle="adapter bundle folder (needed by diff-* and ti-* strategies)", base=_BASE)
    add_dataset_args(p)
    shared(p, out="output folder (plan, images, records, exports)")
    for cls in (SynthesizeConfig, TranslateConfig, DiffIIConfig):
        add_config_args(p, cls, profiled=PROFILE_SETTINGS if cls is TranslateConfig else ())
    shared(p, "superclass")
    add_pipeline_args(p)
    p.add_argument("--shard", default=None, help="i/n: make only jobs with idx %% n == i (default: accelerate's "
                   "process index / count, else 0/1)")
    p.add_argument("--merge", action="store_true", help="make nothing; check all planned images and write the "
                   "indexes and exports")
    p.add_argument("--export", default="", help=f"comma-separated layouts written by the merge: {', '.join(FORMATS)}")
    add_config_args(p, Thresholds, profiled=[f.name for f in dataclasses.fields(Thresholds)])
    shared(p, reference="reference classifier for scores / --min-p-target (default: the bundle's, if it has one)")
    p.add_argument("--clip-model", default="", help="open_clip model for scores (default: none; see diffmix score)")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip weights tag or local file")
    p.add_argument("--score", action="store_true", help="score every image (record['scores']) even without thresholds")
    shared(p, "quiet")


def _targets_option(value: str) -> int:
    """--targets: a count M >= 1, or 'all' (= 0: every other class)."""
    if value.strip().lower() == "all":
        return 0
    try:
        m = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--targets takes a count or 'all', got {value!r}") from None
    if m < 1:
        raise argparse.ArgumentTypeError(f"--targets must be >= 1 or 'all', got {m}")
    return m


def add_calibrate_parser(sub) -> None:
    p = _command(sub, "calibrate", generate.run_calibrate,
                 "the dataset's strength from many sources x targets, with 95%% intervals",
                 "Draw K sources per class (--data's split, else the bundle's example images), send each to M other "
                 "classes at every strength and seed in one batched run, score them (reference classifier, CLIP), "
                 "and write calibration.json (per-strength means with intervals across sources, a per-target-class "
                 "table, the recommended strength and its bootstrap interval), calibration.png (the curves) and "
                 "calibration_grid.png.", base=None)
    shared(p, bundle={"required": True},
           data={"help": "dataset (ImageFolder, CSV, HF imagefolder) to draw the sources from (default: the "
                 "bundle's example images)"},
           split_file="with --data: its split file (default: the dataset's own)")
    add_config_args(p, CalibrateConfig, skip=("targets",))
    targets = CalibrateConfig.__dataclass_fields__["targets"].metadata
    p.add_argument("--targets", type=_targets_option, default=argparse.SUPPRESS,
                   help=f"{targets['help']} (default: {targets['shown']})")
    add_config_args(p, TranslateConfig, skip=("label_gamma", "label_scale"), profiled=PROFILE_SETTINGS)
    add_config_args(p, ScoreConfig, prefix="score_", skip=("batch_size", "ssim_size"))
    shared(p, "reference")
    add_pipeline_args(p)
    shared(p, max_jobs=f"refuse a calibration of more images than this (sources x targets x strengths x seeds) "
           f"before any work (default: {CALIBRATE_MAX_JOBS_ENV} or {CALIBRATE_MAX_JOBS})")
    shared(p, "out")
    p.add_argument("--save-profile", action="store_true", help="store the recommended strength with the calibration "
                   "summary in your saved profile of the bundle (under DIFFMIX_OUTPUT/profiles)")
    shared(p, "quiet")


# --------------------------------------------------------------------------- data: split, export
def add_split_parser(sub) -> None:
    p = _command(sub, "split", data.run_split, "check a dataset and make (or show) its train/val/test split file",
                 "Read a dataset, decode every image once, report unusable files, and make the split file every "
                 "later stage reads (or check and show an existing one).")
    add_dataset_args(p)
    shared(p, quiet="no progress bar")


def add_export_parser(sub) -> None:
    from .export import FORMATS

    p = _command(sub, "export", data.run_export, "write a folder of generated images in training layouts",
                 "Read a folder written by translate/synthesize (images + records.jsonl; a synthesize folder is "
                 "merged first) and write the Hugging Face imagefolder and/or the authors' data/ + meta.csv layout, "
                 "a sha256 manifest, and optionally a zip.")
    p.add_argument("--from", dest="source", type=Path, required=True, help="folder with records.jsonl (+ plan.jsonl)")
    shared(p, out={"required": False, "default": None, "help": "export folder (default: <from>/export)"})
    p.add_argument("--format", default="imagefolder,authors", help=f"comma-separated: {', '.join(FORMATS)} "
                   "(default: imagefolder,authors)")
    shared(p, overwrite="replace an existing --out that is not an earlier diffmix export (never the working "
           "directory, --from or a folder containing it; never a file)",
           bundle={"type": None, "default": None, "help": "the bundle that made the images: its class order gives "
                   "the imagefolder rows label / soft_label_vector and the dataset card's ClassLabel (default: the "
                   "synthesize folder's plan, else the bundle the records name, when it is there)"},
           quiet="no progress bar")


# --------------------------------------------------------------------------- training: finetune, train-reference, train, experiment
def add_finetune_parser(sub) -> None:
    p = _command(sub, "finetune", train.run_finetune, "learn class tokens + a UNet LoRA; write an adapter bundle",
                 "Fine-tune one token per class (textual inversion) and a UNet LoRA on the train split of a dataset "
                 "(Diff-Mix, docs/method.md §1). Runs under accelerate: `accelerate launch --multi_gpu "
                 "--num_processes N -m diffmix_core finetune ...` for several GPUs (or N CPU processes on a machine "
                 "without CUDA) or machines.")
    add_dataset_args(p)
    shared(p, base={"required": True})
    shared(p, "revision", out="bundle folder (also checkpoints/ and train_log.jsonl)")
    add_config_args(p, FinetuneConfig)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    shared(p, overwrite="replace the run in --out")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step (continue later with --resume)")
    shared(p, "quiet")


def add_train_reference_parser(sub) -> None:
    p = _command(sub, "train-reference", train.run_train_reference,
                 "fine-tune the reference classifier that scores faithfulness",
                 "Fine-tune a timm classifier on the real TRAIN split (model selection on the validation split, "
                 "never test). Writes model.safetensors + reference.json.")
    add_dataset_args(p)
    add_config_args(p, ReferenceConfig)
    shared(p, "out")
    p.add_argument("--attach", type=Path, metavar="BUNDLE", help="also copy it into this adapter bundle")
    shared(p, "device", quiet="no progress bar")


def add_train_parser(sub) -> None:
    p = _command(sub, "train", train.run_train,
                 "train and evaluate a classifier, optionally with synthetic replacement",
                 "Train a timm classifier on the real TRAIN split; each item is replaced by a random synthetic image "
                 "with probability --replace-prob, whose soft label is recomputed from its strength with --gamma and "
                 "--label-scale. Model selection on the validation split, never test. Writes model.safetensors, "
                 "classifier.json and report.json.")
    add_dataset_args(p)
    shared(p, "out")
    p.add_argument("--synthetic", type=Path, help="synthetic set: an export folder (imagefolder metadata.jsonl or "
                   "the authors' meta.csv + data/) or a synthesize --out folder with export/")
    add_config_args(p, ClassifyConfig)
    shared(p, "device", "quiet")


def add_experiment_parser(sub) -> None:
    p = _command(sub, "experiment", train.run_experiment_command,
                 "compare baseline, mixup/cutmix and synthetic arms over seeds",
                 "Run the design a YAML config names (settings x arms x strengths x seeds): synthesize what each arm "
                 "needs, train a classifier per run (selection on validation), and write a results table (markdown "
                 "+ JSON, mean ± std over seeds, each arm's paired difference to the baseline with a 95 % t-interval "
                 "over seeds, raw and Holm-adjusted p-values) and a plot of test accuracy against strength. "
                 "Resumable: finished runs and synthetic sets are reused.")
    p.add_argument("--config", type=Path, required=True, help="experiment YAML (see configs/)")
    p.add_argument("--quick", action="store_true", help="the quick variant: the file's quick: section, else "
                   "2 seeds, 1 epoch, multiplier 1, 4 scheduler steps")
    override = {"type": None, "required": False, "default": None}   # the YAML's value when not given (a string)
    shared(p, data={**override, "help": "override the config's dataset"},
           bundle={**override, "help": "override the config's adapter bundle"})
    p.add_argument("--ti-bundle", help="override the config's TI-only bundle (ti-* arms; finetune --mode ti-only)")
    shared(p, base="override the config's base model (real-* arms)",
           out={**override, "help": "override the config's work folder"})
    p.add_argument("--report-dir", help="override where the table and plot go")
    p.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds (each arm runs every seed; "
                   "the paired differences use the seeds an arm shares with the baseline)")
    p.add_argument("--threads", type=int, help="override the config's torch thread count (recorded in the report)")
    p.add_argument("--report-only", action="store_true", help="recompute the table, statistics and plot from the "
                   "config's existing results JSON (<report_dir>/<name>.json); trains nothing")
    p.add_argument("--pool", nargs="+", type=Path, metavar="RESULTS_JSON",
                   help="with --report-only: one report over this config's results and these (runs of the same "
                        "design on other seeds, e.g. another thread count), written as <report_dir>/<name>_pooled.*")
    shared(p, dry_run="print every run (setting, data, bundle, arm, strength, seed, hyper-parameters, synthetic "
           "budget) without loading a model or the data")
    shared(p, "device", "quiet")


# --------------------------------------------------------------------------- score
def add_score_parser(sub) -> None:
    p = _command(sub, "score", score.run_score, "score generated images: faithfulness, diversity, recommended strength",
                 "Score a folder written by `diffmix translate`: adds a `scores` object to every record of "
                 "records.jsonl, writes sweep_summary.json and scores.png/.svg.")
    p.add_argument("--input", type=Path, required=True, help="folder with the images and records.jsonl")
    shared(p, bundle="adapter bundle: prompts for CLIP and its reference classifier (default: the bundle the "
           "records name, when it is there)")
    shared(p, "reference")
    add_config_args(p, ScoreConfig)   # --clip-model unset: scoring.default_clip (env, the bundle's)
    p.add_argument("--clip-checkpoint", type=Path, help="local open_clip checkpoint file for --clip-model "
                   "(instead of --clip-pretrained)")
    shared(p, superclass="super-class word of the CLIP prompts without a bundle")
    p.add_argument("--set-recommended", action="store_true", help="write the recommended strength into the bundle")
    shared(p, out={"required": False, "help": "where the summary and the plot go (default: --input)"})
    shared(p, "device", quiet="no progress bar")


# --------------------------------------------------------------------------- bundles in and out: import-diffmix, space, push, pull
def add_import_parser(sub) -> None:
    p = _command(sub, "import-diffmix", share.run_import,
                 "convert the authors' Diff-Mix checkpoint into an adapter bundle",
                 "Read the authors' learned_embeds .bin (weights-only, never executed) and their attention-processor "
                 "LoRA safetensors; write an adapter bundle.")
    p.add_argument("--embeddings", type=Path, required=True, help="torch file with learned_embeds_dict, "
                   "name2placeholder, placeholder2name")
    p.add_argument("--lora", type=Path, help="pytorch_lora_weights.safetensors or its folder; omit it for the "
                   "embeddings of a TI-only run (a TI-only bundle, for ti-mix / ti-aug)")
    shared(p, base={"required": True, "help": "base model the checkpoint was trained on (Hub id or folder)"})
    shared(p, "revision", superclass={"required": True, "default": None,
                       "help": "super-class word of the prompt (bird, flower, car...)"})
    p.add_argument("--resolution", type=int, default=None, help="training resolution of the checkpoint (default: "
                   "the base model's own, unet sample_size x VAE factor: 512 for SD 1.5)")
    shared(p, out="bundle folder to write")


def add_hub_parsers(sub) -> None:
    p = _command(sub, "space", share.run_space, "write a ready-to-push Hugging Face Space folder (app + bundles)",
                 "Write a Hugging Face Space folder: README front matter, app.py, requirements.txt, the diffmix_core "
                 "package, .gitattributes (weights and images in LFS) and the bundles. Its README gives the two "
                 "commands that push it.")
    shared(p, out="new (or empty) folder for the Space",
           bundle={"type": None, "nargs": "+", "default": [], "metavar": "B", "help": "bundle folders (copied in, "
                   "with a base stored beside them as ../base) or Hub repo ids (the Space fetches them at start-up); "
                   "default: the shipped demo world"})
    p.add_argument("--title", default="diffmix", help="the Space's title")
    p.add_argument("--hardware", default=None, help="suggested_hardware (default: cpu-basic for the demo world "
                   "alone, else t4-small)")

    p = _command(sub, "push", share.run_push, "publish a bundle as a Hugging Face Hub model repo, with a model card",
                 "Build the upload folder (the bundle, its base when stored beside it as ../base, README.md model "
                 "card, samples.png) and upload it with huggingface_hub (create_repo + upload_folder). Log in first: "
                 "`hf auth login` (or HF_TOKEN).")
    shared(p, bundle={"required": True, "help": "bundle folder"})
    p.add_argument("--repo", required=True, help="USER/NAME of the model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--license", default="other", help="Hub licence id for the card (e.g. apache-2.0, gpl-2.0, "
                   "openrail; default: other)")
    p.add_argument("--license-name", default=None, help="licence name when --license other")
    p.add_argument("--license-link", default=None, help="licence file or URL when --license other")
    p.add_argument("--samples", type=Path, default=None, help="sample grid PNG for the card (default: made now "
                   "with `diffmix demo grid` settings from the bundle's example images)")
    p.add_argument("--no-samples", action="store_true", help="no sample grid")
    p.add_argument("--folder", type=Path, default=None, help="build the upload folder here and keep it")
    shared(p, dry_run="build and check the folder (needs --folder); upload nothing")

    p = _command(sub, "pull", share.run_pull, "download a bundle from the Hub and check every file's sha256",
                 "Download a bundle repo into the Hugging Face cache (HF_HUB_CACHE) and load it, which checks each "
                 "weight file against the sha256 in adapter.json. Offline, the cache is used (HF_HUB_OFFLINE=1).")
    p.add_argument("repo", help="USER/NAME of the bundle's model repo")
    shared(p, revision="branch, tag or commit")


# --------------------------------------------------------------------------- demo world, selftest, app
def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="build or evaluate the embedded offline demo world",
                       description="The demo world the app ships: a bird dataset from offline packages, a tiny "
                       "SD-architecture base model trained from scratch, a few-shot bundle with a reference "
                       "classifier. Sources: apt-get install -y tuxpaint-stamps-default fonts-noto-color-emoji; "
                       "npm install --prefix /work/demo-build/npm emoji-datasource-twitter@16 (or set "
                       "DIFFMIX_DEMO_NPM); pip install scikit-learn.")
    demo_sub = p.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    b = _command(demo_sub, "build", demo.run_demo_build, "build (or resume building) the demo world; hours on a "
                 "2-core CPU", "Run dataset -> base model -> bundle -> reference -> assets; every finished stage is "
                 "skipped, so rerunning with the same --out resumes a killed build.")
    shared(b, out="work folder (every stage's output)")
    b.add_argument("--assets", type=Path, default=None, help="where the shipped copy goes (default: OUT/assets/demo)")
    b.add_argument("--quick", action="store_true", help="tiny settings: every stage runs for real in about a minute")
    b.add_argument("--data-only", action="store_true",
                   help="stop after the dataset and its split files (minutes): OUT/data/birds is what "
                   "configs/experiment_demo.yaml reads")
    shared(b, "quiet")
    e = _command(demo_sub, "evaluate", demo.run_demo_evaluate, "translate held-out demo images to every other class "
                 "and tabulate", "Translate TEST-split images of each class to every other class at each strength; "
                 "print target-hit, source-keep and distance to the source per strength. The last line reads "
                 "target_hit_at_0.9=... source_keep_at_0.3=...")
    shared(e, bundle={"default": None, "help": "demo bundle with its reference classifier (default: the shipped "
                      "assets/demo/bundle)"},
           data="the demo birds ImageFolder and its split file (default: the shipped assets/demo/birds: 1,000 "
           "held-out test images; or a build's OUT/data/birds)")
    e.add_argument("--clip-model", default=None, help="open_clip model to score with as well (default: "
                   "DIFFMIX_CLIP_MODEL, else the CLIP the bundle names; 'none' = no CLIP)")
    e.add_argument("--clip-pretrained", default=None, help="its weights tag or checkpoint file")
    shared(e, base={"type": Path, "default": None, "help": "base pipeline folder (default: the bundle's)"},
           strength={"default": [0.1, 0.3, 0.5, 0.7, 0.9], "help": "strengths (default: 0.1 0.3 0.5 0.7 0.9)"})
    e.add_argument("--per-class", type=int, default=2, help="test images per class (default: 2)")
    e.add_argument("--guidance", type=float, default=2.5, help="classifier-free guidance (default: 2.5)")
    e.add_argument("--steps", type=int, default=25, help="scheduler steps N for s = 1 (default: 25)")
    shared(e, "seed")
    e.add_argument("--json", type=Path, default=None, help="also write the table and records to this JSON file")
    shared(e, quiet="no progress bar")
    g = _command(demo_sub, "grid", demo.run_demo_grid, "a labelled PNG grid: example sources, then diff-mix at each "
                 "strength", "One row per source -> target pair: the bundle's first example image of the source "
                 "class, then its diff-mix translations (sampler settings from the bundle's profile). The README's "
                 "grids are made with this.")
    shared(g, bundle={"required": True, "help": "a bundle with example images (assets/demo/bundle)"},
           out="PNG file to write")
    g.add_argument("--pair", nargs="+", default=None, metavar="SOURCE:TARGET",
                   help="rows as source:target class pairs (default: each class to the next)")
    shared(g, strength={"default": [0.3, 0.5, 0.7, 0.9], "help": "columns (default: 0.3 0.5 0.7 0.9)"})
    shared(g, "seed")


def add_selftest_parser(sub) -> None:
    p = _command(sub, "selftest", demo.run_selftest, "the whole chain on a real SD architecture with random weights "
                 "(no download): check a machine before spending GPU hours",
                 "Builds (once, cached) a RANDOM-weight pipeline of the real architecture, then: a small dataset -> "
                 "finetune (TI + LoRA) -> bundle -> translate (checked against diffusers' img2img) -> import an "
                 "authors'-format checkpoint -> synthesize + export. Prints each stage's time and peak memory; the "
                 "last line is 'selftest ARCH: ok' or the failing stage (exit status 1).")
    add_config_args(p, SelftestConfig)
    p.add_argument("--work", type=Path, default=None, help="folder for the run's files (default: a temporary one, "
                   "removed afterwards); selftest.json there records the stage times")


def add_app_parser(sub) -> None:
    p = _command(sub, "app", run_app, "launch the Gradio app (the same Blocks as app.py)",
                 "Launch the Gradio app: bundles from $DIFFMIX_BUNDLES, exports under $DIFFMIX_OUTPUT (default: the "
                 "per-user data folder, ~/.local/share/diffmix on Linux). Host and port default to "
                 "GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.")
    p.add_argument("--bundles", default=None, help="folder(s) of bundles, os.pathsep-separated (sets DIFFMIX_BUNDLES)")
    p.add_argument("--output", type=Path, default=None, help="export root (sets DIFFMIX_OUTPUT)")
    p.add_argument("--host", default=None, help="server name (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="server port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")


def run_app(args: argparse.Namespace) -> None:
    import os

    if args.bundles:
        os.environ["DIFFMIX_BUNDLES"] = args.bundles
    if args.output:
        os.environ["DIFFMIX_OUTPUT"] = str(args.output)
    if args.share:   # a public link: its visitors are not the local user (profiles.saving_allowed)
        os.environ.setdefault("DIFFMIX_ALLOW_PROFILE_SAVE", "0")
    from .ui import build_demo

    build_demo().launch(server_name=args.host, server_port=args.port, share=args.share or None)


# --------------------------------------------------------------------------- main
PARSERS: list[Callable] = [add_translate_parser, add_import_parser, add_split_parser, add_synthesize_parser,
                           add_export_parser, add_train_reference_parser, add_score_parser,
                           add_finetune_parser, add_train_parser, add_experiment_parser, add_app_parser,
                           add_demo_parser, add_selftest_parser, add_hub_parsers, add_calibrate_parser]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="diffmix", description="Diff-Mix: inter-class image mixup with a "
                                     "diffusion model. Fine-tune, translate, score, synthesize, train.")
    parser.add_argument("--version", action="version", version=f"diffmix {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
