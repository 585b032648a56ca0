"""The translation engine: jobs (source image, source class, target class,
strength, seed) in; images and records out.

A strength sweep is one denoising loop (docs/engine.md). For N scheduler steps,
strength s starts at grid index N - floor(N*s). All jobs share one timestep
grid, so at each grid index the latents of every job that has started are
batched through the UNet once (both classifier-free-guidance halves), and
each job's own scheduler takes its step (multistep solvers keep per-job
history). Each job's result equals diffusers' StableDiffusionImg2ImgPipeline
for the same prompt, image, strength, steps, guidance and seed
(tests/test_translate.py checks this).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from . import __version__, feature_cache
from .apply import apply_bundle, set_lora_enabled
from .bundle import make_prompt
from .config import DiffIIConfig, Strategy, TranslateConfig, check_seed, get_strategy
from .labels import effective_strength, soft_label, steps_run
from .models import model_identity, scheduler_name


@dataclass
class Source:
    """A real image and its class. ``id`` names it in records (file stem, dataset id...);
    records are keyed by the image's pixels too (:meth:`pixel_hash`), so two sources that
    share a name never share a record id."""

    image: Image.Image
    source_class: str
    id: str
    path: str | None = None
    _pixel_hash: str = field(default="", init=False, repr=False, compare=False)

    def pixel_hash(self) -> str:
        """sha256 (hex) of the decoded pixels: mode, size and bytes (computed once)."""
        if not self._pixel_hash:
            h = hashlib.sha256(f"{self.image.mode}:{self.image.size[0]}x{self.image.size[1]}:".encode())
            h.update(self.image.tobytes())
            self._pixel_hash = h.hexdigest()
        return self._pixel_hash


@dataclass(frozen=True)
class Job:
    """One image to make: ``source`` translated toward ``target_class`` at ``strength``.

    ``source`` is None for the text-to-image strategies (diff-gen, real-gen);
    then ``source_class`` names the class the record is filed under.
    """

    source: Source | None
    target_class: str
    strength: float
    seed: int
    source_class: str | None = None
    partner: Source | None = None   # diff-ii: a second image of the source's class
    alpha: float | None = None      # diff-ii: the circle position; None = drawn from the seed
    suffix: str | None = None       # diff-ii: the context suffix; None = drawn from the seed

    @property
    def from_class(self) -> str:
        return self.source_class or (self.source.source_class if self.source else self.target_class)


@dataclass
class Result:
    image: Image.Image   # at the source image's size (model resolution for text-to-image)
    record: dict         # see records.RECORD_KEYS


@dataclass
class _State:
    """Per-job denoising state."""

    index: int                 # position in the caller's job list
    job: Job
    start: int                 # first grid index this job runs
    prompt: str
    generator: torch.Generator
    scheduler: object = None
    latents: torch.Tensor | None = None   # (1, 4, h, w)
    steps: int = 0
    size: tuple[int, int] = (0, 0)        # output (width, height)
    model_size: tuple[int, int] = (0, 0)  # model input (width, height)
    extra: dict = field(default_factory=dict)
    deep: torch.Tensor | None = None      # cache_interval > 1: deep UNet features of the last full step
    context_prompt: str = ""              # diff-ii: the prompt of the steps with t >= context_from
    context_from: float = math.inf
    record_extra: dict = field(default_factory=dict)  # what the strategy adds to the record

    def prompt_at(self, t) -> str:
        """The prompt of the step at timestep ``t``."""
        return self.context_prompt if self.context_prompt and t >= self.context_from else self.prompt


# Outputs are resized back to their source's size, but to at most this many pixels (aspect kept):
# a 40 MP source would otherwise make every job of a sweep allocate and resample 40 MP.
MAX_OUTPUT_PIXELS = int(os.environ.get("DIFFMIX_MAX_OUTPUT_PIXELS", 16_777_216))


def count_jobs(factors: dict[str, int], limit: int, how_to_raise: str) -> int:
    """The number of jobs a request makes, the product of ``factors`` ({what: count}),
    computed before any job list is built; ValueError above ``limit`` naming every factor.

    >>> count_jobs({"images": 2, "targets": 3, "strengths": 4, "seeds": 5}, 200, "--max-jobs")
    120
    """
    total = math.prod(int(v) for v in factors.values())
    if total > limit:
        shown = " x ".join(f"{v:,} {k}" for k, v in factors.items())
        raise ValueError(f"{shown} = {total:,} images exceeds the limit of {limit:,} per request; "
                         f"ask for fewer, or raise it with {how_to_raise}")
    return total


def output_size(source_size: tuple[int, int], max_pixels: int | None = None) -> tuple[int, int]:
    """The size an output is resized back to: the source's, scaled down (aspect kept) to at
    most ``max_pixels`` pixels (default ``MAX_OUTPUT_PIXELS``: ``DIFFMIX_MAX_OUTPUT_PIXELS`` or 16 M)."""
    max_pixels = MAX_OUTPUT_PIXELS if max_pixels is None else max_pixels
    w, h = source_size
    if w * h <= max_pixels:
        return w, h
    scale = (max_pixels / (w * h)) ** 0.5
    return max(1, int(w * scale)), max(1, int(h * scale))


def check_strength(strength: float, num_inference_steps: int) -> int:
    """Validate a strength for N steps and return the steps it runs.

    s = 0 is allowed (the identity); s that runs no step is refused with the
    smallest usable strength; s outside [0, 1] is refused.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, got {strength}")
    n = steps_run(num_inference_steps, strength)
    if n == 0 and strength > 0:
        raise ValueError(
            f"strength {strength} runs no denoising step with {num_inference_steps} steps "
            f"(floor({num_inference_steps} x {strength}) = 0); the smallest usable strength is "
            f"1/{num_inference_steps} = {1 / num_inference_steps:.4g}, or use 0 for the unchanged source")
    return n


