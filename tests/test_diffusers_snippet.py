"""Adapters usable outside diffmix: the documented plain-diffusers snippet (docs/diffusers.md,
also in every pushed model card) loads a bundle's LoRA and class tokens with
load_lora_weights / load_textual_inversion and reproduces diffmix's translation."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "diffusers.md"
BUNDLE = "assets/demo/bundle"
SOURCE = "assets/demo/bundle/examples/owl/owl-0004.png"

pytestmark = pytest.mark.skipif(not (ROOT / BUNDLE / "adapter.json").is_file(), reason="the demo world is not here")


def documented_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, f"{DOC} has no python block"
    return blocks[0]


def test_doc_is_the_snippet_the_model_card_uses():
    from diffmix_core.bundle import load_bundle
    from diffmix_core.hub import diffusers_snippet

    bundle = load_bundle(ROOT / BUNDLE)
    assert documented_snippet() == diffusers_snippet(bundle, bundle_dir=BUNDLE, source=SOURCE, source_class="owl")


def test_plain_diffusers_reproduces_the_diffmix_translation(monkeypatch):

    from diffmix_core.bundle import load_bundle
    from diffmix_core.config import TranslateConfig
    from diffmix_core.data import load_image
    from diffmix_core.models import load_pipeline
    from diffmix_core.translate import Job, Source, translate

    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(documented_snippet(), str(DOC), "exec"), scope)   # noqa: S102 (our own documentation)
    plain = np.asarray(scope["image"], dtype=np.int16)

    bundle = load_bundle(BUNDLE)
    pipe = load_pipeline(bundle.base_model, device="cpu", dtype="fp32")
    config = TranslateConfig(strategy="diff-mix", num_inference_steps=scope["steps"], guidance_scale=scope["guidance"],
                             resolution=bundle.resolution)
    job = Job(Source(load_image(SOURCE), "owl", "owl-0004"), scope["target_class"], scope["strength"], scope["seed"])
    [result] = translate(pipe, [job], config, bundle=bundle, show_progress=False)
    ours = np.asarray(result.image, dtype=np.int16)
    assert ours.shape == plain.shape
    # One job on the CPU: the engine runs exactly diffusers' computation, so every pixel is equal
    # (batches of many jobs agree to within 2/255: tests/test_translate.py).
    assert np.array_equal(ours, plain), f"max pixel difference {np.abs(ours - plain).max()}"
    assert scope["prompt"] == bundle.prompt(scope["target_class"])
