"""The one `diffmix` entry point: a subcommand per stage.

Options that mirror a config dataclass are generated from its fields by
:func:`add_config_args`, so every default lives in config.py. Each command
parses, calls the library, and prints; no computation lives here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import (ClassifyConfig, DemoWorldConfig, DiffIIConfig, FinetuneConfig, PipelineConfig, ReferenceConfig,
                     ScoreConfig, SelftestConfig, SplitConfig, SynthesizeConfig, Thresholds, TranslateConfig, check_seed,
                     get_strategy, with_recipe)
from .paths import DEMO_ASSETS, DEMO_BUNDLE


# --------------------------------------------------------------------------- helpers
def add_config_args(parser: argparse.ArgumentParser, cls, *, prefix: str = "", skip: Sequence[str] = ()) -> None:
    """Add an option for every field of a config dataclass declared with ``config.option``.

    The flag is ``--field-name`` (or the field's ``flags``), the help is the field's with its
    default. Every option starts unset (``argparse.SUPPRESS``), so :func:`config_from_args`
    tells a written option from a default. Booleans become ``--flag/--no-flag``; tuples take
    several values; ``X | None`` fields also take 'none'. ``prefix`` starts each destination
    (two configs of one command may share a field name).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or f.name in skip:
            continue
        shown = f.default if meta["shown"] is None else meta["shown"]
        text = meta["help"] + (f" (default: {shown})" if meta["shown"] != "" else "")
        kw = {"dest": prefix + f.name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        kind = hints[f.name]
        optional = _optional_inner(kind)
        if optional is not None:  # `int | None`: the value, or 'none'
            kw["type"] = _or_none(optional)
        elif kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kw.update(type=typing.get_args(kind)[0], nargs="+")
        else:
            kw["type"] = kind if kind in (int, float, str) else str
        parser.add_argument(*(meta["flags"] or ("--" + f.name.replace("_", "-"),)), **kw)


def _optional_inner(kind):
    """``X`` for an ``X | None`` field type (X int, float or str), else None."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
            and len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return inner if inner in (int, float, str) else str
    return None


def _or_none(kind):
    """An argparse type: 'none' (any case) -> None, else ``kind(value)``."""
    def parse(value: str):
        return None if value.lower() == "none" else kind(value)
    parse.__name__ = kind.__name__
    return parse


def given_values(cls, args: argparse.Namespace, *, prefix: str = "") -> dict:
    """{field: value} of the options of ``cls`` written on the command line (:func:`add_config_args`)."""
    return {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(args, prefix + f.name)}


def config_from_args(cls, args: argparse.Namespace, *, prefix: str = "", base: dict | None = None, **overrides):
    """``cls`` from the options written on the command line, over ``base`` (e.g. a bundle's profile),
    over the dataclass defaults; ``overrides`` win over all."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in (base or {}).items() if k in names}
    values.update(given_values(cls, args, prefix=prefix))
    values.update(overrides)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def fail(message: str) -> typing.NoReturn:
    print(f"diffmix: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# --------------------------------------------------------------------------- translate
TRANSLATE_MAX_JOBS = 4096   # one `diffmix translate` call holds all its images in memory


def add_translate_parser(sub) -> None:
    p = sub.add_parser("translate", help="translate real images toward other classes (img2img)",
                       description="Translate source images toward target classes at chosen strengths. "
                       "Writes one PNG per (image, target, strength, seed) with its record in the PNG "
                       "text chunk, and records.jsonl.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="adapter bundle folder (from finetune or import-diffmix)")
    src.add_argument("--base", help="base model (Hub id or diffusers folder) for the real-* strategies")
    p.add_argument("--image", type=Path, nargs="+", help="source image file(s); not needed for *-gen")
    p.add_argument("--source-class", help="class of the source image(s)")
    p.add_argument("--target", nargs="+", default=None, help="target class name(s); intra-class strategies "
                   "(diff-aug, ti-aug, real-aug, diff-ii) default to --source-class")
    p.add_argument("--partner", type=Path, default=None, help="diff-ii: the second image of the class (default: one "
                   "drawn, seeded, from --data or the bundle's examples)")
    p.add_argument("--data", type=Path, default=None, help="diff-ii: ImageFolder to draw partners from (default: the "
                   "bundle's example images)")
    p.add_argument("--strength", type=float, nargs="+", default=None, help="strength(s) s in [0, 1] (default: 0.5; "
                   "diff-ii: 0.3, the share of steps prompted with a context suffix)")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="seed(s), one image per seed; -1 = a random "
                   "seed (written to the record) (default: 0)")
    add_config_args(p, TranslateConfig)
    add_config_args(p, DiffIIConfig)
    p.add_argument("--superclass", default="", help="super-class word for prompts without a bundle (e.g. bird)")
    add_pipeline_args(p)
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse source images with more pixels (default: DIFFMIX_MAX_PIXELS or 40,000,000)")
    p.add_argument("--max-jobs", type=int, default=TRANSLATE_MAX_JOBS,
                   help="refuse a request of more images than this (images x targets x strengths x seeds), "
                   f"before any work; use diffmix synthesize for bulk sets (default: {TRANSLATE_MAX_JOBS})")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_translate)


def run_translate(args: argparse.Namespace) -> None:
    from .apply import load_pipeline_for
    from .bundle import Profile
    from .data import load_image
    from .diffii import DIFFII_S
    from .hub import open_bundle
    from .translate import Source, check_strength, count_jobs, translate
    from .records import write_translations
    from .jobs import RANDOM_SEED, make_jobs, resolve_seeds
    from .profiles import load_profile

    bundle = open_bundle(args.bundle) if args.bundle else None
    profile = _profile_values(args, bundle, (TranslateConfig,), strength=args.strength) if bundle else {}
    # -1: a random seed, recorded; other values are checked below with the request's numbers
    args.seed = [resolve_seeds([seed])[0] if seed == RANDOM_SEED else seed for seed in args.seed]
    config = config_from_args(TranslateConfig, args, base=profile)
    strategy = get_strategy(config.strategy)
    if args.strength is None:   # Profile.start_strength: the profile's, else the bundle's recommended, else 0.5;
        # diff-ii's s is another quantity: the authors' 0.3
        args.strength = [DIFFII_S if strategy.start == "inversion"
                         else (load_profile(bundle) if bundle else Profile()).start_strength(bundle)]
    if strategy.pairing != "gen" and not args.image:
        fail(f"strategy {strategy.name} needs --image")
    if strategy.pairing != "gen" and not args.source_class:
        fail("give --source-class (the class of the source images)")
    if not args.target:
        if strategy.pairing != "intra":
            fail(f"strategy {strategy.name} needs --target (the target class names)")
        args.target = [args.source_class]
    # 1. the request's size and numbers, before anything is read or loaded
    gen = strategy.pairing == "gen"
    factors = {"images": len(args.image), "targets": len(args.target), "strengths": len(args.strength),
               "seeds": len(args.seed)} if not gen else {"targets": len(args.target), "seeds": len(args.seed)}
    count_jobs(factors, args.max_jobs, "--max-jobs")
    for s in [] if gen or strategy.start == "inversion" else args.strength:
        check_strength(s, config.num_inference_steps)
    for seed in args.seed:
        check_seed(seed, "--seed")
    sources = [Source(load_image(p, max_pixels=args.max_pixels), args.source_class, p.stem, str(p.resolve()))
               for p in args.image or []]
    if strategy.start == "inversion":
        jobs = _diffii_jobs(args, sources, bundle)
    else:
        jobs = make_jobs(sources, args.target, args.strength, args.seed, strategy.pairing)
    pipe = load_pipeline_for(_pipeline_config(args), bundle, allow_base_mismatch=args.allow_base_mismatch)
    results = translate(pipe, jobs, config, bundle=bundle, superclass=args.superclass,
                        show_progress=not args.quiet, diff_ii=config_from_args(DiffIIConfig, args))
    index = write_translations(results, args.out)
    print(f"wrote {len(results)} image(s) and {index}")


def _diffii_jobs(args: argparse.Namespace, sources: list, bundle) -> list:
    """diff-ii jobs: each source with --partner, else with a same-class image drawn per seed from
    --data or the bundle's examples (diffii.draw_partner)."""
    from .data import load_image
    from .diffii import draw_partner, suffixes_for
    from .diffii_jobs import partner_pool
    from .translate import Job, Source

    if bundle is None:
        fail("strategy diff-ii runs on a fine-tuned bundle: give --bundle")
    suffixes_for(config_from_args(DiffIIConfig, args), bundle.superclass)   # a bad --suffixes fails before any work
    if args.partner:
        pool = [Source(load_image(args.partner, max_pixels=args.max_pixels), args.source_class, args.partner.stem,
                       str(args.partner.resolve()))]
    else:
        pool = partner_pool(args.source_class, data=args.data, bundle=bundle, max_pixels=args.max_pixels)
    jobs = []
    for src in sources:
        for seed in args.seed:
            partner = pool[0] if args.partner else draw_partner(src, pool, seed)
            if partner.pixel_hash() == src.pixel_hash():
                print(f"diff-ii: {src.id} has no other image of its class to pair with; it is denoised from its "
                      "own inversion (no interpolation)")
            jobs += [Job(src, t, s, seed, partner=partner) for t in args.target for s in args.strength]
    return jobs


# --------------------------------------------------------------------------- import-diffmix
def add_import_parser(sub) -> None:
    p = sub.add_parser("import-diffmix", help="convert the authors' Diff-Mix checkpoint into an adapter bundle",
                       description="Read the authors' learned_embeds .bin (weights-only, never executed) and "
                       "their attention-processor LoRA safetensors; write an adapter bundle.")
    p.add_argument("--embeddings", type=Path, required=True, help="torch file with learned_embeds_dict, "
                   "name2placeholder, placeholder2name")
    p.add_argument("--lora", type=Path, help="pytorch_lora_weights.safetensors or its folder; omit it for the "
                   "embeddings of a TI-only run (a TI-only bundle, for ti-mix / ti-aug)")
    p.add_argument("--base", required=True, help="base model the checkpoint was trained on (Hub id or folder)")
    p.add_argument("--revision", help="Hub revision of the base model")
    p.add_argument("--superclass", required=True, help="super-class word of the prompt (bird, flower, car...)")
    p.add_argument("--resolution", type=int, default=None, help="training resolution of the checkpoint (default: "
                   "the base model's own, unet sample_size x VAE factor: 512 for SD 1.5)")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.set_defaults(run=run_import)


def run_import(args: argparse.Namespace) -> None:
    from .authors import import_diffmix

    bundle = import_diffmix(args.embeddings, args.lora, base_model=args.base, base_revision=args.revision,
                            superclass=args.superclass, out_dir=args.out, resolution=args.resolution)
    print(f"wrote bundle {bundle.path}: {len(bundle.classes)} classes, base {bundle.base_model}")


# --------------------------------------------------------------------------- datasets and splits
def add_dataset_args(parser: argparse.ArgumentParser, *, splits: bool = True) -> None:
    """--data, --strict, --max-pixels and (``splits``) --split-file plus the SplitConfig options.

    Split options default to "not given": an existing split file is then used as it is,
    and a given option that disagrees with the file is refused (data.resolve_splits).
    Use :func:`split_config_from_args` to read them back. Other stages reuse this.
    """
    parser.add_argument("--data", type=Path, required=True, help="dataset: a benchmark's folder in its official "
                        "layout (CUB-200-2011, FGVC-Aircraft, Flowers-102, Stanford Cars, Oxford-IIIT Pet: its "
                        "train/test split is kept), ImageFolder folder (one sub-folder per class), Hugging Face "
                        "imagefolder folder, or CSV with header path,label")
    parser.add_argument("--strict", action="store_true", help="fail on unusable image files instead of skipping them")
    parser.add_argument("--max-pixels", type=int, default=None, help="refuse images with more pixels (default: "
                        "DIFFMIX_MAX_PIXELS or 40M)")
    if not splits:
        return
    parser.add_argument("--split-file", type=Path, default=None, help="split file shared by every stage "
                        "(default: diffmix_split.json in the dataset folder); made on first use")
    add_config_args(parser, SplitConfig, prefix="split_")


def split_config_from_args(args: argparse.Namespace) -> dict | None:
    """The split settings the user gave, as {field: value} for data.resolve_splits (None: none given;
    'none' counts as not given)."""
    given = {k: v for k, v in given_values(SplitConfig, args, prefix="split_").items() if v is not None}
    SplitConfig(**given)  # validate now: a clear error before any work
    return given or None


def add_split_parser(sub) -> None:
    p = sub.add_parser("split", help="check a dataset and make (or show) its train/val/test split file",
                       description="Read a dataset, decode every image once, report unusable files, and make "
                       "the split file every later stage reads (or check and show an existing one).")
    add_dataset_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_split)


def run_split(args: argparse.Namespace) -> None:
    from .data import default_split_path, read_dataset, resolve_splits, split_subset

    dataset = read_dataset(args.data, strict=args.strict, max_pixels=args.max_pixels, show_progress=not args.quiet)
    splits = resolve_splits(dataset, args.split_file, split_config_from_args(args))
    counts = {name: split_subset(dataset, splits, name).counts() for name in splits}
    kept = ", official train/test split kept" if dataset.official is not None else ""
    print(f"{len(dataset.items)} images, {len(dataset.classes)} classes, {len(dataset.skipped)} skipped "
          f"(layout: {dataset.layout}{kept})")
    for path, reason in dataset.skipped[:20]:
        print(f"  skipped {path}: {reason}")
    width = max(len(c) for c in dataset.classes)
    print(f"{'class':<{width}}  " + "  ".join(f"{n:>5}" for n in counts))
    for i, c in enumerate(dataset.classes):
        print(f"{c:<{width}}  " + "  ".join(f"{counts[n][i]:>5}" for n in counts))
    print(f"split file: {args.split_file or default_split_path(dataset)}")


# --------------------------------------------------------------------------- finetune
def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="learn class tokens + a UNet LoRA; write an adapter bundle",
                       description="Fine-tune one token per class (textual inversion) and a UNet LoRA on the "
                       "train split of a dataset (Diff-Mix, REFERENCE.md §1). Runs under accelerate: "
                       "`accelerate launch --multi_gpu --num_processes N -m diffmix_core finetune ...` for "
                       "several GPUs (or N CPU processes on a machine without CUDA) or machines.")
    add_dataset_args(p)
    p.add_argument("--base", required=True, help="base model: Hub id or diffusers folder")
    p.add_argument("--revision", help="Hub revision of the base model")
    p.add_argument("--out", type=Path, required=True, help="bundle folder (also checkpoints/ and train_log.jsonl)")
    add_config_args(p, FinetuneConfig)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step (continue later with --resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_finetune)


def run_finetune(args: argparse.Namespace) -> None:
    from .finetune import finetune

    bundle = finetune(args.data, args.base, args.out, config_from_args(FinetuneConfig, args),
                      revision=args.revision, split_file=args.split_file, split_config=split_config_from_args(args),
                      resume=args.resume, overwrite=args.overwrite, strict=args.strict, max_pixels=args.max_pixels,
                      show_progress=not args.quiet, stop_after=args.stop_after)
    if bundle is None:
        print(f"stopped; no checkpoint yet in {args.out}")
    else:
        print(f"bundle {bundle.path}: {bundle.num_classes} classes, {bundle.meta['steps']} steps")


# --------------------------------------------------------------------------- synthesize and export
def add_synthesize_parser(sub) -> None:
    from .export import FORMATS

    p = sub.add_parser("synthesize", help="bulk synthetic set from the train split: planned, resumable, sharded",
                       description="Plan M x |train| translations (REFERENCE.md §2), write the plan to --out, then "
                       "make every planned image not made yet. Rerun to resume; --shard i/n or accelerate launch "
                       "to split the plan; the last shard (or --merge) writes records.jsonl and --export layouts.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bundle", type=Path, help="adapter bundle folder (needed by diff-* and ti-* strategies)")
    src.add_argument("--base", help="base model (Hub id or diffusers folder) for the real-* strategies")
    add_dataset_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder (plan, images, records, exports)")
    add_config_args(p, SynthesizeConfig)
    add_config_args(p, TranslateConfig)
    add_config_args(p, DiffIIConfig)
    p.add_argument("--superclass", default="", help="super-class word for prompts without a bundle (e.g. bird)")
    add_pipeline_args(p)
    p.add_argument("--shard", default=None, help="i/n: make only jobs with idx %% n == i (default: accelerate's "
                   "process index / count, else 0/1)")
    p.add_argument("--merge", action="store_true", help="make nothing; check all planned images and write the "
                   "indexes and exports")
    p.add_argument("--export", default="", help=f"comma-separated layouts written by the merge: {', '.join(FORMATS)}")
    add_config_args(p, Thresholds)
    p.add_argument("--reference", type=Path, default=None, help="reference classifier for scores / --min-p-target "
                   "(default: the bundle's, if it has one)")
    p.add_argument("--clip-model", default="", help="open_clip model for scores (default: none; see diffmix score)")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip weights tag or local file")
    p.add_argument("--score", action="store_true", help="score every image (record['scores']) even without thresholds")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_synthesize)


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    """--base-model, --allow-base-mismatch and the PipelineConfig options (with --base or --bundle
    added by the command: read back with :func:`_pipeline_config`)."""
    parser.add_argument("--base-model", help="with --bundle: load this base model instead of the one the bundle names")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="apply the bundle even though --base-model differs from the one it was trained on")
    add_config_args(parser, PipelineConfig)


