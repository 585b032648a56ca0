"""One strength sweep, two ways, same pipeline, same run.

engine:  diffmix's translate(): all 16 jobs (4 strengths x 4 seeds) share one
         denoising loop, batched through the UNet at each grid index.
loop:    the straightforward way (a hand-written loop or an X/Y/Z grid): one
         diffusers StableDiffusionImg2ImgPipeline call per strength, seeds batched.

Prints both wall times (best of --repeats), the engine's efficiency, and, last,
`speedup: X.XX`. Tiny offline pipeline by default; --model for a real one (Hub id or folder).

efficiency = (UNet rows of the sweep x the best time per UNet row measured at any batch
size) / engine time. Where one batch already fills the device (a CPU), the engine and the
loop run the same rows at the same cost, so the speedup over the loop is near 1 by
construction; the efficiency says how close the engine comes to pure UNet time (target >= 0.9).

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
from diffmix_core.labels import steps_run
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


def sweep_unet_rows(num_inference_steps: int, guidance_scale: float) -> int:
    """UNet rows (batch entries) of one sweep: each job runs floor(N*s) steps, 2 rows with CFG."""
    per_job = sum(steps_run(num_inference_steps, s) for s in STRENGTHS) * len(SEEDS)
    return per_job * (2 if guidance_scale > 1 else 1)


def best_row_time(pipe, resolution: int, batch_sizes=(2, 4, 8, 16, 32), repeats: int = 3) -> tuple[float, dict]:
    """The least seconds per UNet row over ``batch_sizes`` (rows per call), and the per-size figures."""
    unet, f = pipe.unet, pipe.vae_scale_factor
    text_dim = unet.config.cross_attention_dim
    per_row = {}
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for b in batch_sizes:
            x = torch.randn(b, unet.config.in_channels, resolution // f, resolution // f, device=pipe.device,
                            dtype=unet.dtype)
            text = torch.randn(b, 77, text_dim, device=pipe.device, dtype=unet.dtype)
            t = torch.tensor(500, device=pipe.device)
            unet(x, t, encoder_hidden_states=text)   # warm-up
            best = float("inf")
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                unet(x, t, encoder_hidden_states=text)
                sync()
                best = min(best, time.perf_counter() - start)
            per_row[b] = best / b
    return min(per_row.values()), per_row


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
    rows = sweep_unet_rows(args.steps, config.guidance_scale)
    row_time, per_row = best_row_time(pipe, model_resolution(pipe, config), repeats=args.repeats)
    device = pipe.device
    print(f"model: {args.model or 'tiny offline pipeline (random weights)'} on {device}, "
          f"dtype {pipe.unet.dtype}, threads {torch.get_num_threads()}, {os.cpu_count()} cpus "
          f"(load average {os.getloadavg()[0]:.1f}: a shared machine slows both paths alike)")
    print(f"sweep: strengths {STRENGTHS} x seeds {SEEDS}, {args.steps} steps, guidance {config.guidance_scale}")
    print(f"engine (one batched loop): {engine:.3f} s")
    print(f"loop (one img2img call per strength): {loop:.3f} s")
    print("UNet time per row by rows per call: " + ", ".join(f"{b}: {t * 1e3:.2f} ms" for b, t in per_row.items()))
    print(f"efficiency: {rows} UNet rows x {row_time * 1e3:.2f} ms best per row / {engine:.3f} s engine = "
          f"{rows * row_time / engine:.2f}")
    print(f"speedup: {loop / engine:.2f}")


if __name__ == "__main__":
    main()
