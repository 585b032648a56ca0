"""One decoding path (data.load_image) for every odd image a user may feed in,
checked directly and through `diffmix translate` (issue 9, image inputs)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diffmix_core.cli import main
from diffmix_core.data import ImageError, load_image
from diffmix_core.records import read_jsonl


def _png_header_only(path, width, height):
    """A tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def _gradient(w=24, h=16):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                           np.full((h, w, 1), 90, np.float32)], axis=2).astype(np.uint8)


def make_good_cases(folder):
    """name -> (path, expected RGB size). Each must decode to RGB."""
    rgb = Image.fromarray(_gradient())
    cases = {}

    def save(name, im, **kw):
        p = folder / name
        im.save(p, **kw)
        return p

    cases["grayscale"] = (save("gray.png", rgb.convert("L")), (24, 16))
    cases["palette"] = (save("palette.png", rgb.convert("P", palette=Image.ADAPTIVE)), (24, 16))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))
    cases["transparent"] = (save("rgba.png", rgba), (24, 16))
    cases["cmyk"] = (save("cmyk.jpg", rgb.convert("CMYK")), (24, 16))
    cases["png16"] = (save("deep.png", Image.fromarray((_gradient()[..., 0].astype(np.uint16) * 257))), (24, 16))
    cases["float_tiff"] = (save("float.tif", Image.fromarray(_gradient()[..., 0].astype(np.float32) / 255)), (24, 16))
    exif = Image.Exif()
    exif[0x0112] = 6   # orientation: rotate 90° clockwise to display
    cases["exif_rotated"] = (save("exif.jpg", rgb, exif=exif), (16, 24))
    frames = [Image.new("RGB", (24, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    cases["animated_gif"] = (save("anim.gif", frames[0], save_all=True, append_images=frames[1:]), (24, 16))
    cases["animated_webp"] = (save("anim.webp", frames[0], save_all=True, append_images=frames[1:], lossless=True),
                              (24, 16))
    cases["one_pixel"] = (save("dot.png", Image.new("RGB", (1, 1), (9, 9, 9))), (1, 1))
    cases["thin"] = (save("thin.png", Image.new("RGB", (300, 1), (9, 90, 9))), (300, 1))
    return cases


def make_bad_cases(folder):
    """name -> (path, message fragment)."""
    buf = io.BytesIO()
    Image.fromarray(_gradient(64, 64)).save(buf, format="PNG")
    (folder / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (folder / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")
    _png_header_only(folder / "bomb.png", 50_000, 50_000)
    return {
        "truncated_png": (folder / "trunc.png", "truncated"),
        "truncated_jpeg": (folder / "trunc.jpg", "truncated"),
        "zero_bytes": (folder / "empty.png", "empty file"),
        "not_an_image": (folder / "text.jpg", "not an image"),
        "bomb": (folder / "bomb.png", "exceeds the limit"),
        "missing": (folder / "nope.png", "does not exist"),
    }


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
