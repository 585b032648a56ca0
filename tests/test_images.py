"""One decoding path (data.load_image) for every odd image a user may feed in,
checked directly and through `diffmix translate` (issue 9, image inputs)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffmix_core.cli import main
from diffmix_core.data import ImageError, load_image
from diffmix_core.records import read_jsonl
from helpers import make_bad_cases, make_good_cases


def test_good_images_decode_to_rgb(tmp_path):
    for name, (path, size) in make_good_cases(tmp_path).items():
        im = load_image(path)
        assert im.mode == "RGB" and im.size == size, name


def test_decoding_details(tmp_path):
    cases = make_good_cases(tmp_path)
    assert load_image(cases["transparent"][0]).getpixel((3, 3)) == (255, 255, 255)   # composited on white
    assert load_image(cases["animated_gif"][0]).getpixel((0, 0))[0] > 200              # first frame (red)
    deep = np.asarray(load_image(cases["png16"][0]))
    assert deep[0, 0, 0] == 0 and deep[0, -1, 0] == 255                                # 16-bit scaled, not clipped
    flt = np.asarray(load_image(cases["float_tiff"][0]))
    assert flt[0, -1, 0] == 255
    rotated = np.asarray(load_image(cases["exif_rotated"][0]))
    assert rotated.shape[:2] == (24, 16)


def test_bad_images_are_refused_with_the_reason(tmp_path):
    for name, (path, message) in make_bad_cases(tmp_path).items():
        with pytest.raises((ImageError, FileNotFoundError), match=message):
            load_image(path)


def test_pixel_limit_is_configurable(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="DIFFMIX_MAX_PIXELS"):
        load_image(tmp_path / "big.png", max_pixels=5000)
    assert load_image(tmp_path / "big.png", max_pixels=10_000).size == (100, 100)


def test_translate_cli_on_every_case(tiny_model_dir, tmp_path, capsys):
    base = ["translate", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--source-class", "owl",
            "--target", "duck", "--strength", "0.5", "--steps", "2", "--quiet"]
    for name, (path, message) in make_bad_cases(tmp_path).items():
        out = tmp_path / f"out-{name}"
        with pytest.raises(SystemExit) as exit_info:
            main(base + ["--image", str(path), "--out", str(out)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, name
        assert not out.exists()   # nothing partial written
    good = make_good_cases(tmp_path)
    out = tmp_path / "good"
    for resize in ("squash", "keep-aspect"):
        assert main(base + ["--resize", resize, "--image", *[str(p) for p, _ in good.values()], "--out", str(out)]) == 0
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 2 * len(good)
    sizes = {r["source_id"]: Image.open(out / r["file_name"]).size for r in records}
    for name, (path, size) in good.items():
        assert sizes[path.stem] == size, name