def _pipeline_config(args: argparse.Namespace):
    return config_from_args(PipelineConfig, args, model=args.base or args.base_model or "")


def _profile_values(args: argparse.Namespace, bundle, configs: Sequence[type], **options) -> dict:
    """The bundle's profile (the user's saved overlay first, then the bundle's own) as {field: value}
    for the fields of ``configs`` (and the other ``options``, {name: value or None = not written})
    that the command line leaves unset, thresholds included where the command has them."""
    from .profiles import load_profile, profile_path

    profile = load_profile(bundle)
    values = {**profile.settings(), **profile.thresholds.as_dict()}
    known = {f.name for cls in configs for f in dataclasses.fields(cls)} | set(options)
    given = {k for cls in configs for k in given_values(cls, args)} | {k for k, v in options.items() if v is not None}
    used = {k: v for k, v in values.items() if k in known and k not in given}
    if used:
        where = (f"your saved profile {profile_path(bundle)}" if profile.source == "saved profile"
                 else "the bundle's profile")
        print(f"from {where}: {', '.join(f'{k}={v}' for k, v in used.items())} (override on the command line)")
    return used


def run_synthesize(args: argparse.Namespace) -> None:
    from .synthesize import parse_shard, run_synthesis, train_split

    bundle = None
    if args.bundle:
        from .hub import open_bundle

        bundle = open_bundle(args.bundle)
    configs = (SynthesizeConfig, TranslateConfig, Thresholds)
    profile = _profile_values(args, bundle, configs) if bundle else {}
    if bundle is None and not args.base and not args.merge:
        fail("give --bundle or --base")
    train, split_file = train_split(args.data, args.split_file, split_config_from_args(args), strict=args.strict,
                                    max_pixels=args.max_pixels, show_progress=not args.quiet)
    sconfig, tconfig, thresholds = (config_from_args(cls, args, base=profile) for cls in configs)
    r = run_synthesis(train, args.out, sconfig, tconfig, _pipeline_config(args), split_file=split_file,
                      bundle=bundle, superclass=args.superclass, shard=parse_shard(args.shard) if args.shard else None,
                      merge_only=args.merge, export=args.export, thresholds=thresholds,
                      score=args.score, reference=args.reference, clip_model=args.clip_model,
                      clip_pretrained=args.clip_pretrained, allow_base_mismatch=args.allow_base_mismatch,
                      show_progress=not args.quiet, diff_ii=config_from_args(DiffIIConfig, args))
    s, (i, n) = r["made"], r["shard"]
    if s:
        rate = f", {s['images_per_s']:.2f} img/s" if s["images_per_s"] else ""
        print(f"shard {s['shard']}: {s['planned']} planned, {s['skipped']} already made, {s['made']} made, "
              f"{s['rejected']} rejected, {s['seconds']:.1f} s{rate}")
    elif not args.merge:
        print(f"shard {i}/{n}: all its planned images are already made")
    if r["main"] and r["merged"] is None:
        print(f"{r['missing']} planned image(s) still to make by other shards; the last one merges "
              f"(or run with --merge)")
    elif r["merged"] is not None:
        m = r["merged"]
        print(f"merged {m['kept']} image(s) ({m['rejected']} rejected) into {args.out / 'records.jsonl'}"
              + (f"; exported {', '.join(m['export'])} to {args.out / 'export'}" if m["export"] else ""))


