"""The demo world (issue 5): dataset builder, from-scratch pre-training, the whole build, evaluate."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffmix_core.config import DemoDataConfig, PretrainConfig
from diffmix_core.demo import DEMO_CLASSES
from diffmix_core.demo.data import Sources, check_sources, make_image, missing_sources
from diffmix_core.records import safe_name, write_jsonl_atomic

MISSING = missing_sources()
needs_sources = pytest.mark.skipif(bool(MISSING), reason=f"offline demo sources missing: {MISSING}")
TINY_DATA = DemoDataConfig(image_size=32, birds_per_class=5, pretrain_per_class=2, pretrain_per_other=0)
TINY_PRETRAIN = PretrainConfig(resolution=32, vae_channels=(8, 16), vae_steps=2, vae_crop=16, vae_batch_size=4,
                               decoder_steps=1, unet_channels=(16, 32), text_width=32, text_layers=1,
                               attention_heads=2, unet_steps=2, unet_batch_size=4, warmup_steps=1, checkpoint_every=2)


def _disk(colour=(255, 0, 255)) -> Image.Image:
    im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((0, 0, 39, 39), fill=colour + (255,))
    return im


# --------------------------------------------------------------------------- dataset
def test_missing_source_names_its_install_command(tmp_path):
    sources = Sources(tuxpaint=tmp_path / "none", noto=tmp_path / "none.ttf", twemoji=tmp_path / "npm")
    with pytest.raises(FileNotFoundError) as err:
        check_sources(sources)
    text = str(err.value)
    assert "apt-get install -y tuxpaint-stamps-default" in text
    assert "apt-get install -y fonts-noto-color-emoji" in text
    assert "npm install --prefix" in text and "emoji-datasource-twitter" in text


def test_composite_keeps_the_foreground_and_varies_the_background():
    backgrounds = {"photos": [Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), np.uint8))],
                   "textures": []}
    styles = {"photo": [_disk()]}
    images = [make_image(styles, backgrounds, np.random.default_rng(i), TINY_DATA)[0] for i in range(8)]
    for im in images:
        a = np.asarray(im).astype(int)
        magenta = (a[..., 0] > 150) & (a[..., 1] < 110) & (a[..., 2] > 150)
        assert im.size == (32, 32)
        assert magenta.mean() > 0.15          # a large bird in the frame (min_scale 0.55)
    corners = {tuple(np.asarray(im)[0, 0]) for im in images} | {tuple(np.asarray(im)[-1, -1]) for im in images}
    assert len(corners) > 4                   # the backgrounds differ


@needs_sources
def test_build_dataset_writes_an_imagefolder_and_captions(tmp_path):
    from diffmix_core.data import read_dataset
    from diffmix_core.demo.data import build_dataset, read_captions

    out = build_dataset(tmp_path / "d", TINY_DATA, show_progress=False)
    dataset = read_dataset(out / "birds", show_progress=False)
    assert sorted(dataset.classes) == sorted(DEMO_CLASSES)
    assert dataset.counts() == [5] * len(DEMO_CLASSES)
    rows = read_captions(out / "pretrain")
    assert len(rows) == 2 * len(DEMO_CLASSES)
    assert all(r["name"] in r["caption"] for r in rows)
    first = [np.asarray(Image.open(p)) for p in sorted((out / "birds" / safe_name("owl")).glob("*.png"))]
    assert first[0].shape == (32, 32, 3) and not np.array_equal(first[0], first[1])
    again = build_dataset(tmp_path / "d2", TINY_DATA, show_progress=False)   # deterministic from the seed
    for rel in ("birds/owl/owl-0000.png", "pretrain/images/000003.png"):
        assert np.array_equal(np.asarray(Image.open(out / rel)), np.asarray(Image.open(again / rel)))


# --------------------------------------------------------------------------- pre-training
def _caption_set(folder, n=12):
    rows = []
    for i in range(n):
        im = Image.new("RGB", (32, 32), (30 * (i % 8), 200 - 15 * i, 90))
        ImageDraw.Draw(im).rectangle((4 + i % 5, 6, 24, 26), fill=(250, 250 - 20 * (i % 3), 0))
        (folder / "images").mkdir(parents=True, exist_ok=True)
        im.save(folder / "images" / f"{i}.png")
        rows.append({"file_name": f"images/{i}.png", "caption": f"a photo of a {['owl', 'duck'][i % 2]} bird"})
    write_jsonl_atomic(folder / "captions.jsonl", rows)
    return folder


def test_pretrain_saves_a_pipeline_the_loader_loads_and_resumes(tmp_path):
    from diffmix_core.models import load_pipeline
    from diffmix_core.demo.pretrain import pretrain

    data = _caption_set(tmp_path / "data")
    out = pretrain(data, tmp_path / "base", TINY_PRETRAIN, show_progress=False)
    pipe = load_pipeline(out, device="cpu", dtype="fp32")
    assert len(pipe.tokenizer) == 49408 and pipe.text_encoder.get_input_embeddings().weight.shape[0] == 49408
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta["scaling_factor"] > 0 and meta["images"] == 12
    image = pipe("a photo of an owl bird", image=Image.new("RGB", (32, 32)), strength=0.5,
                 num_inference_steps=4, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    # Resume: more UNet steps continue from the checkpoint (step 2) instead of starting over.
    longer = PretrainConfig(**{**TINY_PRETRAIN.__dict__, "unet_steps": 3})
    pretrain(data, out, longer, show_progress=False)
    log = [json.loads(line) for line in (out / "pretrain_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "unet"] == [2, 3]
    assert [r["step"] for r in log if r["stage"] == "vae"] == [2]
    # More VAE steps: stage 1 trains on from its checkpoint; the decoder stage starts again from it.
    pretrain(data, out, PretrainConfig(**{**longer.__dict__, "vae_steps": 3}), show_progress=False)
    log = [json.loads(line) for line in (out / "pretrain_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "vae"] == [2, 3]
    assert [r["step"] for r in log if r["stage"] == "decoder"] == [1, 1]
    assert load_pipeline(out, device="cpu", dtype="fp32").vae.config.scaling_factor > 0


# --------------------------------------------------------------------------- the whole world
@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    if MISSING:
        pytest.skip(f"offline demo sources missing: {MISSING}")
    from diffmix_core.cli import main

    out = tmp_path_factory.mktemp("world")
    assert main(["demo", "build", "--out", str(out), "--quick", "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_build_world_quick_ships_a_bundle_with_a_reference(quick_world):
    from diffmix_core.bundle import load_bundle
    from diffmix_core.models import load_pipeline
    from diffmix_core.reference import bundle_reference_path
    from diffmix_core.reference import load_reference

    assets = quick_world / "assets" / "demo"
    bundle = load_bundle(assets / "bundle")
    assert bundle.classes == tuple(sorted(DEMO_CLASSES))
    assert bundle_reference_path(bundle) is not None and load_reference(bundle_reference_path(bundle)).classes
    assert 0 <= bundle.meta["recommended_strength"] <= 1
    assert bundle.base_model == str((assets / "base").resolve())
    assert bundle.meta["base_model"]["model"] == "../base"   # moves with assets/demo
    profile = bundle.meta["profile"]   # the app's sweep controls for the demo
    assert (profile["strategy"], profile["guidance_scale"]) == ("diff-mix", 2.5)
    assert profile["strength"] == bundle.meta["recommended_strength"] and profile["num_inference_steps"] == 4
    assert sorted(p.name for p in (assets / "bundle" / "examples").iterdir()) == sorted(map(safe_name, DEMO_CLASSES))
    pipe = load_pipeline(bundle.base_model, device="cpu", dtype="fp32")   # fp16 files load as fp32
    assert pipe.unet.dtype.is_floating_point and str(pipe.unet.dtype) == "torch.float32"
    few = json.loads((quick_world / "data" / "fewshot_split.json").read_text())
    info = json.loads((assets / "demo.json").read_text())
    assert info["guidance_scale"] == 2.5 and info["total_bytes"] < 50e6
    # the demo CLIP, trained by the build, attached to the bundle, loaded through open_clip
    from diffmix_core.demo.clip import CLIP_LABEL
    from diffmix_core.scoring import default_clip, load_clip

    assert bundle.meta["clip"] == "clip" and info["clip"]["label"] == CLIP_LABEL
    clip = load_clip(*default_clip(bundle), device="cpu")
    assert clip.available and clip.name == CLIP_LABEL
    # the shipped birds: few-shot train + val, test split + the held-out images (2 per class in --quick)
    shipped = json.loads((assets / "birds" / "diffmix_split.json").read_text())["splits"]
    assert shipped["train"] == few["splits"]["train"] and shipped["val"] == few["splits"]["val"]
    assert info["birds"]["test"] == len(shipped["test"]) == len(few["splits"]["test"]) + 2 * len(DEMO_CLASSES)
    full = json.loads((quick_world / "data" / "birds" / "diffmix_split.json").read_text())
    assert few["splits"]["test"] == full["splits"]["test"] and len(few["splits"]["train"]) == 2 * len(DEMO_CLASSES)


def test_build_data_only_stops_after_the_dataset(tmp_path, capsys):
    """`demo build --data-only`: the birds and their split files (what the experiment config reads), no model."""
    if MISSING:
        pytest.skip(f"offline demo sources missing: {MISSING}")
    from diffmix_core.cli import main

    assert main(["demo", "build", "--out", str(tmp_path), "--quick", "--data-only", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"demo dataset ready: {tmp_path / 'data' / 'birds'}")
    assert (tmp_path / "data" / "birds" / "diffmix_split.json").is_file()
    assert (tmp_path / "data" / "fewshot_split.json").is_file() and not (tmp_path / "base").exists()


@pytest.mark.slow
def test_evaluate_prints_the_table_and_last_line(quick_world, capsys):
    from diffmix_core.cli import main

    assert main(["demo", "evaluate", "--bundle", str(quick_world / "assets" / "demo" / "bundle"), "--data",
                 str(quick_world / "data" / "birds"), "--per-class", "1", "--steps", "4", "--strength", "0.3",
                 "0.9", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"target_hit_at_0\.9=\d\.\d{3} source_keep_at_0\.3=\d\.\d{3}", lines[-1])
    assert lines[0].split()[:4] == ["strength", "n", "target_hit", "source_keep"]
    assert lines[0].split()[-1] == "clip_target"   # the bundle's demo CLIP scores too (its line before the last)
    assert len(lines) == 5 and lines[1].split()[1] == str(len(DEMO_CLASSES) * (len(DEMO_CLASSES) - 1))
    assert lines[-2].startswith("demo CLIP (trained on the demo world), not OpenAI's: zero-shot accuracy")


def test_format_table_last_line_without_those_strengths():
    from diffmix_core.demo.world import format_table

    rows = [{"strength": 0.5, "n": 3, "target_hit": 0.5, "source_keep": 0.25, "p_target": 0.4, "distance": 0.1,
             "ssim": 0.6}]
    assert format_table(rows).splitlines()[-1] == "target_hit_at_0.9=n/a source_keep_at_0.3=n/a"