def model_resolution(pipe, config: TranslateConfig, bundle=None) -> int:
    """Side of the square model input: config's, else the base pipeline's own default
    (``unet.config.sample_size x vae_scale_factor``: 512 for SD 1.5, as the authors always
    sample), whatever resolution the bundle was fine-tuned at."""
    if config.resolution:
        return config.resolution
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def _size_multiple(pipe) -> int:
    """Pixel sizes must be divisible by this for the VAE and all UNet down-samplings."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def model_input_size(image_size: tuple[int, int], resolution: int, resize: str, multiple: int) -> tuple[int, int]:
    """(width, height) fed to the model. 'squash' = resolution^2 (the paper);
    'keep-aspect' = same area, aspect kept, sides rounded to ``multiple``."""
    if resize == "squash":
        return resolution, resolution
    w, h = image_size
    scale = (resolution * resolution / (w * h)) ** 0.5
    sides = [round(v * scale / multiple) * multiple for v in (w, h)]
    if min(sides) < multiple:
        # A very thin image: its short side stops at `multiple`; cap the long side so the
        # model input (the UNet's work) stays within resolution^2 however extreme the aspect.
        longest = max(multiple, resolution * resolution // multiple // multiple * multiple)
        sides = [min(max(v, multiple), longest) for v in sides]
    return tuple(sides)


def _prompt(strategy: Strategy, class_name: str, bundle, superclass: str, real_gen: str = "superclass") -> str:
    """The target's prompt; ``real_gen`` (TranslateConfig.real_gen_prompt) chooses real-gen's: with the
    super-class, the name alone, or the authors' verbatim (augmentation/real_mix.py: format_name)."""
    if strategy.name == "real-gen" and real_gen != "superclass":
        word = f"<{class_name.replace(' ', '_')}>" if real_gen == "authors" else class_name
        return f"a photo of a {word}"
    if bundle is not None:
        return bundle.prompt(class_name, use_token=strategy.tokens)

    return make_prompt(class_name, superclass)


