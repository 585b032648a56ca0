"""The demo CLIP (issue 19): contrastive training on demo-like data, resuming, the open_clip folder
it writes, loading through scoring.load_clip, the bundle naming it, and the default-CLIP choice."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmix_core.config import DemoClipConfig
from diffmix_core.demo.clip import (CLIP_LABEL, CONFIG_FILE, LOG, WEIGHTS_FILE, WORK, attach_clip, contrastive_loss,
                                    is_trained, spearman, train_clip, zero_shot_accuracy)
from diffmix_core.scoring import default_clip, load_clip
from helpers import disc

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = {"owl": (200, 40, 40), "duck": (40, 170, 60), "crow": (40, 60, 210)}
TINY = DemoClipConfig(embed_dim=16, image_size=32, vision_width=32, vision_layers=1, text_width=32, text_layers=1,
                      steps=4, batch_size=12, warmup_steps=1, checkpoint_every=2, pretrain_birds=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A demo-like data folder: birds/<class>/*.png (3 classes x 10 coloured discs)."""
    root = tmp_path_factory.mktemp("clipdata")
    for k, (name, colour) in enumerate(COLOURS.items()):
        (root / "birds" / name).mkdir(parents=True)
        for i in range(10):
            disc(colour, 100 * k + i).save(root / "birds" / name / f"{name}-{i:04d}.png")
    return root


def test_contrastive_loss_prefers_the_matching_class():
    labels = torch.tensor([0, 0, 1, 1])
    text = torch.eye(2, 8)
    right = contrastive_loss(torch.eye(2, 8)[labels], text, labels, torch.tensor([0, 1]), torch.tensor(np.log(10.0)))
    wrong = contrastive_loss(torch.eye(2, 8)[1 - labels], text, labels, torch.tensor([0, 1]), torch.tensor(np.log(10.0)))
    assert right < 0.5 < wrong
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_train_resume_save_and_load_through_load_clip(data, tmp_path, monkeypatch):
    out = tmp_path / "clip"
    half = DemoClipConfig(**{**TINY.__dict__, "steps": 2})
    train_clip(data, out, TINY, show_progress=False)
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["label"] == CLIP_LABEL and cfg["model_cfg"]["text_cfg"]["vocab_size"] == 49408
    assert cfg["model_cfg"]["text_cfg"]["context_length"] == 77 and cfg["diffmix"]["train_images"] == 21
    assert is_trained(out, TINY) and not is_trained(out, half)
    log = [json.loads(line) for line in (out / WORK / LOG).read_text().splitlines()]
    assert log[-1]["step"] == 4
    clip = load_clip(f"local-dir:{out}", device="cpu")       # open_clip's own loader, safetensors weights
    assert clip.available, clip.reason
    assert clip.name == CLIP_LABEL and clip.status == f"CLIP: {CLIP_LABEL}"
    emb = clip.encode_images([disc(c, 7) for c in COLOURS.values()])
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-4)
    acc = zero_shot_accuracy(clip, [disc(c, 9) for c in COLOURS.values()], list(COLOURS),
                             {c: f"a photo of a {c} bird" for c in COLOURS})
    assert acc["n"] == 3 and 0 <= acc["accuracy"] <= 1
    # a finished CLIP of the same settings is kept: nothing is read or trained again
    import diffmix_core.demo.clip as demo_clip

    monkeypatch.setattr(demo_clip, "training_images", lambda *a, **k: pytest.fail("retrained a finished CLIP"))
    assert train_clip(data, out, TINY, show_progress=False) == out


