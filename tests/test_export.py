"""Export writers: imagefolder reloads with `datasets`, the authors' meta.csv
layout, manifest, zip, atomicity under a full disk, and `diffmix export`."""
from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmix_core import export as ex
from diffmix_core.cli import main
from diffmix_core.labels import soft_label
from diffmix_core.records import read_png_record, save_png, write_jsonl_atomic
from helpers import tree

CLASSES = ["Black footed Albatross", "Laysan Albatross", "owl"]


def record(i: int, source: str, target: str, strength: float) -> dict:
    return {"id": f"r{i}", "file_name": f"images/{i:06d}.png", "plan_idx": i, "source_id": f"{source}/{i}.jpg",
            "source_class": source, "target_class": target, "strength": strength, "strength_run": strength,
            "seed": 100 + i, "soft_label": soft_label(source, target, strength), "scores": {"p_target": 0.5 + i / 100},
            "strategy": "diff-mix"}


@pytest.fixture
def generated(tmp_path) -> Path:
    """A folder as synthesize/translate leave it: images/<idx>.png (record in the PNG) + records.jsonl."""
    folder = tmp_path / "gen"
    rng = np.random.default_rng(0)
    pairs = [(0, 1, 0.7), (1, 0, 0.5), (2, 2, 0.9), (0, 2, 0.3), (1, 1, 0.7)]
    rows = []
    for i, (a, b, s) in enumerate(pairs):
        rec = record(i, CLASSES[a], CLASSES[b], s)
        save_png(Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)), folder / rec["file_name"], rec)
        rows.append(rec)
    write_jsonl_atomic(folder / "records.jsonl", rows)
    return folder


def test_imagefolder_loads_with_datasets(generated, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    out = ex.export_records(ex.read_generated_folder(generated), tmp_path / "exp", ["imagefolder"],
                            classes=CLASSES, show_progress=False)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out / "imagefolder"),
                               cache_dir=str(tmp_path / "hf-cache"))["train"]
    assert len(ds) == 5
    for col in ("image", "source_class", "target_class", "strength", "strength_run", "soft_label", "seed",
                "scores", "soft_label_vector", "target_label"):
        assert col in ds.column_names, col
    rows = sorted(ds, key=lambda r: r["plan_idx"])
    assert rows[0]["source_class"] == CLASSES[0] and rows[0]["target_class"] == CLASSES[1]
    assert rows[0]["soft_label_vector"] == pytest.approx([1 - 0.7 ** 0.5, 0.7 ** 0.5, 0.0])
    assert rows[2]["soft_label_vector"] == pytest.approx([0, 0, 1.0])
    assert rows[3]["scores"]["p_target"] == pytest.approx(0.53) and rows[4]["seed"] == 104
    assert rows[1]["image"].size == (20, 16)
    # Image bytes are the engine's PNGs, record chunk included.
    assert read_png_record(out / "imagefolder" / "000001.png")["id"] == "r1"


def test_authors_layout_meta_csv(generated, tmp_path):
    out = ex.export_records(ex.read_generated_folder(generated), tmp_path / "exp", ["authors"], show_progress=False)
    text = (out / "authors" / "meta.csv").read_text()
    assert text.splitlines()[0] == "First Directory,Second Directory,Number,Strength,Path"
    with open(out / "authors" / "meta.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["Number"]) for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0] == {"First Directory": "Black footed Albatross", "Second Directory": "Laysan Albatross",
                       "Number": "0", "Strength": "0.7",
                       "Path": "Black_footed_Albatross/Laysan_Albatross-000000-0.7.png"}
    data = out / "authors" / "data"
    for r in rows:   # every Path exists relative to data/, and nothing else is there
        assert (data / r["Path"]).is_file()
        assert r["Path"].split("/")[0] == r["First Directory"].replace(" ", "_")
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png")) == sorted(r["Path"] for r in rows)


