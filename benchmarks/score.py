"""Scoring cost against generation cost for one strength sweep.

Generates one sweep (4 strengths x 4 seeds, one source, one target) with the
engine, writes it as `diffmix translate` does, then scores it the way
`diffmix score` does (reference classifier + CLIP + distance + SSIM + Vendi +
recommendation). Prints images/s of scoring, both wall times, and last
`ratio: X.XX` = scoring time / generation time (target <= 0.2). Model loading
is excluded from both; both are warmed up first. The plot (PNG + SVG) is timed
separately: the app draws it once per sweep, not per image.

Defaults are tiny and offline: the tiny SD pipeline at 32 px, timm's test_resnet
as the reference at 32 px, a tiny random open_clip model. For real models:

    python benchmarks/score.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --dtype fp16 \
        --reference-model tf_efficientnet_lite0 --reference-size 224 \
        --clip-model ViT-B-32 --clip-pretrained openai
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm
import torch

from diffmix_core.classifier import model_mean_std
from diffmix_core.config import ScoreConfig, TranslateConfig
from diffmix_core.models import default_device, load_pipeline, tiny_pipeline_dir
from diffmix_core.records import read_jsonl, save_png, write_jsonl_atomic
from diffmix_core.reference import ReferenceClassifier
from diffmix_core.scoring import (load_clip, plot_sweep, save_figure, score_records, summarize, tiny_clip_dir)
from diffmix_core.translate import Job, Source, translate

from benchmarks.sweep import source_image  # the same source image as the sweep benchmark

STRENGTHS = (0.25, 0.5, 0.75, 1.0)
SEEDS = (0, 1, 2, 3)




def generate(pipe, folder: Path, config: TranslateConfig, size: int) -> float:
    """One sweep through the engine; returns its wall time; writes PNGs + records.jsonl."""
    image = source_image(size)
    image.save(folder / "source.png")
    src = Source(image, "duck", "bench", str(folder / "source.png"))
    jobs = [Job(src, "owl", s, seed) for s in STRENGTHS for seed in SEEDS]
    translate(pipe, jobs[:1], config, superclass="bird", show_progress=False)   # warm-up
    t = time.perf_counter()
    results = translate(pipe, jobs, config, superclass="bird", show_progress=False)
    elapsed = time.perf_counter() - t
    records = []
    for i, res in enumerate(results):
        res.record["file_name"] = f"{i:03d}.png"
        save_png(res.image, folder / res.record["file_name"], res.record)
        records.append(res.record)
    write_jsonl_atomic(folder / "records.jsonl", records)
    return elapsed


def reference_model(name: str, size: int, device: str) -> ReferenceClassifier:
    """An untrained classifier of the real size (timing only; its probabilities mean nothing)."""
    model = timm.create_model(name, pretrained=False, num_classes=2).eval().to(device)
    mean, std = model_mean_std(model)
    return ReferenceClassifier(model, name, ("duck", "owl"), size, mean, std)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="base pipeline (Hub id or folder); default: the tiny offline one")
    p.add_argument("--dtype", default=None)
    p.add_argument("--steps", type=int, default=25, help="scheduler steps N (paper: 25)")
    p.add_argument("--size", type=int, default=0, help="source image side (default: the model's resolution)")
    p.add_argument("--reference-model", default="test_resnet")
    p.add_argument("--reference-size", type=int, default=32)
    p.add_argument("--clip-model", default="", help="open_clip model (default: a tiny random local-dir one)")
    p.add_argument("--clip-pretrained", default="")
    p.add_argument("--batch-size", type=int, default=ScoreConfig.batch_size)
    args = p.parse_args()
    device = default_device()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or str(tiny_pipeline_dir(tmp / "tiny-sd"))
        pipe = load_pipeline(model, dtype=args.dtype, device=device)
        size = args.size or int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
        config = TranslateConfig(strategy="real-mix", num_inference_steps=args.steps, batch_size=16)
        (tmp / "sweep").mkdir()
        gen_time = generate(pipe, tmp / "sweep", config, size)
        del pipe
        clip_name = args.clip_model or f"local-dir:{tiny_clip_dir(tmp / 'tiny-clip')}"
        clip = load_clip(clip_name, args.clip_pretrained, device=device)
        reference = reference_model(args.reference_model, args.reference_size, device)
        records = read_jsonl(tmp / "sweep" / "records.jsonl")
        score_cfg = ScoreConfig(batch_size=args.batch_size)
        score_records(records[:2], tmp / "sweep", reference=reference, clip=clip, config=score_cfg,
                      show_progress=False)   # warm-up
        t = time.perf_counter()
        scores, embs, info = score_records(records, tmp / "sweep", reference=reference, clip=clip,
                                           config=score_cfg, show_progress=False)
        for rec, s in zip(records, scores):
            rec["scores"] = s
        summary = summarize(records, embs, score_cfg, **info)
        score_time = time.perf_counter() - t
        t = time.perf_counter()
        save_figure(plot_sweep(summary), tmp / "plot")
        plot_time = time.perf_counter() - t
    n = len(records)
    print(f"device: {device}; base: {args.model or 'tiny (32 px)'}; {len(STRENGTHS)} strengths x {len(SEEDS)} seeds, "
          f"{args.steps} steps; reference {args.reference_model}@{args.reference_size}; {clip.status}")
    print(f"generation: {gen_time:.3f} s ({n / gen_time:.1f} images/s)")
    print(f"scoring:    {score_time:.3f} s ({n / score_time:.1f} images/s); recommended strength "
          f"{summary['recommended_strength']}")
    print(f"plot (png+svg, once per sweep, not in the ratio): {plot_time:.3f} s")
    print(f"ratio: {score_time / gen_time:.2f}")


if __name__ == "__main__":
    main()