def add_export_parser(sub) -> None:
    from .export import FORMATS

    p = sub.add_parser("export", help="write a folder of generated images in training layouts",
                       description="Read a folder written by translate/synthesize (images + records.jsonl; a "
                       "synthesize folder is merged first) and write the Hugging Face imagefolder and/or the "
                       "authors' data/ + meta.csv layout, a sha256 manifest, and optionally a zip.")
    p.add_argument("--from", dest="source", type=Path, required=True, help="folder with records.jsonl (+ plan.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="export folder (default: <from>/export)")
    p.add_argument("--format", default="imagefolder,authors", help=f"comma-separated: {', '.join(FORMATS)} "
                   "(default: imagefolder,authors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not an earlier "
                   "diffmix export (never the working directory, --from or a folder containing it; never a file)")
    p.add_argument("--bundle", default=None, help="the bundle that made the images: its class order gives the "
                   "imagefolder rows label / soft_label_vector and the dataset card's ClassLabel (a synthesize "
                   "folder has it in its plan)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> None:
    from .export import export_records, parse_formats, read_generated_folder
    from .synthesize import PLAN_FILE, merge, read_plan

    formats = parse_formats(args.format)
    planned = (args.source / PLAN_FILE).is_file()
    if planned and args.out is None:
        m = merge(args.source, export=formats, show_progress=not args.quiet, overwrite=args.overwrite)
        print(f"exported {m['kept']} image(s) ({', '.join(formats)}) to {args.source / 'export'}")
        return
    classes = read_plan(args.source).classes if planned else None
    sealed = []
    if args.bundle:
        from .hub import open_bundle

        bundle = open_bundle(args.bundle)
        base = [bundle.base_model] if Path(bundle.base_model).is_dir() else []   # a local base: sealed too
        classes, sealed = bundle.classes, [bundle.path, *base]
    out = export_records(read_generated_folder(args.source), args.out or args.source / "export", formats,
                         classes=classes, show_progress=not args.quiet, overwrite=args.overwrite,
                         protect=(args.source,), sealed=sealed)
    print(f"exported ({', '.join(formats)}) to {out}")


# --------------------------------------------------------------------------- train-reference and score
def add_train_reference_parser(sub) -> None:
    p = sub.add_parser("train-reference", help="fine-tune the reference classifier that scores faithfulness",
                       description="Fine-tune a timm classifier on the real TRAIN split (model selection on the "
                       "validation split, never test). Writes model.safetensors + reference.json.")
    add_dataset_args(p)
    add_config_args(p, ReferenceConfig)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--attach", type=Path, metavar="BUNDLE", help="also copy it into this adapter bundle")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_train_reference)


def run_train_reference(args: argparse.Namespace) -> None:
    from .data import read_dataset
    from .reference import attach_reference, train_reference

    config = config_from_args(ReferenceConfig, args)
    given = split_config_from_args(args)
    dataset = read_dataset(args.data, strict=args.strict, max_pixels=args.max_pixels, show_progress=not args.quiet)
    out = train_reference(dataset, args.out, config, split_file=args.split_file,
                          split_config=SplitConfig(**given) if given else None, device=args.device,
                          show_progress=not args.quiet)
    meta = json.loads((out / "reference.json").read_text())
    print(f"wrote {out}: {meta['model_name']} ({meta['pretrained_from']}), {len(meta['classes'])} classes, "
          f"val accuracy {meta['val_accuracy']:.3f} (chance {meta['chance_accuracy']:.3f}, "
          f"best epoch {meta['best_epoch']})")
    if args.attach:
        bundle = attach_reference(args.attach, out)
        print(f"attached to bundle {bundle.path} ({bundle.meta['reference_classifier']})")


def add_score_parser(sub) -> None:
    p = sub.add_parser("score", help="score generated images: faithfulness, diversity, recommended strength",
                       description="Score a folder written by `diffmix translate`: adds a `scores` object to "
                       "every record of records.jsonl, writes sweep_summary.json and scores.png/.svg.")
    p.add_argument("--input", type=Path, required=True, help="folder with the images and records.jsonl")
    p.add_argument("--bundle", type=Path, help="adapter bundle: prompts for CLIP and its reference classifier "
                   "(default: the bundle the records name, when it is there)")
    p.add_argument("--reference", type=Path, help="reference classifier folder (default: the bundle's)")
    add_config_args(p, ScoreConfig)   # --clip-model unset: scoring.default_clip (env, the bundle's)
    p.add_argument("--clip-checkpoint", type=Path, help="local open_clip checkpoint file for --clip-model "
                   "(instead of --clip-pretrained)")
    p.add_argument("--superclass", default="", help="super-class word of the CLIP prompts without a bundle")
    p.add_argument("--set-recommended", action="store_true", help="write the recommended strength into the bundle")
    p.add_argument("--out", type=Path, help="where the summary and the plot go (default: --input)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_score)


def run_score(args: argparse.Namespace) -> None:
    from .hub import open_bundle
    from .bundle import update_bundle_meta
    from .reference import bundle_reference_path, load_reference
    from .scoring import default_clip, format_summary, load_clip, score_folder

    if args.clip_checkpoint is not None and not args.clip_checkpoint.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {args.clip_checkpoint} does not exist")
    if args.set_recommended and not args.bundle:
        fail("--set-recommended needs --bundle")
    bundle = open_bundle(args.bundle) if args.bundle else _records_bundle(args.input)
    given = given_values(ScoreConfig, args)
    model, pretrained = default_clip(bundle)
    if "clip_model" in given:   # given: its weights are --clip-pretrained's (default ScoreConfig's)
        model, pretrained = given["clip_model"], ScoreConfig.clip_pretrained
    pretrained = str(args.clip_checkpoint) if args.clip_checkpoint else given.get("clip_pretrained", pretrained)
    config = config_from_args(ScoreConfig, args, clip_model=model, clip_pretrained=pretrained)
    ref_path = args.reference or (bundle_reference_path(bundle) if bundle else None)
    reference = load_reference(ref_path, device=args.device) if ref_path else None
    clip = load_clip(config.clip_model, config.clip_pretrained, device=args.device)
    print(clip.status)
    if reference is None:
        print("no reference classifier (--reference or a bundle with one): P(target), P(source), top1 are null")
    report = score_folder(args.input, reference=reference, clip=clip, config=config, bundle=bundle,
                          superclass=args.superclass, out_dir=args.out, show_progress=not args.quiet)
    for note in report.summary.get("missing_sources", [])[:5]:
        print(f"source image unavailable (no distance/SSIM): {note}")
    if report.summary.get("unknown_to_reference"):
        print(f"classes the reference classifier does not know (their P is null): "
              f"{report.summary['unknown_to_reference'][:10]}")
    print(format_summary(report.summary))
    print("wrote " + ", ".join(str(f) for f in report.files))
    strength = report.summary["recommended_strength"]
    if args.set_recommended and strength is not None:
        update_bundle_meta(bundle.path, recommended_strength=strength)
        print(f"bundle {bundle.path}: recommended_strength = {strength}")


def _records_bundle(folder: Path):
    """The one bundle a folder's records name, when it is still there with the same hash; else None."""
    from .bundle import load_bundle
    from .records import read_jsonl

    index = folder / "records.jsonl"
    if not index.is_file():
        return None
    named = {(r.get("bundle"), r.get("bundle_hash")) for r in read_jsonl(index)}
    if len(named) != 1 or not next(iter(named))[0]:
        if len(named) > 1:
            print(f"the records name {len(named)} bundles; give --bundle to score with one")
        return None
    path, digest = next(iter(named))
    try:   # a Hub id the records name is taken from the Hub cache only, never downloaded
        bundle = load_bundle(path) if Path(str(path)).exists() else _cached_hub_bundle(str(path))
    except (ValueError, FileNotFoundError, OSError):
        print(f"the records' bundle {path} is not there (a Hub bundle is used only when already in the Hub "
              "cache); give --bundle")
        return None
    if digest and bundle.hash != digest:
        print(f"the bundle at {path} has changed since these images were made (hash differs); give --bundle "
              "to score with it anyway")
        return None
    print(f"bundle: {path} (named in the records)")
    return bundle


def _cached_hub_bundle(repo_id: str):
    """The bundle ``repo_id`` from the local Hub cache (FileNotFoundError when it is not there)."""
    from .hub import HUB_REPO_ID, pull_bundle

    if not HUB_REPO_ID.match(repo_id):
        raise FileNotFoundError(repo_id)
    return pull_bundle(repo_id, local_only=True)


# --------------------------------------------------------------------------- calibrate
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
    from .config import CALIBRATE_MAX_JOBS, CALIBRATE_MAX_JOBS_ENV, CalibrateConfig, ScoreConfig, TranslateConfig

    p = sub.add_parser("calibrate", help="the dataset's strength from many sources x targets, with 95%% intervals",
                       description="Draw K sources per class (--data's split, else the bundle's example images), "
                       "send each to M other classes at every strength and seed in one batched run, score them "
                       "(reference classifier, CLIP), and write calibration.json (per-strength means with "
                       "intervals across sources, a per-target-class table, the recommended strength and its "
                       "bootstrap interval), calibration.png (the curves) and calibration_grid.png.")
    p.add_argument("--bundle", type=Path, required=True, help="adapter bundle folder")
    p.add_argument("--data", type=Path, help="dataset (ImageFolder, CSV, HF imagefolder) to draw the sources from "
                   "(default: the bundle's example images)")
    p.add_argument("--split-file", type=Path, help="with --data: its split file (default: the dataset's own)")
    add_config_args(p, CalibrateConfig, skip=("targets",))
    targets = CalibrateConfig.__dataclass_fields__["targets"].metadata
    p.add_argument("--targets", type=_targets_option, default=argparse.SUPPRESS,
                   help=f"{targets['help']} (default: {targets['shown']})")
    add_config_args(p, TranslateConfig, skip=("label_gamma", "label_scale"))
    add_config_args(p, ScoreConfig, prefix="score_", skip=("batch_size", "ssim_size"))
    p.add_argument("--reference", type=Path, help="reference classifier folder (default: the bundle's)")
    add_pipeline_args(p)
    p.add_argument("--max-jobs", type=int, default=None, help=f"refuse a calibration of more images than this "
                   f"(sources x targets x strengths x seeds) before any work (default: {CALIBRATE_MAX_JOBS_ENV} or "
                   f"{CALIBRATE_MAX_JOBS})")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--save-profile", action="store_true", help="store the recommended strength with the calibration "
                   "summary in your saved profile of the bundle (under DIFFMIX_OUTPUT/profiles)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_calibrate, base=None)


def run_calibrate(args: argparse.Namespace) -> None:
    from .bundle import load_bundle
    from .calibrate import calibrate, save_to_profile, write_calibration
    from .config import CalibrateConfig, ScoreConfig, TranslateConfig

    bundle = load_bundle(args.bundle)
    profile = _profile_values(args, bundle, (TranslateConfig,))
    translate_config = config_from_args(TranslateConfig, args, base=profile)
    config = config_from_args(CalibrateConfig, args)
    score_config = config_from_args(ScoreConfig, args, prefix="score_")
    reference, clip = _calibrate_scorers(args)

    def generate(bundle, jobs, config, callback=None):   # called once calibrate has checked the request
        from .apply import load_pipeline_for
        from .translate import translate

        pipe = load_pipeline_for(_pipeline_config(args), bundle, allow_base_mismatch=args.allow_base_mismatch)
        return translate(pipe, jobs, config, bundle=bundle, show_progress=not args.quiet, callback=callback)

    # calibrate checks the request (sources x targets x strengths x seeds) before generate loads the pipeline
    cal = calibrate(bundle, None, config, data=args.data, split_file=args.split_file,
                    translate_config=translate_config, score_config=score_config,
                    reference=reference, clip=clip, generate=generate, limit=args.max_jobs,
                    show_progress=not args.quiet)
    files = write_calibration(cal, args.out)
    print(cal.clip)
    print(cal.text())
    print("wrote " + ", ".join(str(f) for f in files))
    if args.save_profile:
        from .profiles import load_profile

        path = save_to_profile(bundle, cal)
        print(f"saved {path}: {load_profile(bundle).strength_source()}")


def _calibrate_scorers(args: argparse.Namespace) -> tuple[object | None, object | None]:
    """(reference, CLIP) named on the command line; None = the bundle's (calibrate loads it)."""
    from .config import ScoreConfig
    from .scoring import load_clip

    reference = None
    if args.reference:
        from .reference import load_reference

        reference = load_reference(args.reference)
    given = given_values(ScoreConfig, args, prefix="score_")
    clip = None
    if "clip_model" in given:
        clip = load_clip(given["clip_model"], given.get("clip_pretrained", ScoreConfig.clip_pretrained))
    return reference, clip


# --------------------------------------------------------------------------- train (downstream classifier)
def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train and evaluate a classifier, optionally with synthetic replacement",
                       description="Train a timm classifier on the real TRAIN split; each item is replaced by a "
                       "random synthetic image with probability --replace-prob, whose soft label is recomputed "
                       "from its strength with --gamma and --label-scale. Model selection on the validation "
                       "split, never test. Writes model.safetensors, classifier.json and report.json.")
    add_dataset_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--synthetic", type=Path, help="synthetic set: an export folder (imagefolder metadata.jsonl or "
                   "the authors' meta.csv + data/) or a synthesize --out folder with export/")
    add_config_args(p, ClassifyConfig)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> None:
    from .classify import format_report, train_classifier
    from .data import read_dataset

    config = config_from_args(ClassifyConfig, args, base=with_recipe(given_values(ClassifyConfig, args)))
    dataset = read_dataset(args.data, strict=args.strict, max_pixels=args.max_pixels, show_progress=not args.quiet)
    report = train_classifier(dataset, args.out, config, synthetic=args.synthetic, split_file=args.split_file,
                              split_config=split_config_from_args(args), device=args.device,
                              show_progress=not args.quiet)
    print(format_report(report))
    print(f"wrote {args.out / 'report.json'} and the best-validation checkpoint {args.out / 'model.safetensors'}")


# --------------------------------------------------------------------------- app
def add_app_parser(sub) -> None:
    p = sub.add_parser("app", help="launch the Gradio app (the same Blocks as app.py)",
                       description="Launch the Gradio app: bundles from $DIFFMIX_BUNDLES, exports under "
                       "$DIFFMIX_OUTPUT (default ./outputs). Host and port default to GRADIO_SERVER_NAME / "
                       "GRADIO_SERVER_PORT.")
    p.add_argument("--bundles", default=None, help="folder(s) of bundles, os.pathsep-separated (sets DIFFMIX_BUNDLES)")
    p.add_argument("--output", type=Path, default=None, help="export root (sets DIFFMIX_OUTPUT)")
    p.add_argument("--host", default=None, help="server name (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="server port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    p.set_defaults(run=run_app)


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


# --------------------------------------------------------------------------- experiment
def add_experiment_parser(sub) -> None:
    p = sub.add_parser("experiment", help="compare baseline, mixup/cutmix and synthetic arms over seeds",
                       description="Run the design a YAML config names (settings x arms x strengths x seeds): "
                       "synthesize what each arm needs, train a classifier per run (selection on validation), "
                       "and write a results table (markdown + JSON, mean ± std over seeds, each arm's paired "
                       "difference to the baseline with a 95 % t-interval over seeds, raw and Holm-adjusted "
                       "p-values) and a plot of test accuracy against strength. Resumable: finished runs and "
                       "synthetic sets are reused.")
    p.add_argument("--config", type=Path, required=True, help="experiment YAML (see configs/)")
    p.add_argument("--quick", action="store_true", help="the quick variant: the file's quick: section, else "
                   "2 seeds, 1 epoch, multiplier 1, 4 scheduler steps")
    p.add_argument("--data", help="override the config's dataset")
    p.add_argument("--bundle", help="override the config's adapter bundle")
    p.add_argument("--ti-bundle", help="override the config's TI-only bundle (ti-* arms; finetune --mode ti-only)")
    p.add_argument("--base", help="override the config's base model (real-* arms)")
    p.add_argument("--out", help="override the config's work folder")
    p.add_argument("--report-dir", help="override where the table and plot go")
    p.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds (each arm runs every seed; "
                   "the paired differences use the seeds an arm shares with the baseline)")
    p.add_argument("--threads", type=int, help="override the config's torch thread count (recorded in the report)")
    p.add_argument("--report-only", action="store_true", help="recompute the table, statistics and plot from the "
                   "config's existing results JSON (<report_dir>/<name>.json); trains nothing")
    p.add_argument("--dry-run", action="store_true", help="print every run (setting, data, bundle, arm, strength, "
                   "seed, hyper-parameters, synthetic budget) without loading a model or the data")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_experiment_command)


def run_experiment_command(args: argparse.Namespace) -> None:
    from .experiment import describe_runs, load_experiment, recompute_report, run_experiment

    config = load_experiment(args.config, quick=args.quick, data=args.data, bundle=args.bundle,
                             ti_bundle=args.ti_bundle, base=args.base, out=args.out, report_dir=args.report_dir,
                             seeds=args.seeds, threads=args.threads)
    if args.dry_run:
        print("\n".join(describe_runs(config)))
        return
    if args.report_only:
        result = recompute_report(Path(config.report_dir or config.out) / f"{config.name}.json")
    else:
        result = run_experiment(config, device=args.device, show_progress=not args.quiet)
    print(result["files"]["markdown"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(f) for f in result["files"].values()))


# --------------------------------------------------------------------------- demo
def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="build or evaluate the embedded offline demo world",
                       description="The demo world the app ships: a bird dataset from offline packages, a tiny "
                       "SD-architecture base model trained from scratch, a few-shot bundle with a reference "
                       "classifier. Sources: apt-get install -y tuxpaint-stamps-default fonts-noto-color-emoji; "
                       "npm install --prefix /work/demo-build/npm emoji-datasource-twitter@16 (or set "
                       "DIFFMIX_DEMO_NPM); pip install scikit-learn.")
    demo_sub = p.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    b = demo_sub.add_parser("build", help="build (or resume building) the demo world; hours on a 2-core CPU",
                            description="Run dataset -> base model -> bundle -> reference -> assets; every finished "
                            "stage is skipped, so rerunning with the same --out resumes a killed build.")
    b.add_argument("--out", type=Path, required=True, help="work folder (every stage's output)")
    b.add_argument("--assets", type=Path, default=None, help="where the shipped copy goes (default: OUT/assets/demo)")
    b.add_argument("--quick", action="store_true", help="tiny settings: every stage runs for real in about a minute")
    b.add_argument("--data-only", action="store_true",
                   help="stop after the dataset and its split files (minutes): OUT/data/birds is what "
                   "configs/experiment_demo.yaml reads")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(run=run_demo_build)
    e = demo_sub.add_parser("evaluate", help="translate held-out demo images to every other class and tabulate",
                            description="Translate TEST-split images of each class to every other class at each "
                            "strength; print target-hit, source-keep and distance to the source per strength. The "
                            "last line reads target_hit_at_0.9=... source_keep_at_0.3=...")
    e.add_argument("--bundle", type=Path, default=None, help="demo bundle with its reference classifier "
                   "(default: the shipped assets/demo/bundle)")
    e.add_argument("--data", type=Path, default=None, help="the demo birds ImageFolder and its split file (default: "
                   "the shipped assets/demo/birds: 1,000 held-out test images; or a build's OUT/data/birds)")
    e.add_argument("--clip-model", default=None, help="open_clip model to score with as well (default: "
                   "DIFFMIX_CLIP_MODEL, else the CLIP the bundle names; 'none' = no CLIP)")
    e.add_argument("--clip-pretrained", default=None, help="its weights tag or checkpoint file")
    e.add_argument("--base", type=Path, default=None, help="base pipeline folder (default: the bundle's)")
    e.add_argument("--strength", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="strengths (default: 0.1 0.3 0.5 0.7 0.9)")
    e.add_argument("--per-class", type=int, default=2, help="test images per class (default: 2)")
    e.add_argument("--guidance", type=float, default=2.5, help="classifier-free guidance (default: 2.5)")
    e.add_argument("--steps", type=int, default=25, help="scheduler steps N for s = 1 (default: 25)")
    e.add_argument("--seed", type=int, default=0, help="seed of every translation (default: 0)")
    e.add_argument("--json", type=Path, default=None, help="also write the table and records to this JSON file")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(run=run_demo_evaluate)
    g = demo_sub.add_parser("grid", help="a labelled PNG grid: example sources, then diff-mix at each strength",
                            description="One row per source -> target pair: the bundle's first example image "
                            "of the source class, then its diff-mix translations (sampler settings from the "
                            "bundle's profile). The README's grids are made with this.")
    g.add_argument("--bundle", type=Path, required=True, help="a bundle with example images (assets/demo/bundle)")
    g.add_argument("--out", type=Path, required=True, help="PNG file to write")
    g.add_argument("--pair", nargs="+", default=None, metavar="SOURCE:TARGET",
                   help="rows as source:target class pairs (default: each class to the next)")
    g.add_argument("--strength", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9],
                   help="columns (default: 0.3 0.5 0.7 0.9)")
    g.add_argument("--seed", type=int, default=0, help="seed of every translation (default: 0)")
    g.set_defaults(run=run_demo_grid)


