"""`diffmix selftest` and the random-weight pipelines of the real architectures.

The fast tests run the selftest's whole chain through the CLI on a reduced copy of the
SD 2.1 architecture file (same component classes, four UNet levels, v-prediction, the
OpenCLIP tokenizer's '!' padding; small widths). The full-size SD 1.5 / 2.1 runs at 128 px
are marked slow: on the shared 2-core CPU they take minutes each (docs/selftest.md).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from diffmix_core import models
from diffmix_core.cli import main
from diffmix_core.config import SelftestConfig
from diffmix_core.models import arch_names, load_arch, load_pipeline, random_pipeline_dir


def reduced_arch(path: Path, base: str = "sd21") -> Path:
    """The shipped architecture file with small widths (the test's stand-in for the real size)."""
    spec = load_arch(base)
    spec["name"] = f"reduced-{base}"
    spec["unet"].update(block_out_channels=[32, 32, 64, 64], attention_head_dim=[2, 2, 4, 4], layers_per_block=1,
                        cross_attention_dim=32, norm_num_groups=8, sample_size=8)
    spec["vae"].update(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64)
    spec["text_encoder"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                projection_dim=32)
    spec["resolution"] = 64
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch, one_torch_thread):
    """A fresh model cache (random pipelines are built into it) sharing the converted tokenizer."""
    shared = models.CACHE_DIR / "clip-tokenizer"
    models.clip_tokenizer(shared)
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "clip-tokenizer").symlink_to(shared)
    return tmp_path / "cache"


def test_shipped_architectures_are_the_real_configs():
    assert arch_names() == ["sd15", "sd21", "sd21-base"]
    sd15, sd21, base = (load_arch(a) for a in ("sd15", "sd21", "sd21-base"))
    assert sd15["unet"]["block_out_channels"] == sd21["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert (sd15["text_encoder"]["hidden_size"], sd15["text_encoder"]["num_hidden_layers"]) == (768, 12)
    assert (sd21["text_encoder"]["hidden_size"], sd21["text_encoder"]["num_hidden_layers"]) == (1024, 23)
    assert (sd15["tokenizer"]["pad_token"], sd21["tokenizer"]["pad_token"]) == ("<|endoftext|>", "!")
    assert sd21["scheduler"]["prediction_type"] == "v_prediction" and sd21["resolution"] == 768
    assert base["scheduler"]["prediction_type"] == "epsilon" and base["resolution"] == 512
    assert sd21["unet"]["cross_attention_dim"] == base["unet"]["cross_attention_dim"] == 1024
    with pytest.raises(ValueError, match="unknown architecture 'sd3'.*sd15"):
        load_arch("sd3")


def test_random_pipeline_saved_labelled_and_loaded_back(tmp_path, cache):
    arch = reduced_arch(tmp_path / "reduced.json")
    folder = random_pipeline_dir(arch)
    assert folder.parent == cache and folder.name.startswith("random-reduced-sd21-fp16-")
    assert "RANDOM WEIGHTS" in (folder / "README.md").read_text()
    assert json.loads((folder / "diffmix_random.json").read_text())["random_weights"] is True
    assert random_pipeline_dir(arch) == folder            # built once
    pipe = load_pipeline(folder, device="cpu", dtype="bf16")
    assert pipe.diffmix_random["arch"] == "reduced-sd21" and pipe.unet.dtype == torch.bfloat16
    assert pipe.scheduler.config.prediction_type == "v_prediction"   # kept through the DPM-Solver++ swap
    assert pipe.unet.config.use_linear_projection and pipe.unet.config.upcast_attention
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0
    assert len(pipe.tokenizer) == 49408
    # The saved weights are those the builder made (fp16 storage).
    again = models.build_random_pipeline(arch, seed=0, dtype="fp16")
    for name, p in again.unet.state_dict().items():
        assert torch.equal(p.to(torch.bfloat16), pipe.unet.state_dict()[name]), name
        break


def test_selftest_cli_whole_chain_on_reduced_architecture(tmp_path, cache, capsys):
    arch = reduced_arch(tmp_path / "reduced.json")
    code = main(["selftest", "--arch", str(arch), "--device", "cpu", "--num-inference-steps", "4",
                 "--finetune-steps", "1", "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[-1] == "selftest reduced-sd21: ok"
    for stage in ("model", "dataset", "finetune", "bundle", "translate", "import", "synthesize"):
        assert re.search(rf"^  {stage}\s+[\d.]+ s\s+peak\s+[\d.]+ GiB", out, re.M), stage
    assert "RANDOM weights" in out and "max |engine - img2img| = " in out
    summary = json.loads((tmp_path / "work" / "selftest.json").read_text())
    assert summary["ok"] and [s["stage"] for s in summary["stages"]][-1] == "synthesize"
    assert (tmp_path / "work" / "synthetic" / "export").is_dir()
    # The authors'-format checkpoint carries the real attention-processor key names.
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "work" / "authors" / "pytorch_lora_weights.safetensors")
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight" in keys


def test_selftest_names_the_failing_stage(tmp_path, cache, capsys, monkeypatch):
    from diffmix_core import selftest as st

    def broken(run):
        raise ValueError("finetune broke (injected)")

    monkeypatch.setattr(st, "STAGES", [s if s[0] != "finetune" else ("finetune", broken) for s in st.STAGES])
    arch = reduced_arch(tmp_path / "reduced.json")
    with pytest.raises(SystemExit) as info:
        main(["selftest", "--arch", str(arch), "--device", "cpu", "--num-inference-steps", "2",
              "--finetune-steps", "1", "--strengths", "0.5"])
    assert info.value.code == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "selftest reduced-sd21: FAILED at finetune: ValueError: finetune broke (injected)"


def test_selftest_config_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        SelftestConfig(resolution=100)
    with pytest.raises(ValueError, match="run at least one of 4 steps"):
        SelftestConfig(num_inference_steps=4, strengths=(0.1,))
    with pytest.raises(SystemExit):
        main(["selftest", "--arch", "sd3"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_selftest_full_size_architecture_at_128px(arch, capsys):
    """The real 860 M-parameter UNet and full text encoders, at 128 px on the CPU (minutes)."""
    code = main(["selftest", "--arch", arch, "--resolution", "128", "--device", "cpu", "--num-inference-steps", "4",
                 "--finetune-steps", "1", "--strengths", "0.5", "--synth-images", "2"])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"selftest {arch}: ok"
