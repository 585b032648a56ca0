"""The engine: equality with diffusers' img2img, batching, edge cases, records."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from diffmix_core.config import TranslateConfig
from diffmix_core.labels import effective_strength, soft_label
from diffmix_core.models import set_scheduler
from diffmix_core.translate import Job, Source, check_strength, translate
from helpers import smooth_image


def reference(pipe, image, prompt, strength, seed, steps, guidance):
    """diffusers' own img2img for one job."""
    out = StableDiffusionImg2ImgPipeline(**pipe.components)(
        prompt=prompt, image=image, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
        generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np")
    return out.images[0]


@pytest.mark.parametrize("scheduler", ["dpm++", "ddim"])
def test_engine_matches_diffusers_img2img(tiny_pipe, scheduler):
    set_scheduler(tiny_pipe, scheduler)
    sources = [Source(smooth_image(1), "owl", "a"), Source(smooth_image(2), "duck", "b")]
    jobs = [Job(sources[0], "duck", 0.3, 11), Job(sources[0], "crow", 0.7, 12),
            Job(sources[1], "owl", 0.5, 13), Job(sources[1], "duck", 1.0, 14), Job(sources[0], "duck", 0.9, 15)]
    config = TranslateConfig(strategy="real-mix", num_inference_steps=10, guidance_scale=5.0, batch_size=3)
    results = translate(tiny_pipe, jobs, config, superclass="bird", show_progress=False)
    for job, res in zip(jobs, results):
        want = reference(tiny_pipe, job.source.image, res.record["prompt"], job.strength, job.seed, 10, 5.0)
        got = np.asarray(res.image, dtype=np.float32) / 255
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 2 / 255, (job, np.abs(got - want).max())
        assert res.record["scheduler"] == scheduler


def test_text_to_image_matches_diffusers(tiny_pipe):
    jobs = [Job(None, "owl", 1.0, 3), Job(None, "duck", 1.0, 4)]
    config = TranslateConfig(strategy="real-gen", num_inference_steps=6, guidance_scale=7.5)
    results = translate(tiny_pipe, jobs, config, superclass="bird", show_progress=False)
    t2i = StableDiffusionPipeline(**tiny_pipe.components)
    for job, res in zip(jobs, results):
        want = t2i(prompt=res.record["prompt"], num_inference_steps=6, guidance_scale=7.5, height=32, width=32,
                   generator=[torch.Generator("cpu").manual_seed(job.seed)], output_type="np").images[0]
        assert np.abs(np.asarray(res.image, np.float32) / 255 - want).max() <= 2 / 255
        assert res.record["strength_run"] == 1.0 and res.record["soft_label"] == {job.target_class: 1.0}


def test_deterministic_bytes_and_size_restored(tiny_pipe):
    src = Source(smooth_image(5, size=(50, 37)), "owl", "odd")
    jobs = [Job(src, "duck", 0.5, 7), Job(src, "duck", 0.5, 8)]
    config = TranslateConfig(strategy="real-mix", num_inference_steps=4)
    a = translate(tiny_pipe, jobs, config, show_progress=False)
    b = translate(tiny_pipe, jobs, config, show_progress=False)
    assert a[0].image.size == (50, 37)
    assert a[0].image.tobytes() == b[0].image.tobytes()
    assert a[0].image.tobytes() != a[1].image.tobytes()   # different seeds differ
    assert a[0].record["id"] != a[1].record["id"]


def test_keep_aspect_resize(tiny_pipe):
    src = Source(smooth_image(6, size=(64, 32)), "owl", "wide")
    config = TranslateConfig(strategy="real-mix", num_inference_steps=4, resize="keep-aspect")
    res = translate(tiny_pipe, [Job(src, "duck", 0.5, 1)], config, show_progress=False)[0]
    assert res.image.size == (64, 32)
    assert res.record["resize"] == "keep-aspect"


def test_strength_edge_cases(tiny_pipe):
    src = Source(smooth_image(7), "owl", "x")
    config = TranslateConfig(strategy="real-mix", num_inference_steps=25)
    res = translate(tiny_pipe, [Job(src, "duck", 0.0, 1)], config, show_progress=False)[0]
    assert res.image.tobytes() == src.image.convert("RGB").tobytes()
    assert res.record["soft_label"] == {"owl": 1.0, "duck": 0.0}
    with pytest.raises(ValueError, match=r"smallest usable strength is 1/25 = 0.04"):
        translate(tiny_pipe, [Job(src, "duck", 0.02, 1)], config, show_progress=False)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            check_strength(bad, 25)
    assert check_strength(0.7, 25) == 17


def test_intra_class_and_bundle_requirements(tiny_pipe):
    src = Source(smooth_image(8), "owl", "x")
    with pytest.raises(ValueError, match="intra-class"):
        translate(tiny_pipe, [Job(src, "duck", 0.5, 1)], TranslateConfig(strategy="real-aug"), show_progress=False)
    with pytest.raises(ValueError, match="needs an adapter bundle"):
        translate(tiny_pipe, [Job(src, "duck", 0.5, 1)], TranslateConfig(strategy="diff-mix"), show_progress=False)


def test_soft_label_uses_strength_that_ran(tiny_pipe):
    src = Source(smooth_image(9), "owl", "x")
    config = TranslateConfig(strategy="real-mix", num_inference_steps=25, label_gamma=0.5, label_scale=0.9)
    rec = translate(tiny_pipe, [Job(src, "duck", 0.7, 1)], config, show_progress=False)[0].record
    s = effective_strength(25, 0.7)
    assert rec["strength_run"] == pytest.approx(0.68) and rec["steps_run"] == 17
    assert rec["soft_label"] == pytest.approx(soft_label("owl", "duck", s, 0.5, 0.9))
    assert rec["soft_label"]["duck"] == pytest.approx(0.9 * 0.68 ** 0.5)


def _fits_only(module, method: str, max_rows: int, seen: list[int]) -> None:
    """Make ``module.method`` raise CUDA's out-of-memory error above ``max_rows`` batch rows."""
    original = getattr(module, method)

    def limited(sample, *args, **kwargs):
        seen.append(sample.shape[0])
        if sample.shape[0] > max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {sample.shape[0]} rows > {max_rows})")
        return original(sample, *args, **kwargs)

    setattr(module, method, limited)


