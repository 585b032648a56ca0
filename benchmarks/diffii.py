"""The cost of diff-ii on the demo world, side by side with diff-mix on the same images.

invert:    DDIM inversion of --images train images of the demo birds (200 steps by default,
           guidance 1, batched), cache empty: seconds per image.
diff-ii:   one image per source from the cached inversions (a partner of the same class,
           circle interpolation, 25 DDIM steps, the bundle's guidance): seconds per image.
diff-mix:  the same sources translated at s = 0.7 (17 of 25 steps) for comparison.
cached:    diff-ii again with the inversions read from the cache (what a second sweep pays).

Also prints the round-trip error of the inversion (invert, then DDIM-denoise at guidance 1 with
as many steps): latent MSE relative to the latent variance, and the PSNR of the decoded images.

    python benchmarks/diffii.py [--images 4] [--inversion-steps 200] [--device cuda --dtype fp16]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

from diffmix_core.apply import apply_bundle
from diffmix_core.bundle import load_bundle
from diffmix_core.config import DiffIIConfig, TranslateConfig
from diffmix_core.diffii import draw_partner
from diffmix_core.inversion import ddim_schedulers, encode_latents, invert_latents
from diffmix_core.models import load_pipeline
from diffmix_core.translate import Job, Source, translate

ROOT = Path(__file__).resolve().parents[1]


def sources(n: int) -> tuple[list[Source], list[Source]]:
    """n demo train images (one class after another) and the pool their partners come from."""
    birds = ROOT / "assets" / "demo" / "birds"
    pool = [Source(Image.open(p).convert("RGB"), p.parent.name, p.stem, str(p))
            for cls in ("owl", "duck") for p in sorted((birds / cls).glob("*.png"))[:max(2, n)]]
    return pool[:: max(1, len(pool) // n)][:n], pool


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def round_trip(pipe, bundle, src: Source, steps: int) -> tuple[float, float]:
    """(latent MSE / latent variance, PSNR in dB of the decoded images) of invert-then-denoise."""
    from diffusers import StableDiffusionPipeline

    with torch.inference_mode():
        z0 = encode_latents(pipe, src.image, bundle.resolution)
    prompt = bundle.prompt(src.source_class)
    zt = invert_latents(pipe, z0, [prompt], steps, 1.0, show_progress=False)
    _, forward = ddim_schedulers(pipe)
    back = StableDiffusionPipeline(**{**pipe.components, "scheduler": forward})(
        prompt=prompt, guidance_scale=1.0, height=bundle.resolution, width=bundle.resolution,
        num_inference_steps=steps, latents=zt, output_type="latent").images
    with torch.inference_mode():
        x, y = (pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.clamp(-1, 1) for z in (back, z0))
    return float(((back - z0) ** 2).mean() / z0.var()), 10 * math.log10(4 / float(((x - y) ** 2).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--inversion-steps", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    os.environ["DIFFMIX_OUTPUT"] = tempfile.mkdtemp(prefix="diffii-bench-")   # an empty inversion cache
    bundle = load_bundle(ROOT / "assets" / "demo" / "bundle")
    pipe = load_pipeline(bundle.base_model, device=args.device, dtype=args.dtype)
    apply_bundle(pipe, bundle)
    srcs, pool = sources(args.images)
    jobs = [Job(s, s.source_class, 0.3, i, partner=draw_partner(s, pool, i)) for i, s in enumerate(srcs)]
    guidance = bundle.profile.guidance_scale or 7.5
    settings = DiffIIConfig(inversion_steps=args.inversion_steps)
    config = TranslateConfig(strategy="diff-ii", guidance_scale=guidance, batch_size=len(jobs))
    n_inverted = len({s.pixel_hash() for j in jobs for s in (j.source, j.partner)})
    first = timed(lambda: translate(pipe, jobs, config, bundle=bundle, diff_ii=settings, show_progress=False))
    cached = timed(lambda: translate(pipe, jobs, config, bundle=bundle, diff_ii=settings, show_progress=False))
    mix_jobs = [Job(s, "parrot", 0.7, i) for i, s in enumerate(srcs)]
    mix = timed(lambda: translate(pipe, mix_jobs, TranslateConfig(guidance_scale=guidance, batch_size=len(jobs)),
                                  bundle=bundle, show_progress=False))
    invert = first - cached
    print(f"device {args.device} {args.dtype}, {torch.get_num_threads()} threads, {len(jobs)} images at "
          f"{bundle.resolution} px, guidance {guidance}")
    print(f"invert ({args.inversion_steps} steps): {invert / n_inverted:.2f} s per image ({n_inverted} images)")
    print(f"diff-ii (25 DDIM steps, inversions cached): {cached / len(jobs):.2f} s per image")
    print(f"diff-mix (s = 0.7, 17 steps): {mix / len(jobs):.2f} s per image")
    rel, psnr = round_trip(pipe, bundle, srcs[0], args.inversion_steps)
    print(f"round trip ({args.inversion_steps} steps, guidance 1): latent MSE / variance {rel:.2e}, "
          f"decoded PSNR {psnr:.1f} dB")


if __name__ == "__main__":
    main()