def test_manifest_and_zip(generated, tmp_path):
    out = ex.export_records(ex.read_generated_folder(generated), tmp_path / "exp", ["imagefolder", "authors", "zip"],
                            show_progress=False)
    assert ex.verify_manifest(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 5 + 1 + 5 + 1   # PNGs + metadata.jsonl in each layout
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", "MANIFEST.sha256"], cwd=out, check=True)
    with zipfile.ZipFile(tmp_path / "exp.zip") as zf:
        names = set(zf.namelist())
        assert zf.testzip() is None
    on_disk = {f"exp/{p.relative_to(out).as_posix()}" for p in out.rglob("*") if p.is_file()}
    assert names == on_disk
    (out / "authors" / "meta.csv").write_text("tampered")
    (out / "imagefolder" / "extra.txt").write_text("x")
    assert ex.verify_manifest(out) == ["changed: authors/meta.csv", "extra: imagefolder/extra.txt"]


def test_pil_images_get_their_record(tmp_path):
    items = [(Image.new("RGB", (8, 8), (i * 40, 0, 0)), record(i, "owl", "Laysan Albatross", 0.5)) for i in range(3)]
    out = ex.export_records(items, tmp_path / "exp", ["authors"], show_progress=False)
    png = out / "authors" / "data" / "owl" / "Laysan_Albatross-000002-0.5.png"
    assert read_png_record(png)["seed"] == 102


def _disk_full_after(monkeypatch, calls: int):
    """Make the calls'th and later file copies fail with ENOSPC (links too, so copies are forced)."""
    count = {"n": 0}
    real_copy = shutil.copyfileobj

    def copy(src, dst, *a, **k):
        count["n"] += 1
        if count["n"] >= calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy(src, dst, *a, **k)

    def no_link(*a, **k):
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(ex.shutil, "copyfileobj", copy)
    monkeypatch.setattr(ex.os, "link", no_link)


def test_disk_full_leaves_previous_export_intact(generated, tmp_path, monkeypatch):
    items = ex.read_generated_folder(generated)
    out = ex.export_records(items[:3], tmp_path / "exp", ["imagefolder", "authors", "zip"], show_progress=False)
    before, zip_before = tree(out), (tmp_path / "exp.zip").read_bytes()
    _disk_full_after(monkeypatch, calls=4)
    with pytest.raises(OSError, match="No space left on device.*nothing was changed") as info:
        ex.export_records(items, tmp_path / "exp", ["imagefolder", "authors", "zip"], show_progress=False)
    assert info.value.errno == errno.ENOSPC
    assert tree(out) == before and (tmp_path / "exp.zip").read_bytes() == zip_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "exp.zip", "gen"]   # no staging left behind
    assert ex.verify_manifest(out) == []


def test_failure_while_zipping_changes_nothing(generated, tmp_path, monkeypatch):
    items = ex.read_generated_folder(generated)
    out = ex.export_records(items[:2], tmp_path / "exp", ["imagefolder", "zip"], show_progress=False)
    before = tree(out)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ex, "write_zip", full)
    with pytest.raises(OSError, match="finishing the export"):
        ex.export_records(items, tmp_path / "exp", ["imagefolder", "zip"], show_progress=False)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "exp.zip", "gen"]


def test_cli_export_and_errors(generated, tmp_path, capsys):
    assert main(["export", "--from", str(generated), "--out", str(tmp_path / "e"), "--format", "authors,zip",
                 "--quiet"]) == 0
    assert (tmp_path / "e" / "authors" / "meta.csv").is_file() and (tmp_path / "e.zip").is_file()
    assert not (tmp_path / "e" / "imagefolder").exists()
    with pytest.raises(SystemExit) as info:
        main(["export", "--from", str(generated), "--format", "parquet"])
    assert info.value.code == 2 and "unknown export format" in capsys.readouterr().err
    (generated / "images" / "000003.png").unlink()
    with pytest.raises(SystemExit):
        main(["export", "--from", str(generated), "--quiet"])
    err = capsys.readouterr().err
    assert "000003.png" in err and "missing" in err


def test_duplicate_numbers_refused(tmp_path):
    items = [(Image.new("RGB", (4, 4)), record(1, "owl", "owl", 0.5))] * 2
    with pytest.raises(ValueError, match="used twice"):
        ex.export_records(items, tmp_path / "exp", ["authors"], show_progress=False)
    assert not (tmp_path / "exp").exists() and list(tmp_path.iterdir()) == []


def _authors_generate_meta_csv(rootdir: Path) -> list[dict]:
    """The authors' generate_meta_csv (scripts/sample_mp.py, Zhicaiwww/Diff-Mix), restated: the
    folder name by ``(.+)``, the file name by ``(.+)-(\\d+)-(.+).png``, '_' read as ' '."""
    import re

    rows = []
    for folder in sorted(p for p in rootdir.iterdir() if p.is_dir()):
        first = re.match(r"(.+)", folder.name).group(1).replace("_", " ")
        for file in sorted(folder.iterdir()):
            m = re.match(r"(.+)-(\d+)-(.+).png", file.name)
            rows.append({"First Directory": first, "Second Directory": m.group(1).replace("_", " "),
                         "Number": int(m.group(2)), "Strength": float(m.group(3)),
                         "Path": f"{folder.name}/{file.name}"})
    return rows


