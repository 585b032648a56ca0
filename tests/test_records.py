"""Records in PNG text chunks, safe names, atomic writers."""
from __future__ import annotations

import os

import pytest
from PIL import Image

from diffmix_core.records import (atomic_path, read_jsonl, read_png_record, safe_name, save_png,
                                  write_jsonl_atomic, write_text_atomic)


def test_png_record_round_trip(tmp_path):
    rec = {"id": "x", "target_class": "Rosé pelican", "soft_label": {"a": 0.3, "b": 0.7}}
    im = Image.new("RGB", (5, 4), (1, 2, 3))
    save_png(im, tmp_path / "a.png", rec)
    assert read_png_record(tmp_path / "a.png") == rec
    with Image.open(tmp_path / "a.png") as back:
        assert back.tobytes() == im.tobytes()
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]   # no temporary left


def test_atomic_write_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "index.jsonl"
    write_jsonl_atomic(target, [{"a": 1}])
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise OSError(28, "disk full")
    assert read_jsonl(target) == [{"a": 1}]
    assert os.listdir(tmp_path) == ["index.jsonl"]


def test_read_jsonl_names_bad_line(tmp_path):
    write_text_atomic(tmp_path / "r.jsonl", '{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2"):
        read_jsonl(tmp_path / "r.jsonl")


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "..", ".", "", "x\x00y\n", "Ωmega 鳥", "A" * 300,
                                  "Black footed Albatross"])
def test_safe_name_is_safe(name):
    out = safe_name(name)
    assert out and "/" not in out and "\x00" not in out and not out.startswith(".")
    assert out.isascii() and out.isprintable() and len(out) <= 80


def test_safe_name_keeps_plain_names_and_avoids_collisions():
    assert safe_name("Black footed Albatross") == "Black_footed_Albatross"
    names = ["a/b", "a_b", "a?b", "a b", "A/B", "a\\b"]
    assert len({safe_name(n) for n in names}) == len(names)
