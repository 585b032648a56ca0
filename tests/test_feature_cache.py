"""The feature cache (--cache-interval N, DeepCache) in the batched engine: the shallow branch,
the per-job schedule inside a strength sweep, records, the CLI, and N = 1 unchanged."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmix_core import feature_cache
from diffmix_core.cli import main
from diffmix_core.config import TranslateConfig
from diffmix_core.records import read_jsonl
from diffmix_core.translate import Job, Source, translate

DEMO_UNET = Path(__file__).resolve().parents[1] / "assets" / "demo" / "base" / "unet"
STRENGTHS = (0.3, 0.5, 0.7, 0.9)


def photo(seed: int, size=(32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.float64)


def sweep(pipe, config: TranslateConfig, seed: int = 1):
    src = Source(photo(3), "owl", "a")
    return translate(pipe, [Job(src, "duck", s, seed) for s in STRENGTHS], config, superclass="bird",
                     show_progress=False)


def count_calls(monkeypatch) -> dict[str, int]:
    """Counts the engine's UNet calls by mode."""
    calls = {feature_cache.PLAIN: 0, feature_cache.FULL: 0, feature_cache.SHALLOW: 0}
    original = feature_cache.unet_call

    def counted(unet, chunk, mode, *args):
        calls[mode] += 1
        return original(unet, chunk, mode, *args)

    monkeypatch.setattr(feature_cache, "unet_call", counted)
    return calls


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_shallow_branch_on_its_own_features_is_the_whole_unet(tiny_pipe, which):
    """The shallow path is the UNet's outermost branch: fed the deep features of the same input it
    gives the whole UNet's output (tiny: attention in the last up block; demo: none)."""
    from diffusers import UNet2DConditionModel

    unet = tiny_pipe.unet if which == "tiny" else UNet2DConditionModel.from_pretrained(DEMO_UNET).float()
    feature_cache.check_cacheable(unet)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 16, 16, generator=gen)
    text = torch.randn(4, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.inference_mode():
        full, deep = feature_cache.full_with_features(unet, x, torch.tensor(500), text)
        shallow = feature_cache.shallow(unet, x, torch.tensor(500), text, deep)
    assert deep.shape[:2] == (4, unet.config.block_out_channels[0])
    assert torch.allclose(shallow, full, atol=1e-5, rtol=1e-4)


def test_cached_sweep_runs_each_job_on_its_own_schedule(tiny_pipe, monkeypatch):
    """Jobs of a sweep start at different grid indices; each runs full at its first step and every
    N-th after, reuses its own features between, and its image is the one it makes alone."""
    config = TranslateConfig(strategy="real-mix", num_inference_steps=10, guidance_scale=5.0, batch_size=4,
                             cache_interval=3)
    calls = count_calls(monkeypatch)
    results = sweep(tiny_pipe, config)
    assert calls[feature_cache.PLAIN] == 0 and calls[feature_cache.SHALLOW] > 0
    # jobs run 3, 5, 7, 9 steps: full at their steps 0, 3, 6, ... = 1 + 2 + 3 + 3 job-steps
    rows = {feature_cache.FULL: 0, feature_cache.SHALLOW: 0}
    original = feature_cache.step_groups

    def counted(states, k, interval):
        groups = original(states, k, interval)
        for mode, group in groups:
            rows[mode] += len(group)
        return groups

    monkeypatch.setattr(feature_cache, "step_groups", counted)
    again = sweep(tiny_pipe, config)
    assert rows == {feature_cache.FULL: 9, feature_cache.SHALLOW: 24 - 9}
    for res, again_res, s in zip(results, again, STRENGTHS):
        assert res.record["cache_interval"] == 3 and res.record["strength"] == s
        assert res.image.tobytes() == again_res.image.tobytes()
    alone = translate(tiny_pipe, [Job(Source(photo(3), "owl", "a"), "duck", 0.5, 1)], config, superclass="bird",
                      show_progress=False)[0]
    assert np.abs(pixels(alone) - pixels(results[1])).max() <= 2   # same image up to batch float noise


def test_cache_changes_images_a_little(tiny_pipe):
    """N > 1 differs from N = 1, by far less than another seed does; records and ids say which."""
    config = TranslateConfig(strategy="real-mix", num_inference_steps=12, guidance_scale=5.0)
    plain = sweep(tiny_pipe, config)
    other_seed = sweep(tiny_pipe, config, seed=2)
    for n in (2, 3):
        cached = sweep(tiny_pipe, TranslateConfig(strategy="real-mix", num_inference_steps=12, guidance_scale=5.0,
                                                  cache_interval=n))
        for a, b, c in zip(plain, cached, other_seed):
            change = np.abs(pixels(a) - pixels(b)).mean()
            assert 0 < change < 12, change                                  # grey levels of 255
            assert change < 0.5 * np.abs(pixels(a) - pixels(c)).mean()
            assert a.record["cache_interval"] == 1 and b.record["cache_interval"] == n
            assert a.record["id"] != b.record["id"]


def test_cache_off_is_the_plain_unet_call(tiny_pipe, monkeypatch):
    """N = 1 (the default) calls the UNet as the engine always did: one plain call per chunk, no hook,
    no shallow step; text-to-image shares the loop and so the setting."""
    calls = count_calls(monkeypatch)
    results = sweep(tiny_pipe, TranslateConfig(strategy="real-mix", num_inference_steps=6))
    assert calls[feature_cache.FULL] == calls[feature_cache.SHALLOW] == 0 and calls[feature_cache.PLAIN] == 5
    assert not tiny_pipe.unet.up_blocks[-1].resnets[-1]._forward_pre_hooks
    assert all(r.record["cache_interval"] == 1 for r in results)
    gen = translate(tiny_pipe, [Job(None, "owl", 1.0, 4)], TranslateConfig(strategy="real-gen", num_inference_steps=6,
                    cache_interval=2), superclass="bird", show_progress=False)[0]
    assert calls[feature_cache.FULL] == 3 and calls[feature_cache.SHALLOW] == 3
    assert gen.record["cache_interval"] == 2


def test_cli_cache_interval_and_remaking_from_the_record(tiny_model_dir, tmp_path, capsys):
    """`--cache-interval 3` is in the record; the record's settings, given back to the CLI, make the
    same pixels again; bad values are refused with what to do."""
    img = tmp_path / "duck.png"
    photo(4, (40, 30)).save(img)
    base = ["translate", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--superclass", "bird",
            "--image", str(img), "--source-class", "duck", "--target", "owl", "--quiet"]
    assert main(base + ["--strength", "0.5", "0.9", "--seed", "1", "--steps", "8", "--cache-interval", "3",
                        "--out", str(tmp_path / "a")]) == 0
    records = read_jsonl(tmp_path / "a" / "records.jsonl")
    assert [r["cache_interval"] for r in records] == [3, 3]
    rec = records[1]
    again = ["--strength", f"{rec['strength']:g}", "--seed", str(rec["seed"]), "--steps", str(rec["num_inference_steps"]),
             "--guidance", f"{rec['guidance_scale']:g}", "--cache-interval", str(rec["cache_interval"]),
             "--out", str(tmp_path / "b")]
    assert main(base + again) == 0
    remade = read_jsonl(tmp_path / "b" / "records.jsonl")[0]
    assert remade["id"] == rec["id"]
    with Image.open(tmp_path / "a" / rec["file_name"]) as first, Image.open(tmp_path / "b" / remade["file_name"]) as second:
        assert np.abs(np.asarray(first, float) - np.asarray(second, float)).max() <= 2
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--cache-interval", "0", "--out", str(tmp_path / "c")])
    assert exit_info.value.code == 2 and "cache_interval must be >= 1" in capsys.readouterr().err


def test_a_unet_the_shallow_path_does_not_know_is_refused():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, num_class_embeds=3)
    with pytest.raises(ValueError, match="class embeddings.*--cache-interval 1"):
        feature_cache.check_cacheable(unet)


def test_synthesize_with_the_cache_records_it_and_resumes_only_with_it(tiny_model_dir, tmp_path, capsys):
    from diffmix_core.synthesize import read_plan

    data = tmp_path / "data"
    for c, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (data / c).mkdir(parents=True)
        for i in range(4):
            im = photo(10 + i)
            im.paste(colour, (4 + i, 6, 24, 26 - i))
            im.save(data / c / f"{i}.png")
    out = tmp_path / "out"
    args = ["synthesize", "--base", str(tiny_model_dir), "--superclass", "shape", "--data", str(data), "--out", str(out),
            "--strategy", "real-mix", "--multiplier", "1", "--steps", "4", "--strength-strategy", "uniform",
            "--strengths", "0.5", "1.0", "--quiet"]
    assert main(args + ["--cache-interval", "2"]) == 0
    records = read_jsonl(out / "records.jsonl")
    assert records and all(r["cache_interval"] == 2 for r in records)
    assert read_plan(out).header["translate"]["cache_interval"] == 2
    with pytest.raises(SystemExit) as info:
        main(args + ["--cache-interval", "3"])
    assert info.value.code == 2 and "holds another plan (differs in translate)" in capsys.readouterr().err
