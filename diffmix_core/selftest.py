"""``diffmix selftest``: the whole chain on a real architecture with random weights.

For a user checking a machine before spending GPU hours, and for CI. No weights
are downloaded: the shapes, parameter names, memory and speed of Stable Diffusion
do not depend on its weight values, so a random-weight pipeline of the real
architecture (models.random_pipeline_dir) proves the chain holds at that size:

1. model      build (once, cached) and save the random pipeline; load it through load_pipeline
2. dataset    a small ImageFolder dataset of smooth random images
3. finetune   a few steps of textual inversion + UNet LoRA at the paper's rank (finetune.finetune)
4. bundle     reload the written bundle and check it against the model
5. translate  a diff-mix batch through the engine, checked against diffusers' img2img
6. import     a checkpoint in the authors' format, with the real UNet's attention-processor
              key names, through authors.import_diffmix; its LoRA must change the output
7. synthesize a planned run (synthesize.synthesize) merged and exported (imagefolder + meta.csv)

Each stage prints its time and peak memory; the last line is ``selftest <arch>: ok`` or
names the failing stage. Every stage calls the library's own functions.
"""
from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import models
from .authors import import_diffmix
from .bundle import load_bundle
from .config import FinetuneConfig, SelftestConfig, SplitConfig, SynthesizeConfig, TranslateConfig
from .data import read_dataset, resolve_splits, split_subset
from .export import verify_manifest
from .finetune import finetune
from .models import (default_device, load_arch, load_pipeline, random_pipeline_dir, random_pipeline_name,
                     resolve_dtype, scheduler_name)
from .synthesize import make_plan, merge, plan_header, synthesize, write_plan
from .translate import Job, Source, _size_multiple, translate

CLASSES = ("duck", "owl")   # label order (sorted folder names); superclass "bird"; one inter-class pair
SUPERCLASS = "bird"
# Largest |engine - diffusers img2img| pixel difference (of 255) allowed per dtype: fp32 as the
# engine's own tests; half precision sums in a different order when jobs are batched.
TOLERANCE = {torch.float32: 2, torch.float16: 12, torch.bfloat16: 24}


@dataclass
class StageResult:
    name: str
    seconds: float
    peak_bytes: int | None      # peak memory of the stage (CUDA allocated, else process RSS)
    detail: str = ""


@dataclass
class _Run:
    """What the stages hand each other."""

    config: SelftestConfig
    work: Path
    device: str
    dtype: torch.dtype
    resolution: int = 0
    model_dir: Path | None = None
    pipe: object = None
    bundle: object = None
    sources: list = field(default_factory=list)


# --------------------------------------------------------------------------- memory
def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:   # Linux: writing 5 resets the process's peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak(device: str) -> int | None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource   # peak over the process's life where /proc is missing

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


# --------------------------------------------------------------------------- stages
def _stage_model(run: _Run) -> str:
    spec = load_arch(run.config.arch)
    run.resolution = run.config.resolution or int(spec.get("resolution") or 512)
    folder = models.CACHE_DIR / random_pipeline_name(run.config.arch)   # built once per architecture
    existed = folder.exists()
    run.model_dir = random_pipeline_dir(run.config.arch, folder)
    run.pipe = load_pipeline(run.model_dir, dtype=run.dtype, device=run.device)
    if not getattr(run.pipe, "diffmix_random", None):
        raise ValueError(f"{run.model_dir} does not carry the random-weights label")
    multiple = _size_multiple(run.pipe)
    if run.resolution % multiple:
        raise ValueError(f"resolution {run.resolution} must be a multiple of {multiple} for this architecture")
    n = {k: sum(p.numel() for p in getattr(run.pipe, k).parameters()) / 1e6 for k in ("unet", "text_encoder", "vae")}
    return (f"{'reused' if existed else 'built'} {run.model_dir} (RANDOM weights): UNet {n['unet']:.1f} M, "
            f"text encoder {n['text_encoder']:.1f} M (width {run.pipe.text_encoder.config.hidden_size}), "
            f"VAE {n['vae']:.1f} M params; {spec['scheduler'].get('prediction_type', 'epsilon')}; "
            f"{run.resolution} px, {str(run.dtype).removeprefix('torch.')} on {run.device}")