def run_demo_build(args: argparse.Namespace) -> None:
    from .demo.world import build_world, quick_config

    bundle = build_world(args.out, quick_config() if args.quick else DemoWorldConfig(), assets=args.assets,
                         show_progress=not args.quiet, data_only=args.data_only)
    if bundle is None:
        print(f"demo dataset ready: {args.out / 'data' / 'birds'}")
        return
    print(f"demo world ready: bundle {bundle.path} on base {bundle.base_model}; "
          f"recommended strength {bundle.meta.get('recommended_strength')}")


def run_demo_evaluate(args: argparse.Namespace) -> None:
    from .demo.world import SHIPPED_BIRDS, evaluate_world
    from .hub import open_bundle
    from .records import write_text_atomic
    from .scoring import default_clip, load_clip

    if args.per_class < 1:
        fail("--per-class must be >= 1")
    bundle = open_bundle(args.bundle or DEMO_BUNDLE)
    model, pretrained = default_clip(bundle)
    clip = load_clip(args.clip_model if args.clip_model is not None else model,
                     args.clip_pretrained if args.clip_pretrained is not None else pretrained)
    if not clip.available and clip.name:
        print(clip.status)
    result = evaluate_world(bundle, args.data or DEMO_ASSETS / SHIPPED_BIRDS, strengths=tuple(args.strength),
                            per_class=args.per_class, guidance_scale=args.guidance, num_inference_steps=args.steps,
                            seed=args.seed, base=args.base, clip=clip, show_progress=not args.quiet)
    if args.json:
        write_text_atomic(args.json, json.dumps({"rows": result["rows"], "records": result["records"],
                                                 "clip": result["clip"]}, indent=1) + "\n")


