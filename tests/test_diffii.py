"""Diff-II on diffmix's engine: the cached DDIM inversion, circle interpolation, two-stage
denoising, the diff-ii strategy through the CLI and synthesis, and remaking an image from its record."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffmix_core import inversion
from diffmix_core.translate import Source

DEMO_BUNDLE = "assets/demo/bundle"
DEMO_BIRDS = "assets/demo/birds"


def photo(seed: int, size=(32, 32)) -> Image.Image:
    """A smooth random colour image (not flat, not pure noise)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)


@pytest.fixture
def out_root(tmp_path, monkeypatch):
    """The output root (inversion cache) in a temporary folder."""
    monkeypatch.setenv("DIFFMIX_OUTPUT", str(tmp_path / "outputs"))
    return tmp_path / "outputs"


@pytest.fixture(scope="module")
def demo_pipe():
    """The demo world's fine-tuned pipeline (a trained tiny model: inversion is near-reversible)."""
    from diffmix_core.apply import apply_bundle
    from diffmix_core.bundle import load_bundle
    from diffmix_core.models import load_pipeline

    bundle = load_bundle(DEMO_BUNDLE)
    pipe = load_pipeline(bundle.base_model, device="cpu", dtype="fp32")
    apply_bundle(pipe, bundle)
    return pipe, bundle


# --------------------------------------------------------------------------- inversion
def test_inversion_equals_diffusers_inverse_pipeline(tiny_pipe):
    """Batched inversion = diffusers' StableDiffusionPipeline driven by a DDIMInverseScheduler (the
    authors' get_inversion.py), image by image, at guidance 1 and with classifier-free guidance."""
    prompts = ["a photo of a owl bird", "a photo of a duck bird", "a photo of a crow bird"]
    z0 = torch.cat([inversion.encode_latents(tiny_pipe, photo(i), 32) for i in range(3)])
    inverse, _ = inversion.ddim_schedulers(tiny_pipe)
    reference = StableDiffusionPipeline(**{**tiny_pipe.components, "scheduler": inverse})
    for guidance in (1.0, 3.0):
        got = inversion.invert_latents(tiny_pipe, z0, prompts, 20, guidance, batch_size=2, show_progress=False)
        for i, prompt in enumerate(prompts):
            want = reference(prompt=prompt, negative_prompt="", guidance_scale=guidance, width=32, height=32,
                             num_inference_steps=20, latents=z0[i : i + 1], output_type="latent").images
            assert torch.allclose(got[i : i + 1], want, atol=1e-4, rtol=1e-4), (guidance, (got[i] - want).abs().max())
        assert not torch.allclose(got, z0, atol=1e-2)   # it did move up the schedule


def test_invert_then_denoise_reconstructs_the_source(demo_pipe):
    """On the demo's trained model, DDIM inversion then DDIM denoising at guidance 1 with the same
    steps returns the source's latent: relative MSE < 1 % (measured about 0.1 % at 50 steps)."""
    pipe, bundle = demo_pipe
    from diffmix_core.bundle import bundle_examples

    path, cls = bundle_examples(bundle)[0]
    z0 = inversion.encode_latents(pipe, Image.open(path), 64)
    prompt = bundle.prompt(cls)
    zt = inversion.invert_latents(pipe, z0, [prompt], 25, 1.0, show_progress=False)
    _, forward = inversion.ddim_schedulers(pipe)
    back = StableDiffusionPipeline(**{**pipe.components, "scheduler": forward})(
        prompt=prompt, guidance_scale=1.0, width=64, height=64, num_inference_steps=25, latents=zt,
        output_type="latent").images
    rel = ((back - z0) ** 2).mean() / z0.var()
    assert rel < 0.01, rel
    assert ((zt - z0) ** 2).mean() / z0.var() > 0.5   # z_T is far from z_0: the round trip is not trivial


