"""Loader, offline CLIP tokenizer, tiny pipelines."""
from __future__ import annotations

import shutil

import open_clip
import pytest
import torch

from diffmix_core.models import clip_tokenizer, load_pipeline, model_identity, resolve_dtype, set_scheduler


@pytest.mark.parametrize("text", ["a photo of a Black-footed Albatross bird", "hello, world! café 123",
                                  "an emoji of a <class_3> flamingo", "Rufous-throated    PARTRIDGE"])
def test_clip_tokenizer_ids_match_openai_clip(text, tmp_path):
    ours = clip_tokenizer(tmp_path)(text).input_ids
    theirs = open_clip.get_tokenizer("ViT-L-14")([text])[0].tolist()
    assert ours == theirs[: len(ours)]
    assert len(clip_tokenizer(tmp_path)) == 49408


def test_tiny_pipeline_round_trips_through_the_loader(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert model_identity(pipe) == {"model": str(tiny_model_dir.resolve()), "revision": None}
    again = load_pipeline(tiny_model_dir, device="cpu")
    for a, b in zip(pipe.unet.parameters(), again.unet.parameters()):
        assert torch.equal(a, b)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="could not load base model"):
        load_pipeline("nobody/no-such-model-xyz", local_files_only=True)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8")


def test_scheduler_swap(tiny_pipe):
    set_scheduler(tiny_pipe, "ddim")
    assert type(tiny_pipe.scheduler).__name__ == "DDIMScheduler"
    assert tiny_pipe.scheduler.config.clip_sample is False
    with pytest.raises(ValueError, match="unknown scheduler"):
        set_scheduler(tiny_pipe, "euler-ancestral-9000")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_half_precision_runs(tiny_model_dir, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from diffmix_core.config import TranslateConfig
    from diffmix_core.translate import Job, Source, translate
    from PIL import Image

    pipe = load_pipeline(tiny_model_dir, device="cuda", dtype=dtype, channels_last=True)
    assert pipe.unet.dtype == resolve_dtype(dtype)
    src = Source(Image.new("RGB", (32, 32), (200, 30, 30)), "owl", "red")
    res = translate(pipe, [Job(src, "duck", 0.5, 0)], TranslateConfig(strategy="real-mix", num_inference_steps=4),
                    show_progress=False)
    assert res[0].image.size == (32, 32)


def test_load_pipeline_for_resolves_the_base_from_the_bundle_and_applies_it(tmp_path, tiny_model_dir):
    """The one pipeline-with-bundle loader: base from the bundle (or the config), base check, adapters."""
    from diffmix_core.config import PipelineConfig
    from diffmix_core.demo import placeholder_bundle
    from diffmix_core.apply import load_pipeline_for
    from diffmix_core.models import pipeline_source

    bundle = placeholder_bundle(tmp_path / "ph")
    assert pipeline_source(PipelineConfig(), bundle) == (bundle.base_model, bundle.base_revision)
    assert pipeline_source(PipelineConfig(revision="v2"), bundle) == (bundle.base_model, "v2")
    assert pipeline_source(PipelineConfig(model="org/other"), bundle) == ("org/other", None)
    with pytest.raises(ValueError, match="no base model"):
        pipeline_source(PipelineConfig())
    with pytest.raises(ValueError, match="scheduler must be one of"):
        PipelineConfig(scheduler="euler")
    config = PipelineConfig(device="cpu", dtype="fp32", scheduler="ddim")
    pipe = load_pipeline_for(config, bundle)
    assert pipe.diffmix_bundle == bundle and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert getattr(load_pipeline_for(config, bundle, apply=False), "diffmix_bundle", None) is None
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(ValueError, match="allow_base_mismatch"):
        load_pipeline_for(PipelineConfig(model=str(other), device="cpu"), bundle)