def smooth_image(seed: int, size: int) -> Image.Image:
    """A smooth random colour image (not flat, not pure noise)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)


def _stage_dataset(run: _Run) -> str:
    root = run.work / "data"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(run.config.images_per_class):
            smooth_image(100 * c + i, run.resolution).save(root / name / f"{name}_{i}.png")
    run.sources = [Source(Image.open(root / name / f"{name}_0.png").convert("RGB"), name, f"{name}_0",
                          str(root / name / f"{name}_0.png")) for name in CLASSES]
    return f"{len(CLASSES)} classes x {run.config.images_per_class} images at {run.resolution} px in {root}"


def _split_config():
    return SplitConfig(val_fraction=0.0, test_fraction=0.0)   # every image trains: the set is tiny


def _stage_finetune(run: _Run) -> str:
    run.pipe = None   # fine-tuning loads its own fp32 copy; free this one meanwhile
    _free(run.device)
    config = FinetuneConfig(superclass=SUPERCLASS, max_steps=run.config.finetune_steps, batch_size=2,
                            resolution=run.resolution, rank=run.config.rank, lora_alpha=float(run.config.rank),
                            checkpoint_every=0, sample_steps=0, num_workers=0)
    run.bundle = finetune(run.work / "data", run.model_dir, run.work / "bundle", config,
                          split_config=_split_config(), show_progress=False)
    return f"{config.max_steps} steps, TI + LoRA rank {config.rank}, batch {config.batch_size} -> {run.work / 'bundle'}"


def _stage_bundle(run: _Run) -> str:
    from safetensors.torch import load_file

    bundle = load_bundle(run.work / "bundle")
    if bundle.hash != run.bundle.hash or bundle.classes != CLASSES:
        raise ValueError(f"reloaded bundle differs: {bundle.classes} / {bundle.hash[:12]}")
    run.bundle = bundle
    run.pipe = load_pipeline(run.model_dir, dtype=run.dtype, device=run.device)
    lora = load_file(bundle.lora_file)
    want = 2 * len(_attention_projections(run.pipe.unet))
    if len(lora) != want or bundle.meta["lora"]["rank"] != run.config.rank:
        raise ValueError(f"bundle LoRA has {len(lora)} tensors of rank {bundle.meta['lora']['rank']}; "
                         f"the UNet's attention needs {want} of rank {run.config.rank}")
    width = {tuple(vector.shape) for token in bundle.tokens
             for vector in load_file(bundle.embedding_file(token)).values()}
    return (f"{len(bundle.tokens)} tokens {width}, {len(lora)} LoRA tensors (rank {run.config.rank}), "
            f"hash {bundle.hash[:12]}")


def _attention_projections(unet) -> dict[str, tuple[int, int]]:
    """{attention-processor name: ...} -> (in, out) features of each q/k/v/out projection, keyed
    the authors' way: '<...>.attn1.processor.to_q' (the real UNet's names)."""
    out = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for proj, layer in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
            weight = layer.weight   # (out, in); peft-wrapped layers expose the base weight
            out[f"{name}.{proj}"] = (weight.shape[1], weight.shape[0])
    return out


def _translate_config(run: _Run, strategy: str, batch_size: int):
    return TranslateConfig(strategy=strategy, num_inference_steps=run.config.num_inference_steps,
                           guidance_scale=7.5, resolution=run.resolution, batch_size=batch_size)


def _stage_translate(run: _Run) -> str:
    from diffusers import StableDiffusionImg2ImgPipeline

    jobs = [Job(src, CLASSES[1 - i], s, 10 * i + k) for i, src in enumerate(run.sources)
            for k, s in enumerate(run.config.strengths)]
    results = translate(run.pipe, jobs, _translate_config(run, "diff-mix", len(jobs)), bundle=run.bundle,
                        show_progress=False)
    img2img = StableDiffusionImg2ImgPipeline(**run.pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    worst = 0
    for job, res in zip(jobs, results):
        with torch.inference_mode():
            want = img2img(prompt=res.record["prompt"], image=job.source.image, strength=job.strength,
                           num_inference_steps=run.config.num_inference_steps, guidance_scale=7.5,
                           generator=torch.Generator("cpu").manual_seed(job.seed), output_type="np").images[0]
        got = np.asarray(res.image, np.float32)
        if got.shape != want.shape:
            raise ValueError(f"engine image {got.shape} != img2img {want.shape}")
        worst = max(worst, int(np.abs(got - np.round(want * 255)).max()))
    limit = TOLERANCE[run.dtype]
    if worst > limit:
        raise ValueError(f"engine and diffusers' img2img differ by {worst}/255 (> {limit}/255 for {run.dtype})")
    if len({r.image.tobytes() for r in results}) != len(results):
        raise ValueError("different jobs gave identical images")
    return (f"{len(jobs)} jobs (strengths {run.config.strengths}, {run.config.num_inference_steps} steps) "
            "in one batch; "
            f"max |engine - img2img| = {worst}/255 (limit {limit})")


def write_authors_checkpoint(folder: Path, unet, classes: tuple[str, ...], width: int, rank: int,
                             seed: int = 0) -> Path:
    """A checkpoint as the authors' training wrote it (docs/method.md §1), with random values:
    ``learned_embeds-steps-last.bin`` and ``pytorch_lora_weights.safetensors`` keyed by the UNet's
    attention processors (``...attn1.processor.to_q_lora.down.weight``). Returns the .bin path."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    lora = {}
    for key, (fan_in, fan_out) in _attention_projections(unet).items():
        lora[f"{key}_lora.down.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
        lora[f"{key}_lora.up.weight"] = torch.randn(fan_out, rank, generator=g) / rank ** 0.5
    n2p = {name: f"<class_{i}>" for i, name in enumerate(classes)}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"learned_embeds_dict": {p: torch.randn(width, generator=g) for p in n2p.values()},
                "name2placeholder": n2p, "placeholder2name": {p: n for n, p in n2p.items()}},
               folder / "learned_embeds-steps-last.bin")
    save_file(lora, folder / "pytorch_lora_weights.safetensors")
    return folder / "learned_embeds-steps-last.bin"