def test_inversion_cache_hit_miss_and_invalidation(tiny_pipe, out_root):
    src = Source(photo(1), "owl", "a")
    settings = inversion.settings_for(tiny_pipe, "a photo of a owl bird", 5, 1.0, 32)
    (z1,), made = inversion.invert_sources(tiny_pipe, [src], [settings], show_progress=False)
    assert made == 1
    files = list((out_root / "inversions").rglob("*.safetensors"))
    assert len(files) == 1 and not list((out_root / "inversions").rglob("*.tmp"))
    (z2,), made = inversion.invert_sources(tiny_pipe, [src], [settings], show_progress=False)   # a hit
    assert made == 0 and torch.equal(z1, z2)
    # every part of the key invalidates: prompt, steps, guidance, resolution, pixels
    import dataclasses

    for change in ({"prompt": "a photo of a duck bird"}, {"steps": 6}, {"guidance": 2.0}, {"resolution": 64}):
        _, made = inversion.invert_sources(tiny_pipe, [src], [dataclasses.replace(settings, **change)],
                                           show_progress=False)
        assert made == 1, change
    _, made = inversion.invert_sources(tiny_pipe, [Source(photo(2), "owl", "a")], [settings], show_progress=False)
    assert made == 1
    assert len(list((out_root / "inversions").rglob("*.safetensors"))) == 6
    # a torn file is not trusted: inverted again and replaced
    path = inversion.cache_file(settings, src.pixel_hash())
    path.write_bytes(b"not a safetensors file")
    (z3,), made = inversion.invert_sources(tiny_pipe, [src], [settings], show_progress=False)
    assert made == 1 and torch.allclose(z3, z1)
    # a source given twice is inverted once
    _, made = inversion.invert_sources(tiny_pipe, [Source(photo(3), "owl", "x"), Source(photo(3), "owl", "y")],
                                       [settings, settings], show_progress=False)
    assert made == 1


# --------------------------------------------------------------------------- circle interpolation
from diffmix_core.diffii import circle_angle, circle_point, draw_alpha  # noqa: E402


def _pair(seed: int, shape=(1, 4, 8, 8), scale2: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), scale2 * torch.randn(shape, generator=g,
                                                                                      dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 2.5, 7.0, -0.5])