class _PromptCache:
    """Text embeddings computed once per prompt (and once for the empty negative).

    ``cache`` may be a dict the caller keeps across translate() calls (bulk synthesis);
    it is only valid while the same bundle is applied, so keys carry the bundle hash.
    """

    def __init__(self, pipe, cfg: bool, cache: dict | None = None):
        self.pipe, self.cfg = pipe, cfg
        self.cache = {} if cache is None else cache
        bundle = getattr(pipe, "diffmix_bundle", None)
        self.scope = (bundle.hash if bundle is not None else None, str(pipe.device), cfg)

    def __call__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (*self.scope, prompt)
        if key not in self.cache:
            self.cache[key] = self.pipe.encode_prompt(prompt, self.pipe.device, 1, self.cfg, negative_prompt=None)
        return self.cache[key]


def _records_base(pipe, config: TranslateConfig, bundle) -> dict:
    base = model_identity(pipe)
    return {
        "strategy": config.strategy, "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale, "scheduler": scheduler_name(pipe.scheduler),
        "resize": config.resize, "base_model": base["model"], "base_revision": base["revision"],
        "bundle": str(bundle.path) if bundle is not None else None,
        "bundle_hash": bundle.hash if bundle is not None else None,
        "bundle_mode": bundle_mode(bundle) if bundle is not None else None,
        "label_gamma": config.label_gamma, "label_scale": config.label_scale,
        "cache_interval": config.cache_interval,
        "diffmix_version": __version__,
    }


