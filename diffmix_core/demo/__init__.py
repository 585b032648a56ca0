"""The offline worlds the app can start on.

The app starts on the trained demo world shipped in ``assets/demo`` (demo/world.py builds
it). Only when no bundle is found at all (``assets/demo`` removed and nothing under
DIFFMIX_BUNDLES) does it fall back to a *placeholder*: a tiny SD-architecture pipeline with
random weights and a bundle of random class tokens + LoRA for ten bird classes, built on
first use. Every code path of the real thing runs on it; the images are noise, and the app
says so. Tests use it as a fast stand-in.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..bundle import load_bundle, save_bundle
from ..models import CACHE_DIR, load_pipeline, tiny_pipeline_dir
from ..records import safe_name, save_png
from ..weights import lora_state_dict_from_unet

DEMO_CLASSES = ("owl", "duck", "peacock", "penguin", "flamingo", "turkey", "rooster", "parrot", "goose", "crow")
PLACEHOLDER_NOTE = ("Offline placeholder: a tiny Stable-Diffusion-architecture pipeline with RANDOM weights. "
                    "Every stage runs for real, but the images are noise until a trained bundle is loaded.")


def placeholder_bundle(root: str | os.PathLike | None = None, seed: int = 0):
    """Build (once) and return the placeholder bundle on the tiny random pipeline."""
    from peft import LoraConfig

    root = Path(root or CACHE_DIR / "placeholder-2")
    bundle_dir = root / "bundle"
    if (bundle_dir / "adapter.json").exists():
        return load_bundle(bundle_dir)
    write_example_images(bundle_dir / "examples", DEMO_CLASSES[:4])
    model_dir = tiny_pipeline_dir(root / "tiny-sd", seed=seed)
    pipe = load_pipeline(model_dir, device="cpu", dtype="fp32")
    gen = torch.Generator().manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    tokens = [f"<class_{i}>" for i in range(len(DEMO_CLASSES))]
    embeddings = {t: torch.randn(width, generator=gen) * 0.02 for t in tokens}
    return save_bundle(bundle_dir, classes=DEMO_CLASSES, tokens=tokens, embeddings=embeddings,
                       lora_state_dict=lora_state_dict_from_unet(pipe.unet), base_model=str(model_dir),
                       superclass="bird", resolution=32, training={"note": PLACEHOLDER_NOTE},
                       extra={"examples": "examples"})


def write_example_images(folder: str | os.PathLike, classes, per_class: int = 2, size: int = 32) -> Path:
    """Small coloured-shape PNGs in ImageFolder layout (``<folder>/<class>/<n>.png``): the
    placeholder's example sources (one colour per class, a shape per image)."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    for c, name in enumerate(classes):
        hue = (c * 67) % 256
        for n in range(per_class):
            im = Image.new("RGB", (size, size), (240, 240, 230))
            draw = ImageDraw.Draw(im)
            box = (4 + 2 * n, 6, size - 6, size - 4 - 2 * n)
            colour = (hue, 255 - hue, (hue * 3) % 256)
            (draw.ellipse if n % 2 == 0 else draw.rectangle)(box, fill=colour)
            save_png(im, folder / safe_name(name) / f"{n}.png")
    return folder


def is_placeholder(bundle) -> bool:
    return bundle.meta.get("training", {}).get("note") == PLACEHOLDER_NOTE