def test_circle_point_has_the_norm_of_the_formula(seed, alpha):
    z1, z2 = _pair(seed, scale2=1.7)
    theta = circle_angle(z1, z2)
    a, b = math.sin((1 + alpha) * theta) / math.sin(theta), math.sin(alpha * theta) / math.sin(theta)
    want = a * a * z1.norm() ** 2 + b * b * z2.norm() ** 2 - 2 * a * b * (z1 * z2).sum()
    z = circle_point(z1, z2, alpha)
    assert torch.isclose(z.norm() ** 2, want, rtol=1e-9)
    # in the plane of z1, z2: z = a z1 - b z2 exactly
    assert torch.allclose(z, a * z1 - b * z2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_equal_norms_stay_on_the_circle_at_angle_alpha_theta(seed):
    z1, z2 = _pair(seed)
    z2 = z2 * (z1.norm() / z2.norm())
    theta = circle_angle(z1, z2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        alpha = draw_alpha(theta, g)
        assert 0 <= alpha <= 2 * math.pi / theta
        z = circle_point(z1, z2, alpha)
        assert torch.isclose(z.norm(), z1.norm(), rtol=1e-9)
        # the angle from z1 is alpha*theta folded into [0, pi]
        phi = (alpha * theta) % (2 * math.pi)
        assert math.isclose(circle_angle(z, z1), min(phi, 2 * math.pi - phi), abs_tol=1e-6)


def test_circle_point_ends_and_partner():
    z1, z2 = _pair(7, scale2=0.5)
    theta = circle_angle(z1, z2)
    assert torch.allclose(circle_point(z1, z2, 0.0), z1, atol=1e-12)
    assert torch.allclose(circle_point(z1, z2, 2 * math.pi / theta), z1, atol=1e-9)   # one full turn
    assert torch.allclose(circle_point(z1, z2, -1.0), z2, atol=1e-12)                 # alpha = -1: the partner
    assert circle_point(z1.float(), z2.float(), 0.4).dtype == torch.float32


def test_alpha_draws_are_seeded_and_uniform():
    theta = 1.3
    draw = lambda seed: [draw_alpha(theta, g) for g in [torch.Generator().manual_seed(seed)] for _ in range(2000)]  # noqa: E731
    a = draw(3)
    assert a == draw(3) and a != draw(4)
    a = np.asarray(a) * theta / (2 * math.pi)   # U(0, 1)
    assert 0 <= a.min() and a.max() <= 1 and abs(a.mean() - 0.5) < 0.03 and abs(a.var() - 1 / 12) < 0.01


def test_degenerate_angles_are_refused():
    z1, _ = _pair(1)
    for z2 in (z1.clone(), 3 * z1, -2 * z1):   # theta = 0 or pi: no unique circle
        with pytest.raises(ValueError, match="antiparallel|parallel"):
            circle_point(z1, z2, 0.5)
    with pytest.raises(ValueError, match="non-zero"):
        circle_point(z1, torch.zeros_like(z1), 0.5)


# --------------------------------------------------------------------------- the engine
def _demo_sources(bundle, cls: str, n: int = 2) -> list[Source]:
    """n images of ``cls`` from the demo birds."""
    paths = sorted(Path(DEMO_BIRDS, cls).glob("*.png"))[:n]
    return [Source(Image.open(p).convert("RGB"), cls, p.stem, str(p)) for p in paths]


def _partial_condition(pipe, z, prompt, context, s, steps, guidance):
    """The authors' partial_condition (interpolation_le.py), written out on diffusers' parts."""
    _, scheduler = inversion.ddim_schedulers(pipe)
    scheduler.set_timesteps(steps)
    embeds = {p: torch.cat(pipe.encode_prompt(p, pipe.device, 1, True, negative_prompt="")[::-1])
              for p in (prompt, context)}
    latents = z * scheduler.init_noise_sigma
    with torch.inference_mode():
        for t in scheduler.timesteps:
            text = embeds[prompt if t < 1000 * (1 - s) else context]
            noise = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=text).sample
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()


def test_diff_ii_matches_the_authors_two_stage_loop(demo_pipe, out_root):
    from diffmix_core.config import DiffIIConfig, TranslateConfig
    from diffmix_core.diffii import builtin_suffixes
    from diffmix_core.translate import Job, translate

    pipe, bundle = demo_pipe
    a, b, c = _demo_sources(bundle, "owl", 3)
    jobs = [Job(a, "owl", 0.3, 1, partner=b), Job(b, "owl", 0.5, 2, partner=c), Job(a, "owl", 0.3, 3, partner=a)]
    config = TranslateConfig(strategy="diff-ii", num_inference_steps=4, guidance_scale=2.5, batch_size=2)
    settings = DiffIIConfig(inversion_steps=6)
    results = translate(pipe, jobs, config, bundle=bundle, diff_ii=settings, show_progress=False)
    assert len(list((out_root / "inversions").rglob("*.safetensors"))) == 3   # a, b, c once each
    for job, res in zip(jobs, results):
        rec = res.record
        assert rec["suffix"] in builtin_suffixes("bird") and rec["context_prompt"].endswith(rec["suffix"])
        assert rec["soft_label"] == {"owl": 1.0} and rec["strategy"] == "diff-ii" and rec["scheduler"] == "ddim"
        assert (rec["partner_id"], rec["partner_sha256"]) == (job.partner.id, job.partner.pixel_hash())
        assert rec["inversion_steps"] == 6 and rec["inversion_guidance"] == 1.0 and rec["inversion_resolution"] == 64
        assert rec["inversion_prompt"] == bundle.prompt("owl") == rec["prompt"]
        assert rec["context_steps"] == sum(1 for k in range(4) if 1000 * (1 - job.strength) <= 1 + 250 * (3 - k))
        s1, s2 = (inversion.settings_for(pipe, rec["prompt"], 6, 1.0, 64),) * 2
        (z1, z2), made = inversion.invert_sources(pipe, [job.source, job.partner], [s1, s2], show_progress=False)
        assert made == 0   # from the cache
        z = z1 if job.partner is job.source else circle_point(z1, z2, rec["alpha"])
        want = _partial_condition(pipe, z, rec["prompt"], rec["context_prompt"], job.strength, 4, 2.5)
        got = np.asarray(res.image, dtype=np.float32) / 255
        assert np.abs(got - want).max() <= 2 / 255, np.abs(got - want).max()
    assert results[2].record["alpha"] == 0.0   # paired with itself: z = z1, no interpolation
    assert len({r.record["id"] for r in results}) == 3


def test_remake_from_record_gives_identical_pixels(demo_pipe, out_root, tmp_path):
    from diffmix_core.config import DiffIIConfig, TranslateConfig
    from diffmix_core.diffii_jobs import job_from_record
    from diffmix_core.records import read_png_record, save_png
    from diffmix_core.translate import Job, translate

    pipe, bundle = demo_pipe
    a, b = _demo_sources(bundle, "duck")
    config = TranslateConfig(strategy="diff-ii", num_inference_steps=5, guidance_scale=2.5)
    first = translate(pipe, [Job(a, "duck", 0.5, 9, partner=b)], config, bundle=bundle,
                      diff_ii=DiffIIConfig(inversion_steps=8), show_progress=False)[0]
    save_png(first.image, tmp_path / "x.png", first.record)
    job, config2, settings2 = job_from_record(read_png_record(tmp_path / "x.png"))
    assert job.alpha == first.record["alpha"] and settings2.inversion_steps == 8
    again = translate(pipe, [job], config2, bundle=bundle, diff_ii=settings2, show_progress=False)[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))
    assert again.record["id"] == first.record["id"]