def test_authors_layout_names_parse_back_with_their_regex(tmp_path):
    """Names with '_', an apostrophe, '/', '-' and digits: the authors' regex reads the paths back to
    meta.csv's names (their convention: '_' and '/' as spaces), and our reader maps them back to the
    dataset's classes."""
    classes = ["Chuck will's Widow", "F/A-18", "Black_footed Albatross", "Boeing 737-200"]
    folder = tmp_path / "gen"
    rng = np.random.default_rng(0)
    rows = []
    for i, (a, b, s) in enumerate([(0, 1, 0.7), (1, 2, 0.5), (2, 3, 1.0), (3, 0, 0.3), (1, 1, 0.9)]):
        rec = record(i, classes[a], classes[b], s)
        save_png(Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), folder / rec["file_name"], rec)
        rows.append(rec)
    write_jsonl_atomic(folder / "records.jsonl", rows)
    out = ex.export_records(ex.read_generated_folder(folder), tmp_path / "exp", ["authors"], classes=classes,
                            show_progress=False)
    with open(out / "authors" / "meta.csv", newline="") as f:
        ours = [{**r, "Number": int(r["Number"]), "Strength": float(r["Strength"])} for r in csv.DictReader(f)]
    theirs = _authors_generate_meta_csv(out / "authors" / "data")
    key = lambda r: r["Number"]  # noqa: E731
    assert sorted(theirs, key=key) == sorted(ours, key=key)
    assert {r["First Directory"] for r in ours} >= {"Chuck will's Widow", "F A-18", "Black footed Albatross"}
    assert (out / "authors" / "data" / "F_A-18" / "Black_footed_Albatross-000001-0.5.png").is_file()
    _, items = ex.read_synthetic(out / "authors", classes)
    assert [(it.source_class, it.target_class) for it in items] == \
        [(r["source_class"], r["target_class"]) for r in rows]
    assert ex.authors_dir_name('a:b*c') == ex.safe_name('a:b*c')   # not portable: the hashed safe name


def _dead_pid() -> int:
    """The id of a process that was killed (as a killed export's was)."""
    import signal

    proc = subprocess.Popen(["sleep", "60"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def _leftovers(folder: Path, name: str, dead: int) -> dict[str, bool]:
    """What killed runs leave beside ``folder / name`` ({name: stale}), and a live run's (not stale)."""
    made = {f".{name}.staging-{dead}-k1x": True, f".{name}.old-{dead}-k2x": True, f".{name}.zip.{dead}-k3x.tmp": True,
            f".{name}.staging-oldnopid": True, f".{name}.staging-{os.getpid()}-live": False,
            f".{name}.staging-freshnopid": False}
    for entry in made:
        if entry.endswith(".tmp"):
            (folder / entry).write_bytes(b"PK half a zip")
        else:
            (folder / entry / "x").mkdir(parents=True)
            (folder / entry / "x" / "1.png").write_bytes(b"half")
    hours_ago = os.path.getmtime(folder) - 7200
    os.utime(folder / f".{name}.staging-oldnopid", (hours_ago, hours_ago))
    return made


def test_leftovers_of_killed_runs_are_cleaned_and_live_ones_kept(generated, tmp_path, capsys):
    """A killed export leaves its staging folder, the old folder and the zip's temporary beside
    --out; the next export removes those whose process is gone (or, naming none, older than an
    hour) and keeps a live run's. `diffmix space` follows the same rule for its staging folder."""
    dead = _dead_pid()
    with ex.ExportWriter(tmp_path / "exk", ("imagefolder",)) as w:   # what a run names its temporaries
        assert w.stage.name.startswith(f".exk.staging-{os.getpid()}-")
        w.abort()
    made = _leftovers(tmp_path, "exk", dead)
    assert main(["export", "--from", str(generated), "--out", str(tmp_path / "exk"), "--format",
                 "imagefolder,zip", "--quiet"]) == 0
    assert "removed 4 leftover(s)" in capsys.readouterr().err
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".exk"))
    assert left == sorted(k for k, stale in made.items() if not stale)
    space = tmp_path / "sp"
    (tmp_path / ".sp.staging").mkdir()                                # a fresh one naming no process: kept
    (tmp_path / ".sp.staging" / "note").write_text("someone's")
    (tmp_path / f".sp.staging-{dead}-abc").mkdir()                    # a killed run's: removed
    assert main(["space", "--out", str(space)]) == 0
    assert (tmp_path / ".sp.staging" / "note").read_text() == "someone's"
    assert not (tmp_path / f".sp.staging-{dead}-abc").exists() and (space / "app.py").is_file()
