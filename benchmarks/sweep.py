"""One strength sweep, two ways, same pipeline, same run.

engine:  diffmix's translate(): all 16 jobs (4 strengths x 4 seeds) share one
         denoising loop, batched through the UNet at each grid index.
loop:    the straightforward way (a hand-written loop or an X/Y/Z grid): one
         diffusers StableDiffusionImg2ImgPipeline call per strength, seeds batched.

Prints both wall times (best of --repeats) and, last, `speedup: X.XX`.
Tiny offline pipeline by default; --model for a real one (Hub id or folder).

    python benchmarks/sweep.py [--model stable-diffusion-v1-5/stable-diffusion-v1-5 --dtype fp16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from diffmix_core.config import TranslateConfig
from diffmix_core.models import load_pipeline, tiny_pipeline_dir
from diffmix_core.translate import Job, Source, model_resolution, translate

STRENGTHS = (0.3, 0.5, 0.7, 0.9)
SEEDS = (0, 1, 2, 3)


def source_image(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)


def run_engine(pipe, image, config: TranslateConfig) -> float:
    src = Source(image, "duck", "bench")
    jobs = [Job(src, "owl", s, seed) for s in STRENGTHS for seed in SEEDS]
    t = time.perf_counter()
    translate(pipe, jobs, config, superclass="bird", show_progress=False)
    return time.perf_counter() - t


def run_loop(pipe, image, config: TranslateConfig, prompt: str) -> float:
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    for s in STRENGTHS:
        img2img(prompt=[prompt] * len(SEEDS), image=[image] * len(SEEDS), strength=s,
                num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in SEEDS])
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hub id or diffusers folder (default: the tiny offline pipeline)")
    parser.add_argument("--dtype", default=None, help="fp16 / bf16 / fp32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="engine jobs per UNet call")
    args = parser.parse_args()

    model = args.model or str(tiny_pipeline_dir())
    pipe = load_pipeline(model, dtype=args.dtype, device=args.device)
    config = TranslateConfig(strategy="real-mix", num_inference_steps=args.steps, batch_size=args.batch_size)
    image = source_image(model_resolution(pipe, config))
    prompt = translate(pipe, [Job(Source(image, "duck", "w"), "owl", 0.0, 0)], config, superclass="bird",
                       show_progress=False)[0].record["prompt"]
    run_engine(pipe, image, config)           # warm-up both paths
    run_loop(pipe, image, config, prompt)
    engine = min(run_engine(pipe, image, config) for _ in range(args.repeats))
    loop = min(run_loop(pipe, image, config, prompt) for _ in range(args.repeats))
    device = pipe.device
    print(f"model: {args.model or 'tiny offline pipeline (random weights)'} on {device}, "
          f"dtype {pipe.unet.dtype}, threads {torch.get_num_threads()}, {os.cpu_count()} cpus")
    print(f"sweep: strengths {STRENGTHS} x seeds {SEEDS}, {args.steps} steps, guidance {config.guidance_scale}")
    print(f"engine (one batched loop): {engine:.3f} s")
    print(f"loop (one img2img call per strength): {loop:.3f} s")
    print(f"speedup: {loop / engine:.2f}")


if __name__ == "__main__":
    main()