def run_demo_grid(args: argparse.Namespace) -> None:
    from .demo.world import translation_grid
    from .records import save_png

    pairs = None
    if args.pair:
        bad = [p for p in args.pair if p.count(":") != 1]
        if bad:
            fail(f"--pair takes SOURCE:TARGET, got {bad}")
        pairs = [tuple(p.split(":")) for p in args.pair]
    grid = translation_grid(args.bundle, pairs, strengths=tuple(args.strength), seed=args.seed, show_progress=True)
    save_png(grid, args.out)
    print(f"wrote {args.out} ({grid.width} x {grid.height})")


# --------------------------------------------------------------------------- selftest
def add_selftest_parser(sub) -> None:
    p = sub.add_parser("selftest", help="the whole chain on a real SD architecture with random weights "
                       "(no download): check a machine before spending GPU hours",
                       description="Builds (once, cached) a RANDOM-weight pipeline of the real architecture, "
                       "then: a small dataset -> finetune (TI + LoRA) -> bundle -> translate (checked against "
                       "diffusers' img2img) -> import an authors'-format checkpoint -> synthesize + export. "
                       "Prints each stage's time and peak memory; the last line is 'selftest ARCH: ok' or "
                       "the failing stage (exit status 1).")
    add_config_args(p, SelftestConfig)
    p.add_argument("--work", type=Path, default=None, help="folder for the run's files (default: a temporary one, "
                   "removed afterwards); selftest.json there records the stage times")
    p.set_defaults(run=run_selftest)