def _stage_import(run: _Run) -> str:
    width = run.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    emb = write_authors_checkpoint(run.work / "authors", run.pipe.unet, CLASSES, width, run.config.rank)
    bundle = import_diffmix(emb, emb.parent, base_model=str(run.model_dir), superclass=SUPERCLASS,
                            out_dir=run.work / "imported", resolution=run.resolution)
    ti_bundle = import_diffmix(emb, None, base_model=str(run.model_dir), superclass=SUPERCLASS,   # tokens alone
                               out_dir=run.work / "imported-ti", resolution=run.resolution)
    job = [Job(run.sources[0], CLASSES[1], max(run.config.strengths), 7)]
    with_lora = translate(run.pipe, job, _translate_config(run, "diff-mix", 1), bundle=bundle, show_progress=False)
    tokens_only = translate(run.pipe, job, _translate_config(run, "ti-mix", 1), bundle=ti_bundle, show_progress=False)
    diff = np.abs(np.asarray(with_lora[0].image, np.int16) - np.asarray(tokens_only[0].image, np.int16)).mean()
    if diff == 0:
        raise ValueError("the imported LoRA does not change the output")
    keys = 2 * len(_attention_projections(run.pipe.unet))
    return (f"{keys} attention-processor LoRA keys + {len(CLASSES)} embeddings imported; "
            f"LoRA changes pixels by {diff:.1f}/255 on average")