def test_suffix_only_acts_while_t_is_above_the_switch(demo_pipe, out_root):
    from diffmix_core.config import TranslateConfig
    from diffmix_core.config import DiffIIConfig
    from diffmix_core.translate import Job, translate

    pipe, bundle = demo_pipe
    a, b = _demo_sources(bundle, "crow")
    config = TranslateConfig(strategy="diff-ii", num_inference_steps=3, guidance_scale=2.5)
    run = lambda s, suffix: np.asarray(translate(  # noqa: E731
        pipe, [Job(a, "crow", s, 4, partner=b, suffix=suffix)], config, bundle=bundle,
        diff_ii=DiffIIConfig(inversion_steps=8), show_progress=False)[0].image, dtype=np.int16)
    assert np.array_equal(run(0.0, "in the snow"), run(0.0, "on a sandy beach at low tide"))   # s = 0: never
    assert np.abs(run(1.0, "in the snow") - run(1.0, "on a sandy beach at low tide")).max() > 0


def test_diff_ii_refusals(demo_pipe, out_root):
    from diffmix_core.config import TranslateConfig
    from diffmix_core.translate import Job, translate

    pipe, bundle = demo_pipe
    a, b = _demo_sources(bundle, "crow")
    other = _demo_sources(bundle, "duck", 1)[0]
    config = TranslateConfig(strategy="diff-ii", num_inference_steps=5)
    for job, match in ((Job(a, "crow", 0.3, 0), "partner"), (Job(a, "crow", 0.3, 0, partner=other), "one class"),
                       (Job(a, "duck", 0.3, 0, partner=b), "intra-class")):
        with pytest.raises(ValueError, match=match):
            translate(pipe, [job], config, bundle=bundle, show_progress=False)
    with pytest.raises(ValueError, match="squash"):
        translate(pipe, [Job(a, "crow", 0.3, 0, partner=b)], TranslateConfig(strategy="diff-ii", resize="keep-aspect"),
                  bundle=bundle, show_progress=False)