def run_selftest(args: argparse.Namespace) -> None:
    from .selftest import selftest

    ok, _ = selftest(config_from_args(SelftestConfig, args), work=args.work)
    if not ok:
        raise SystemExit(1)


# --------------------------------------------------------------------------- space, push, pull (hub.py)
def add_hub_parsers(sub) -> None:
    p = sub.add_parser("space", help="write a ready-to-push Hugging Face Space folder (app + bundles)",
                       description="Write a Hugging Face Space folder: README front matter, app.py, requirements.txt, "
                       "the diffmix_core package, .gitattributes (weights and images in LFS) and the bundles. "
                       "Its README gives the two commands that push it.")
    p.add_argument("--out", type=Path, required=True, help="new (or empty) folder for the Space")
    p.add_argument("--bundle", nargs="+", default=[], metavar="B",
                   help="bundle folders (copied in, with a base stored beside them as ../base) or Hub repo ids "
                   "(the Space fetches them at start-up); default: the shipped demo world")
    p.add_argument("--title", default="diffmix", help="the Space's title")
    p.add_argument("--hardware", default=None, help="suggested_hardware (default: cpu-basic for the demo world "
                   "alone, else t4-small)")
    p.set_defaults(run=run_space)

    p = sub.add_parser("push", help="publish a bundle as a Hugging Face Hub model repo, with a model card",
                       description="Build the upload folder (the bundle, its base when stored beside it as "
                       "../base, README.md model card, samples.png) and upload it with huggingface_hub "
                       "(create_repo + upload_folder). Log in first: `hf auth login` (or HF_TOKEN).")
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder")
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
    p.add_argument("--dry-run", action="store_true", help="build and check the folder (needs --folder); upload nothing")
    p.set_defaults(run=run_push)

    p = sub.add_parser("pull", help="download a bundle from the Hub and check every file's sha256",
                       description="Download a bundle repo into the Hugging Face cache (HF_HUB_CACHE) and load it, "
                       "which checks each weight file against the sha256 in adapter.json. Offline, the cache is "
                       "used (HF_HUB_OFFLINE=1).")
    p.add_argument("repo", help="USER/NAME of the bundle's model repo")
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    p.set_defaults(run=run_pull)