def _stage_synthesize(run: _Run) -> str:
    data = read_dataset(run.work / "data", show_progress=False)
    train = split_subset(data, resolve_splits(data, None, _split_config()), "train")
    sconfig = SynthesizeConfig(multiplier=run.config.synth_images / len(train), strength=0.7)
    tconfig = _translate_config(run, "diff-mix", run.config.synth_images)
    jobs = make_plan(train, sconfig, tconfig.strategy)
    out = run.work / "synthetic"
    header = plan_header(sconfig, tconfig, train, split_file=None, bundle_hash=run.bundle.hash,
                         base_model=str(run.model_dir), scheduler=scheduler_name(run.pipe.scheduler),
                         num_jobs=len(jobs))
    plan = write_plan(out, header, jobs)
    made = synthesize(run.pipe, plan, out, tconfig, bundle=run.bundle, show_progress=False)
    merged = merge(out, plan, export=("imagefolder", "authors"), show_progress=False)
    pngs = sorted((out / "export").rglob("*.png"))
    if merged["kept"] != len(jobs) or not pngs or not any((out / "export").rglob("meta.csv")):
        raise ValueError(f"synthesis kept {merged['kept']} of {len(jobs)}; export holds {len(pngs)} PNGs")
    problems = verify_manifest(out / "export") if (out / "export" / "manifest.json").exists() else []
    if problems:
        raise ValueError(f"export manifest does not verify: {problems[:3]}")
    rate = f", {made['images_per_s']:.3f} img/s" if made["images_per_s"] else ""
    return f"{made['made']} images (s = 0.7){rate}; exported {len(pngs)} PNGs to {out / 'export'}"


STAGES: list[tuple[str, Callable[[_Run], str]]] = [
    ("model", _stage_model), ("dataset", _stage_dataset), ("finetune", _stage_finetune),
    ("bundle", _stage_bundle), ("translate", _stage_translate), ("import", _stage_import),
    ("synthesize", _stage_synthesize),
]


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def selftest(config: SelftestConfig, *, work: str | Path | None = None, keep: bool = False,
             log: Callable[[str], None] = print) -> tuple[bool, list[StageResult]]:
    """Run every stage; returns (ok, per-stage results). Prints as it goes through ``log``.

    Args:
        config: the architecture, resolution, device, dtype and sizes of the run.
        work: folder for the dataset, bundles and images (default: a temporary one).
        keep: leave ``work`` in place (a temporary one is removed otherwise).
    """
    name = load_arch(config.arch)["name"]
    device = config.device or default_device()
    dtype = resolve_dtype(config.dtype or ("fp16" if device.startswith("cuda") else "fp32"))
    tmp = work is None
    root = Path(tempfile.mkdtemp(prefix=f"diffmix-selftest-{name}-")) if tmp else Path(work)
    root.mkdir(parents=True, exist_ok=True)
    run = _Run(config, root, device, dtype)
    results: list[StageResult] = []
    log(f"selftest {name}: random weights of the real architecture; work folder {root}")
    failed = None
    try:
        for stage, fn in STAGES:
            _free(device)
            _reset_peak(device)
            start = time.perf_counter()
            try:
                detail = fn(run)
            except Exception as err:   # the report names the stage; the traceback helps fix it
                traceback.print_exc()
                failed = f"{stage}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                break
            res = StageResult(stage, time.perf_counter() - start, _peak(device), detail)
            results.append(res)
            log(f"  {stage:<10} {res.seconds:8.1f} s   peak {_gib(res.peak_bytes):>10}   {detail}")
    finally:
        run.pipe = None
        _free(device)
        if tmp and not keep:
            shutil.rmtree(root, ignore_errors=True)
    total = sum(r.seconds for r in results)
    summary = {"arch": name, "device": device, "dtype": str(dtype).removeprefix("torch."), "resolution": run.resolution,
               "ok": failed is None, "failed": failed, "seconds": round(total, 1),
               "stages": [{"stage": r.name, "seconds": round(r.seconds, 2), "peak_bytes": r.peak_bytes}
                          for r in results]}
    if not tmp or keep:
        (root / "selftest.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"  total      {total:8.1f} s")
    log(f"selftest {name}: ok" if failed is None else f"selftest {name}: FAILED at {failed}")
    return failed is None, results