def test_resumed_training_continues_from_the_checkpoint(data, tmp_path, monkeypatch):
    """Stop after the step-2 checkpoint; the rerun starts at step 2 and ends at the same weights."""
    import diffmix_core.demo.clip as demo_clip

    straight = train_clip(data, tmp_path / "straight", TINY, show_progress=False)
    out = tmp_path / "resumed"
    monkeypatch.setattr(demo_clip, "contrastive_loss", _stop_at(demo_clip.contrastive_loss, 3))
    with pytest.raises(KeyboardInterrupt):
        train_clip(data, out, TINY, show_progress=False)
    assert json.loads((out / WORK / "state.json").read_text())["step"] == 2 and not (out / CONFIG_FILE).exists()
    monkeypatch.undo()
    train_clip(data, out, TINY, show_progress=False)
    from safetensors.torch import load_file

    a, b = load_file(str(straight / WEIGHTS_FILE)), load_file(str(out / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def _stop_at(fn, n_calls: int):
    count = {"n": 0}

    def wrapped(*a, **k):
        count["n"] += 1
        if count["n"] == n_calls:
            raise KeyboardInterrupt
        return fn(*a, **k)

    return wrapped


def test_the_bundle_names_its_clip_and_default_clip_uses_it(data, tmp_path, monkeypatch):
    from diffmix_core.bundle import load_bundle
    from diffmix_core.demo import placeholder_bundle

    clip_dir = train_clip(data, tmp_path / "clip", TINY, show_progress=False)
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(placeholder_bundle(tmp_path / "ph").path, bundle_dir)
    monkeypatch.delenv("DIFFMIX_CLIP_MODEL", raising=False)
    monkeypatch.delenv("DIFFMIX_CLIP_PRETRAINED", raising=False)
    assert default_clip(load_bundle(bundle_dir)) == ("ViT-B-32", "openai")   # names none: OpenAI's
    assert default_clip(None) == ("ViT-B-32", "openai")
    bundle = attach_clip(bundle_dir, clip_dir)
    assert bundle.meta["clip"] == "clip" and "clip/open_clip_model.safetensors" in bundle.meta["files"]
    model, pretrained = default_clip(bundle)
    assert model == f"local-dir:{(bundle_dir / 'clip').resolve()}" and pretrained == ""
    clip = load_clip(model, pretrained, device="cpu")
    assert clip.available and clip.name == CLIP_LABEL
    stored = json.loads((bundle_dir / "clip" / CONFIG_FILE).read_text())["diffmix"]["stored_dtype"]
    assert stored == "float16"
    monkeypatch.setenv("DIFFMIX_CLIP_MODEL", "none")                      # the environment still chooses
    assert default_clip(bundle) == ("none", "openai")
    monkeypatch.setenv("DIFFMIX_CLIP_MODEL", "ViT-B-16")
    monkeypatch.setenv("DIFFMIX_CLIP_PRETRAINED", "laion2b_s34b_b88k")
    assert default_clip(bundle) == ("ViT-B-16", "laion2b_s34b_b88k")
    # the CLIP's files are part of the bundle: a changed weight file is refused
    weights = bundle_dir / "clip" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="changed or corrupted"):
        load_bundle(bundle_dir)


def test_attach_refuses_a_missing_clip_and_leaves_the_bundle(tmp_path):
    from diffmix_core.bundle import ADAPTER_JSON
    from diffmix_core.demo import placeholder_bundle

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(placeholder_bundle(tmp_path / "ph").path, bundle_dir)
    before = (bundle_dir / ADAPTER_JSON).read_bytes()
    with pytest.raises(FileNotFoundError, match="train the demo CLIP first"):
        attach_clip(bundle_dir, tmp_path / "nothing")
    assert (bundle_dir / ADAPTER_JSON).read_bytes() == before


def test_a_bundle_clip_path_must_stay_inside_the_bundle(tmp_path):
    from diffmix_core.bundle import ADAPTER_JSON, load_bundle
    from diffmix_core.demo import placeholder_bundle

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(placeholder_bundle(tmp_path / "ph").path, bundle_dir)
    meta = json.loads((bundle_dir / ADAPTER_JSON).read_text())
    meta["clip"] = "../elsewhere"
    (bundle_dir / ADAPTER_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="clip '../elsewhere' must be a relative path inside the bundle"):
        load_bundle(bundle_dir)