def run_space(args: argparse.Namespace) -> None:
    from .hub import write_space

    out = write_space(args.out, args.bundle, title=args.title, hardware=args.hardware)
    print(f"wrote the Space folder {out}; push it with the two commands in {out / 'README.md'}")


def run_push(args: argparse.Namespace) -> None:
    import tempfile

    from .hub import build_push_folder, open_bundle, push_bundle

    if args.dry_run and args.folder is None:
        fail("--dry-run needs --folder (where the upload folder is built for you to inspect)")
    bundle = open_bundle(args.bundle)
    with tempfile.TemporaryDirectory(prefix="diffmix-push-") as tmp:
        samples = None if args.no_samples else args.samples
        if samples is None and not args.no_samples:
            from .demo.world import translation_grid
            from .records import save_png

            samples = save_png(translation_grid(bundle, show_progress=True), Path(tmp) / "samples.png")
        folder = build_push_folder(bundle, args.folder or Path(tmp) / "upload", args.repo, license=args.license,
                                   license_name=args.license_name, license_link=args.license_link, samples=samples)
        if args.dry_run:
            print(f"built {folder} (model card {folder / 'README.md'}); nothing uploaded (--dry-run)")
            return
        push_bundle(folder, args.repo, private=args.private)
    print(f"pushed {args.bundle} to https://huggingface.co/{args.repo}")


def run_pull(args: argparse.Namespace) -> None:
    from .hub import pull_bundle, unlisted_files

    bundle = pull_bundle(args.repo, revision=args.revision)
    extra = unlisted_files(bundle)
    print(f"{args.repo}: {bundle.num_classes} classes, every file adapter.json lists matches its sha256; "
          f"bundle folder {bundle.path}")
    if extra:
        print(f"not covered by adapter.json (no hash; diffmix neither reads nor publishes them): "
              f"{', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}")


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