# --------------------------------------------------------------------------- CLI
def test_cli_translate_diff_ii_draws_a_partner_and_reads_suffix_files(tmp_path, out_root):
    from diffmix_core.bundle import bundle_examples, load_bundle
    from diffmix_core.cli import main
    from diffmix_core.records import read_jsonl

    owls = sorted(Path(DEMO_BIRDS, "owl").glob("*.png"))
    (tmp_path / "s.txt").write_text("# mine\nin a snowy owl sanctuary\n\nby moonlight\n")
    common = ["translate", "--bundle", DEMO_BUNDLE, "--strategy", "diff-ii", "--source-class", "owl", "--steps", "3",
              "--inversion-steps", "4", "--quiet"]
    assert main([*common, "--image", str(owls[0]), "--seed", "0", "1", "--suffixes", str(tmp_path / "s.txt"),
                 "--out", str(tmp_path / "a")]) == 0
    recs = read_jsonl(tmp_path / "a" / "records.jsonl")
    examples = {Path(p).stem for p, c in bundle_examples(load_bundle(DEMO_BUNDLE)) if c == "owl"}
    assert len(recs) == 2 and all(r["partner_id"] in examples for r in recs)
    assert {r["suffix"] for r in recs} <= {"in a snowy owl sanctuary", "by moonlight"}
    assert all(r["strength"] == 0.3 and r["target_class"] == "owl" and r["soft_label"] == {"owl": 1.0} for r in recs)
    assert all((tmp_path / "a" / r["file_name"]).is_file() for r in recs)
    # --partner, a JSON {superclass: list} file, s given
    (tmp_path / "s.json").write_text('{"bird": ["on a red roof"], "default": ["x"]}')
    assert main([*common, "--image", str(owls[0]), "--partner", str(owls[1]), "--strength", "0.5",
                 "--suffixes", str(tmp_path / "s.json"), "--out", str(tmp_path / "b")]) == 0
    (rec,) = read_jsonl(tmp_path / "b" / "records.jsonl")
    assert (rec["partner_id"], rec["suffix"], rec["strength"]) == (owls[1].stem, "on a red roof", 0.5)
    assert rec["source_id"] == owls[0].stem and len(rec["source_sha256"]) == len(rec["partner_sha256"]) == 64


def test_cli_diff_ii_refusals(tmp_path, out_root, capsys):
    from diffmix_core.cli import main

    owl = str(sorted(Path(DEMO_BIRDS, "owl").glob("*.png"))[0])
    base = ["translate", "--bundle", DEMO_BUNDLE, "--strategy", "diff-ii", "--image", owl, "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main([*base, "--source-class", "owl", "--suffixes", str(tmp_path / "none.txt")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["translate", "--bundle", DEMO_BUNDLE, "--image", owl, "--source-class", "owl", "--out", str(tmp_path)])
    assert "needs --target" in capsys.readouterr().err


def test_cli_synthesize_diff_ii_plans_pairs_and_resumes(tmp_path, out_root):
    """`diffmix synthesize --strategy diff-ii`: M x |train| same-class pairs, each record naming both
    sources, at s = 0.3 when --strength is not given (as translate); a rerun makes nothing and inverts
    nothing (the cache)."""
    import shutil

    from diffmix_core.cli import main
    from diffmix_core.records import read_jsonl

    data = tmp_path / "birds"
    for cls, n in (("owl", 3), ("duck", 1)):
        (data / cls).mkdir(parents=True)
        for p in sorted(Path(DEMO_BIRDS, cls).glob("*.png"))[:n]:
            shutil.copy(p, data / cls / p.name)
    argv = ["synthesize", "--bundle", DEMO_BUNDLE, "--data", str(data), "--val-fraction", "0", "--test-fraction", "0",
            "--strategy", "diff-ii", "--multiplier", "1.5", "--steps", "3", "--inversion-steps",
            "3", "--out", str(tmp_path / "syn"), "--quiet"]
    assert main(argv) == 0
    recs = read_jsonl(tmp_path / "syn" / "records.jsonl")
    assert len(recs) == 6
    for r in recs:
        assert r["strategy"] == "diff-ii" and r["target_class"] == r["source_class"]
        assert Path(r["partner_path"]).parent.name == r["source_class"]
        assert (r["partner_id"] == r["source_id"]) == (r["source_class"] == "duck")
        assert r["soft_label"] == {r["source_class"]: 1.0} and r["inversion_steps"] == 3
        assert r["strength"] == 0.3   # diff-ii's default s, not synthesize's 0.5
    cached = sorted((out_root / "inversions").rglob("*.safetensors"))
    assert len(cached) == 4   # every train image once
    mtimes = [p.stat().st_mtime_ns for p in cached]
    assert main(argv) == 0   # resume: nothing to make
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    with pytest.raises(SystemExit):   # other inversion settings: another plan
        main([*argv[:-3], "--inversion-steps", "4", "--out", str(tmp_path / "syn"), "--quiet"])