def make_record(base: dict, state: _State, resolution: int) -> dict:
    """The record of docs/formats.md for one finished job; ``id`` hashes what determines the image,
    the source's pixels included (two different ``photo.png`` never collide)."""
    job, n = state.job, base["num_inference_steps"]
    s_run = 1.0 if job.source is None else effective_strength(n, job.strength)
    record = dict(base)
    record.update({
        "source_id": job.source.id if job.source else None,
        "source_path": job.source.path if job.source else None,
        "source_sha256": job.source.pixel_hash() if job.source else None,
        "source_class": job.from_class, "target_class": job.target_class,
        "strength": 1.0 if job.source is None else job.strength, "strength_run": s_run,
        "steps_run": state.steps, "seed": job.seed, "resolution": resolution, "prompt": state.prompt,
        "soft_label": soft_label(job.from_class, job.target_class, s_run, base["label_gamma"], base["label_scale"]),
        "scores": None, "file_name": None,
    })
    record.update(state.record_extra)
    key = {k: record[k] for k in (*sorted(state.record_extra), "source_id", "source_sha256", "source_class", "target_class", "strategy",
                                  "strength", "seed",
                                  "num_inference_steps", "guidance_scale", "scheduler", "resize", "resolution",
                                  "base_model", "bundle_hash")}
    if record.get("cache_interval", 1) != 1:   # off (1) keeps the ids records had before the option
        key["cache_interval"] = record["cache_interval"]
    record["id"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return record


def bundle_mode(bundle) -> str:
    """What a bundle holds: 'ti-only' (class tokens, no UNet LoRA: a textual-inversion fine-tune or an
    embeddings-only import) or the fine-tune's mode (joint, lora-only; 'joint' when not recorded)."""
    if bundle.lora_file is None:
        return "ti-only"
    return (bundle.meta.get("training") or {}).get("mode") or "joint"


def strategy_unavailable(strategy_name: str, bundle) -> str | None:
    """Why ``bundle`` cannot run ``strategy_name`` (None when it can): the one rule the engine's
    check (:func:`check_bundle_for`) and the app's strategy list both follow. ti-mix / ti-aug use
    the tokens of a TI-only fine-tune (the paper's; a joint run's tokens were learned with its LoRA)."""
    strategy = get_strategy(strategy_name)
    if strategy.tokens and bundle is None:
        return (f"strategy {strategy.name!r} needs an adapter bundle (--bundle); "
                "the real-* strategies run on a base model alone")
    if strategy.tokens and not strategy.lora and bundle_mode(bundle) != "ti-only":
        return (f"strategy {strategy.name!r} uses the class tokens of a TI-only fine-tune (tokens "
                f"without LoRA, as the paper's {strategy.name}), but {bundle.path} is a "
                f"{bundle_mode(bundle)} bundle whose tokens were learned with its LoRA. Make a TI-only "
                "bundle with `diffmix finetune --mode ti-only --data DATA --base BASE --superclass WORD "
                "--out TI_BUNDLE` and pass that one")
    return None


def check_bundle_for(strategy_name: str, bundle) -> None:
    """Refuse a bundle that does not fit ``strategy_name`` (:func:`strategy_unavailable` says why)."""
    reason = strategy_unavailable(strategy_name, bundle)
    if reason:
        raise ValueError(reason)


def validate_jobs(jobs: Sequence[Job], config: TranslateConfig, bundle=None) -> None:
    """Refuse bad jobs before any work starts, with a message per problem."""
    strategy = get_strategy(config.strategy)
    check_bundle_for(strategy.name, bundle)
    for job in jobs:
        check_seed(job.seed, "seed")
        names = [job.target_class, job.from_class]
        if bundle is not None:
            for name in names:
                bundle.class_index(name)
        if strategy.pairing == "gen":
            continue
        if job.source is None:
            raise ValueError(f"strategy {strategy.name!r} translates a source image; job for "
                             f"{job.target_class!r} has none")
        if strategy.pairing == "intra" and job.target_class != job.from_class:
            raise ValueError(f"strategy {strategy.name!r} keeps the class (intra-class); got target "
                             f"{job.target_class!r} for a {job.from_class!r} source: use diff-mix/ti-mix/real-mix")
        if strategy.start == "inversion":
            from .diffii import check_job

            check_job(job)
        else:
            check_strength(job.strength, config.num_inference_steps)


def translate(
    pipe,
    jobs: Sequence[Job],
    config: TranslateConfig = TranslateConfig(),
    *,
    bundle=None,
    superclass: str = "",
    show_progress: bool = True,
    callback: Callable[[int, int], None] | None = None,
    prompt_cache: dict | None = None,
    diff_ii: DiffIIConfig | None = None,
) -> list[Result]:
    """Run all jobs; results come back in job order.

    Args:
        pipe: a pipeline from models.load_pipeline (the bundle is applied here if given).
        jobs: the images to make.
        config: steps, guidance, strategy, resize policy, soft-label settings, batch size.
        bundle: a bundle.Bundle; required by diff-* and ti-* strategies.
        superclass: the super-class word for prompts when there is no bundle.
        show_progress: tqdm bar over job-steps (gr.Progress(track_tqdm=True) follows it).
        callback: called with (job-steps done, total) after every UNet call.
        prompt_cache: a dict to keep text embeddings in across calls (e.g. one per synthesis run).
        diff_ii: the diff-ii strategy's inversion settings and suffixes (default: DiffIIConfig()).
    """
    validate_jobs(jobs, config, bundle)
    if config.cache_interval > 1:
        feature_cache.check_cacheable(pipe.unet)
    strategy = get_strategy(config.strategy)
    if bundle is not None:
        apply_bundle(pipe, bundle)
        set_lora_enabled(pipe, strategy.lora)
    elif getattr(pipe, "diffmix_bundle", None) is not None:
        set_lora_enabled(pipe, False)   # real-* on a pipe that carries a bundle: the untuned base
    resolution = model_resolution(pipe, config, bundle)
    base = _records_base(pipe, config, bundle)
    n = config.num_inference_steps
    states = [_State(i, job, start=0,
                     prompt=_prompt(strategy, job.target_class, bundle, superclass, config.real_gen_prompt),
                     generator=torch.Generator("cpu").manual_seed(job.seed)) for i, job in enumerate(jobs)]
    results: list[Result | None] = [None] * len(jobs)
    running = []
    for st in states:
        if st.job.source is not None and st.job.strength == 0 and strategy.start == "noised":   # the source
            image = st.job.source.image.convert("RGB")
            size = output_size(image.size)
            image = image.resize(size, Image.LANCZOS) if size != image.size else image.copy()
            results[st.index] = Result(image, make_record(base, st, resolution))
        else:
            running.append(st)
    with torch.inference_mode():
        if strategy.start == "inversion":
            from .diffii import prepare_states

            prepare_states(pipe, running, config, resolution, diff_ii or DiffIIConfig(),
                           bundle.superclass if bundle is not None else superclass, show_progress=show_progress)
        else:
            _prepare(pipe, running, config, resolution)
        # Jobs of different model-input sizes cannot share a UNet batch.
        groups: dict[tuple[int, int], list[_State]] = {}
        for st in running:
            groups.setdefault(st.model_size, []).append(st)
        total = sum(st.steps for st in running)
        bar = tqdm(total=total, desc="translate", unit="step", disable=not show_progress)
        done = 0
        embed = _PromptCache(pipe, config.guidance_scale > 1, prompt_cache)
        for size, group in groups.items():
            unet_limit = _batch_limit(pipe, ("unet", size, embed.cfg), config.batch_size)
            for k in range(n):
                active = [st for st in group if st.start <= k]
                for mode, members in feature_cache.step_groups(active, k, config.cache_interval):
                    step = functools.partial(_denoise_step, pipe, k=k, guidance_scale=config.guidance_scale,
                                             embed=embed, mode=mode)
                    for chunk, _ in fit_batches(members, unet_limit, step):
                        done += len(chunk)
                        bar.update(len(chunk))
                        if callback:
                            callback(done, total)
            feature_cache.release(group)
            vae_limit = _batch_limit(pipe, ("vae", size), config.batch_size)
            for chunk, images in fit_batches(group, vae_limit, lambda c: _decode(pipe, c)):
                for st, image in zip(chunk, images):
                    results[st.index] = Result(image, make_record(base, st, resolution))
        bar.close()
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- batches that fit the device
def is_out_of_memory(err: BaseException) -> bool:
    """True for an accelerator out-of-memory error (CUDA's OutOfMemoryError, MPS/XPU's RuntimeError)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


@dataclass
class BatchLimit:
    """The most jobs one model call may take; halved each time the device runs out of memory."""

    size: int      # current limit (>= 1)
    splits: int = 0  # how many times an out-of-memory error halved it


def _batch_limit(pipe, key: tuple, requested: int) -> BatchLimit:
    """The limit for one kind of call at one input size, kept on the pipeline so that later calls
    (the next synthesis batch) start from what fitted instead of running out of memory again."""
    limits = pipe.__dict__.setdefault("diffmix_batch_limits", {})
    key = (*key, str(pipe.device), str(pipe.unet.dtype))
    known = limits.get(key)
    if known is None or known.size > requested:
        known = limits[key] = BatchLimit(requested, known.splits if known else 0)
    return known


def fit_batches(items: list, limit: BatchLimit, run: Callable[[list], object]):
    """Run ``run`` over ``items`` in chunks of at most ``limit.size``, yielding (chunk, output).

    A chunk that raises out-of-memory is halved (and the limit with it) and retried; nothing
    has changed by then, because ``run`` fails inside the model call, before any state update,
    and each job draws its noise from its own generator, so the images are those of the unsplit
    run. One job that does not fit re-raises the error with what to do about it.
    """
    i = 0
    while i < len(items):
        chunk = items[i : i + limit.size]
        try:
            out = run(chunk)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            if len(chunk) == 1:
                err.add_note("diffmix: one job per model call does not fit this device's memory; "
                             "lower --resolution, use --dtype fp16, or free the device")
                raise
            limit.size = max(1, len(chunk) // 2)
            limit.splits += 1
            _release_cached_memory()
            continue
        yield chunk, out
        i += len(chunk)


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prepare(pipe, states: list[_State], config: TranslateConfig, resolution: int) -> None:
    """Per-job scheduler, start index and initial latents; one VAE encode per source image."""
    n = config.num_inference_steps
    template = copy.deepcopy(pipe.scheduler)
    template.set_timesteps(n, device=pipe.device)
    order = getattr(template, "order", 1)
    multiple = _size_multiple(pipe)
    dtype = pipe.unet.dtype
    encoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for st in states:
        sched = copy.deepcopy(template)
        source = st.job.source
        if source is None:   # text-to-image: pure noise over the whole schedule (StableDiffusionPipeline)
            st.steps, st.start = n, 0
            st.model_size = st.size = (resolution, resolution)
            shape = (1, pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor,
                     resolution // pipe.vae_scale_factor)
            st.latents = randn_tensor(shape, generator=st.generator, device=pipe.device, dtype=dtype)
            st.latents = st.latents * sched.init_noise_sigma
        else:
            st.steps = steps_run(n, st.job.strength)
            st.start = n - st.steps
            st.size = output_size(source.image.size)
            st.model_size = model_input_size(source.image.size, resolution, config.resize, multiple)
            key = (id(source), st.model_size)
            if key not in encoded:
                encoded[key] = _encode(pipe, source.image, st.model_size)
            mean, std = encoded[key]
            # Same draws, in the same order, as diffusers' prepare_latents with this job's generator.
            sample = mean + std * randn_tensor(mean.shape, generator=st.generator, device=mean.device, dtype=mean.dtype)
            init = pipe.vae.config.scaling_factor * sample
            noise = randn_tensor(init.shape, generator=st.generator, device=pipe.device, dtype=dtype)
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(st.start * order)
            t0 = template.timesteps[st.start * order : st.start * order + 1]
            st.latents = sched.add_noise(init, noise, t0)
        st.scheduler = sched
        st.extra = _step_kwargs(sched, st.generator)


def _encode(pipe, image: Image.Image, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of an image resized to ``size``; (1, 4, h/f, w/f) each."""
    image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
    x = pipe.image_processor.preprocess(image).to(device=pipe.device, dtype=pipe.vae.dtype)
    dist = pipe.vae.encode(x).latent_dist
    return dist.mean, dist.std


def _step_kwargs(scheduler, generator: torch.Generator) -> dict:
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _denoise_step(pipe, chunk: list[_State], k: int, guidance_scale: float, embed: _PromptCache,
                  mode: str = feature_cache.PLAIN) -> None:
    """One UNet call at grid index k for every job in ``chunk``, then each job's scheduler step.
    ``mode``: the whole UNet, or with the feature cache a full or shallow step (feature_cache)."""
    t = chunk[0].scheduler.timesteps[k * getattr(chunk[0].scheduler, "order", 1)]
    cfg = guidance_scale > 1
    latents = torch.cat([st.scheduler.scale_model_input(st.latents, t) for st in chunk])  # (B, 4, h, w)
    prompts = [embed(st.prompt_at(t)) for st in chunk]
    text = torch.cat([p[0] for p in prompts])                                                # (B, 77, D)
    if cfg:
        latents = torch.cat([latents, latents])
        text = torch.cat([torch.cat([p[1] for p in prompts]), text])                        # (2B, 77, D)
    noise = feature_cache.unet_call(pipe.unet, chunk, mode, latents, t, text)
    if cfg:
        uncond, cond = noise.chunk(2)
        noise = uncond + guidance_scale * (cond - uncond)
    for i, st in enumerate(chunk):
        st.latents = st.scheduler.step(noise[i : i + 1], t, st.latents, **st.extra, return_dict=False)[0]


def _decode(pipe, chunk: list[_State]) -> list[Image.Image]:
    latents = torch.cat([st.latents for st in chunk]) / pipe.vae.config.scaling_factor
    images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    images = pipe.image_processor.postprocess(images, output_type="pil")
    return [im if im.size == st.size else im.resize(st.size, Image.LANCZOS) for im, st in zip(images, chunk)]