def test_out_of_memory_batches_are_split_with_identical_images(tiny_pipe, tiny_model_dir):
    from diffmix_core.models import load_pipeline

    sources = [Source(smooth_image(20), "owl", "a"), Source(smooth_image(21), "duck", "b")]
    jobs = [Job(src, "crow", s, seed) for src in sources for s in (0.3, 0.5, 0.7, 0.9) for seed in (1, 2)]
    config = TranslateConfig(strategy="real-mix", num_inference_steps=8, guidance_scale=7.5, batch_size=16)
    unsplit = translate(tiny_pipe, jobs, config, superclass="bird", show_progress=False)

    small = load_pipeline(tiny_model_dir, device="cpu", dtype="fp32")   # a device that takes 3 jobs (6 CFG rows)
    unet_rows, vae_rows = [], []
    _fits_only(small.unet, "forward", 6, unet_rows)
    _fits_only(small.vae, "decode", 5, vae_rows)
    steps = []
    split = translate(small, jobs, config, superclass="bird", show_progress=False,
                      callback=lambda done, total: steps.append((done, total)))
    assert max(unet_rows) > 6 and unet_rows[-1] <= 6           # ran out of memory, then fitted
    assert vae_rows == [16, 8, 4, 4, 4, 4]                      # 16 -> 8 -> 4 images per decode
    assert steps[-1][0] == steps[-1][1] == sum(j.strength * 8 // 1 for j in jobs)   # every job-step counted once
    for a, b in zip(unsplit, split):
        assert a.record == b.record
        assert a.image.tobytes() == b.image.tobytes()

    # The pipeline remembers what fitted: the next call does not run out of memory again.
    unet_rows.clear()
    again = translate(small, jobs[:4], config, superclass="bird", show_progress=False)
    assert max(unet_rows) <= 6
    assert [r.image.tobytes() for r in again] == [r.image.tobytes() for r in split[:4]]

    # One job that does not fit: the device's own error, with what to do.
    tight = load_pipeline(tiny_model_dir, device="cpu", dtype="fp32")
    _fits_only(tight.unet, "forward", 1, [])
    with pytest.raises(torch.OutOfMemoryError) as info:
        translate(tight, jobs[:2], config, superclass="bird", show_progress=False)
    assert "lower --resolution" in "".join(getattr(info.value, "__notes__", []))


def test_sampling_resolution_is_the_base_pipelines_unless_given(tiny_pipe):
    """A bundle fine-tuned at another size (224 px here) samples at the base pipeline's own default
    (unet sample_size x vae_scale_factor = 32 px for the tiny pipeline); --resolution overrides."""
    from types import SimpleNamespace

    from diffmix_core.translate import model_resolution

    bundle = SimpleNamespace(resolution=224)
    native = tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor
    assert native == 32 and model_resolution(tiny_pipe, TranslateConfig(), bundle) == 32
    assert model_resolution(tiny_pipe, TranslateConfig(resolution=48), bundle) == 48
    (res,) = translate(tiny_pipe, [Job(Source(smooth_image(1, (40, 24)), "a", "x"), "b", 0.5, 3)],
                       TranslateConfig(strategy="real-mix", num_inference_steps=4), show_progress=False)
    assert res.record["resolution"] == 32 and res.image.size == (40, 24)


@pytest.mark.parametrize("style, prompt", [("superclass", "a photo of a snowy owl bird"),
                                           ("name", "a photo of a snowy owl"),
                                           ("authors", "a photo of a <snowy_owl>")])
def test_real_gen_prompt_options(tiny_pipe, style, prompt):
    """real-gen: with the super-class (ours), the name alone, or the authors' verbatim string."""
    config = TranslateConfig(strategy="real-gen", num_inference_steps=2, real_gen_prompt=style)
    (res,) = translate(tiny_pipe, [Job(None, "snowy owl", 1.0, 0)], config, superclass="bird", show_progress=False)
    assert res.record["prompt"] == prompt
