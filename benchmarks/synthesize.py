"""Images/s of `diffmix synthesize` versus the authors' per-image loop.

Both make the same planned jobs (sources, targets, strengths, seeds) on the same
pipeline and write one PNG per image. The baseline calls diffusers'
StableDiffusionImg2ImgPipeline once per job at batch size 1, as the authors'
sampler does; synthesize (the library's whole run, synthesize.run_synthesis:
plan, batched engine calls with PNGs written on a thread, merge) batches jobs
with different strengths and targets through the engine.

    .venv/bin/python benchmarks/synthesize.py                 # tiny random pipeline, CPU
    .venv/bin/python benchmarks/synthesize.py --model DIR --device cuda --images 64 --batch-size 16

The last line is ``speedup: X.XX``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from diffmix_core.bundle import make_prompt  # noqa: E402
from diffmix_core.config import PipelineConfig, SynthesizeConfig, TranslateConfig  # noqa: E402
from diffmix_core.data import load_image, read_dataset, resolve_splits, split_subset  # noqa: E402
from diffmix_core.models import load_pipeline, tiny_pipeline_dir  # noqa: E402
from diffmix_core.records import save_png  # noqa: E402
from diffmix_core.synthesize import make_plan, run_synthesis  # noqa: E402

COLOURS = [(220, 40, 40), (40, 190, 60), (40, 60, 220), (200, 180, 40)]


def make_dataset(root: Path, size: int, per_class: int = 5) -> Path:
    for k, colour in enumerate(COLOURS):
        folder = root / f"shape_{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            im = Image.new("RGB", (size, size), (250 - 15 * i, 245, 240))
            ImageDraw.Draw(im).ellipse([size // 8 + i, size // 8, size - size // 8, size - size // 8 - i], fill=colour)
            im.save(folder / f"{i}.png")
    return root


def per_image_loop(pipe, jobs, config: TranslateConfig, superclass: str, out: Path, resolution: int) -> None:
    """The authors' way: one img2img call per job, batch size 1, then write the PNG."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    for job in jobs:
        source = load_image(job.source_path)
        image = img2img(prompt=make_prompt(job.target_class, superclass), image=source.resize((resolution,) * 2),
                        strength=job.strength, num_inference_steps=config.num_inference_steps,
                        guidance_scale=config.guidance_scale,
                        generator=torch.Generator("cpu").manual_seed(job.seed)).images[0]
        save_png(image.resize(source.size), out / f"{job.idx:06d}.png", {"idx": job.idx})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder or Hub id (default: the tiny random pipeline)")
    ap.add_argument("--images", type=int, default=24, help="jobs to make with each method (default: 24)")
    ap.add_argument("--steps", type=int, default=25, help="scheduler steps N (default: 25, the paper's)")
    ap.add_argument("--batch-size", type=int, default=8, help="synthesize's jobs per UNet call (default: 8)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed runs of each; best kept (default: 3)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()

    model = args.model or str(tiny_pipeline_dir())
    pipe = load_pipeline(model, device=args.device, dtype=args.dtype)
    resolution = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    config = TranslateConfig(strategy="real-mix", num_inference_steps=args.steps, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = read_dataset(make_dataset(tmp / "data", resolution), show_progress=False)
        train = split_subset(dataset, resolve_splits(dataset, tmp / "split.json"), "train")
        plan_config = SynthesizeConfig(multiplier=args.images / len(train), strength_strategy="uniform", seed=1)
        warm_config = dataclasses.replace(plan_config, multiplier=4 / len(train), seed=2)
        timed = make_plan(train, plan_config, "real-mix")   # the jobs run_synthesis plans from the same config
        assert len(timed) == args.images
        device = pipe.device.type

        def sync() -> None:
            if device == "cuda":
                torch.cuda.synchronize()

        def run(sconfig: SynthesizeConfig, out: Path) -> None:
            run_synthesis(train, out, sconfig, config, PipelineConfig(model=model), split_file=tmp / "split.json",
                          superclass="shape", shard=(0, 1), pipe=pipe, show_progress=False)

        # Warm-up (allocator, kernels, lazy imports) for both methods, outside the timings.
        per_image_loop(pipe, make_plan(train, warm_config, "real-mix"), config, "shape", tmp / "warm-loop", resolution)
        run(warm_config, tmp / "warm-synth")
        loop_times, synth_times = [], []
        for r in range(args.repeats):   # alternate, keep the best of each: robust to a busy shared machine
            sync()
            t0 = time.perf_counter()
            per_image_loop(pipe, timed, config, "shape", tmp / f"loop{r}", resolution)
            sync()
            loop_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run(plan_config, tmp / f"synth{r}")
            sync()
            synth_times.append(time.perf_counter() - t0)
            assert len(list((tmp / f"synth{r}" / "images").glob("*.png"))) == len(timed)
        loop_s, synth_s = min(loop_times), min(synth_times)
    n = len(timed)
    print(f"model: {model} ({resolution} px, {pipe.unet.dtype}, {pipe.device}), {n} jobs, {args.steps} steps, "
          f"strengths uniform over {plan_config.strengths}, batch size {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads, best of {args.repeats}")
    print(f"per-image img2img loop: {n / loop_s:.2f} img/s ({loop_s:.1f} s)")
    print(f"diffmix synthesize:     {n / synth_s:.2f} img/s ({synth_s:.1f} s)")
    print(f"speedup: {loop_s / synth_s:.2f}")


if __name__ == "__main__":
    main()
