"""Reliability and security, second round (issue 14): attacks the way an outsider would
make them, on real files through the CLI (and, for the app, over HTTP).

Classes: 1. exports never destroy data; 2. exports read only what they own;
4. content-addressed ids; 5. requests bounded before work; 6. hostile bundles;
8. CSV cells inert; 9. numbers checked; 10. files keep the user's umask."""
from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmix_core.cli import main
from diffmix_core.labels import soft_label
from diffmix_core.records import save_png, write_jsonl_atomic

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["owl", "duck", "crow"]


def make_generated(folder: Path, names=CLASSES, n: int = 4) -> Path:
    """A folder as `diffmix translate` leaves it: PNGs with their records + records.jsonl."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        src, tgt = names[i % len(names)], names[(i + 1) % len(names)]
        rec = {"id": f"r{i}", "file_name": f"img-{i}.png", "plan_idx": i, "source_id": f"s{i}",
               "source_class": src, "target_class": tgt, "strength": 0.5, "strength_run": 0.5, "seed": i,
               "soft_label": soft_label(src, tgt, 0.5), "strategy": "diff-mix"}
        save_png(Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), folder / rec["file_name"], rec)
        rows.append(rec)
    write_jsonl_atomic(folder / "records.jsonl", rows)
    return folder


def cli(*args: str, cwd: Path | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    """`python -m diffmix_core ...` in a fresh process, as a user types it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "diffmix_core", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    return capsys.readouterr().err


# =========================================================================== 1. exports never destroy data
def test_export_refuses_to_replace_what_is_not_its_own(tmp_path, capsys):
    gen = make_generated(tmp_path / "gen")
    gen_before = tree(gen)
    # a folder holding someone's files: refused without --overwrite, replaced with it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    err = refused(capsys, "export", "--from", str(gen), "--out", str(mine), "--quiet")
    assert "not an earlier diffmix export" in err and "--overwrite" in err
    assert (mine / "thesis.tex").read_text() == "years of work"
    # a file at the target: refused, with or without --overwrite
    note = tmp_path / "note.txt"
    note.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        err = refused(capsys, "export", "--from", str(gen), "--out", str(note), "--quiet", *extra)
        assert "not a folder" in err and note.read_text() == "keep me"
    # the source folder, a folder containing it, a symlink: refused even with --overwrite
    link = tmp_path / "link"
    link.symlink_to(mine)
    for target in (gen, tmp_path, link):
        err = refused(capsys, "export", "--from", str(gen), "--out", str(target), "--quiet", "--overwrite")
        assert ("source folder" in err or "not a folder" in err), err
    assert tree(gen) == gen_before and (mine / "thesis.tex").is_file()
    # an earlier export is replaced without --overwrite (re-export), and its zip too
    out = tmp_path / "exp"
    assert main(["export", "--from", str(gen), "--out", str(out), "--format", "imagefolder,zip", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "diffmix-export"
    assert main(["export", "--from", str(gen), "--out", str(out), "--format", "authors,zip", "--quiet"]) == 0
    assert (out / "authors" / "meta.csv").is_file() and not (out / "imagefolder").exists()
    # ... but not once someone put a file of their own into it
    (out / "authors" / "notes.txt").write_text("mine")
    err = refused(capsys, "export", "--from", str(gen), "--out", str(out), "--quiet")
    assert "not an earlier diffmix export" in err and (out / "authors" / "notes.txt").read_text() == "mine"
    # a foreign <out>.zip is refused too; --overwrite replaces folder and zip
    (tmp_path / "mine.zip").write_bytes(b"not a zip of ours")
    assert main(["export", "--from", str(gen), "--out", str(mine), "--format", "authors,zip", "--quiet",
                 "--overwrite"]) == 0
    assert not (mine / "thesis.tex").exists() and zipfile.is_zipfile(tmp_path / "mine.zip")
    other = tmp_path / "other"
    (tmp_path / "other.zip").write_bytes(b"someone's zip")
    err = refused(capsys, "export", "--from", str(gen), "--out", str(other), "--format", "authors,zip", "--quiet")
    assert "other.zip" in err and (tmp_path / "other.zip").read_bytes() == b"someone's zip"
    assert not other.exists()
    # nothing but the outputs asked for was ever left beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "exp.zip", "gen", "link", "mine", "mine.zip",
                                                          "note.txt", "other.zip"]


def test_export_never_replaces_the_working_directory(tmp_path):
    gen = make_generated(tmp_path / "work" / "gen")
    work = tmp_path / "work"
    (work / "keep.txt").write_text("cwd content")
    for out in (".", str(work), ".."):
        proc = cli("export", "--from", "gen", "--out", out, "--overwrite", "--quiet", cwd=work)
        assert proc.returncode == 2 and "working directory" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert (work / "keep.txt").read_text() == "cwd content" and (gen / "records.jsonl").is_file()


# =========================================================================== 2. exports read only what they own
def _rewrite_names(gen: Path, names: dict[int, str]) -> None:
    rows = [json.loads(line) for line in (gen / "records.jsonl").read_text().splitlines()]
    for i, name in names.items():
        rows[i]["file_name"] = name
    write_jsonl_atomic(gen / "records.jsonl", rows)


def test_export_reads_only_the_folders_own_regular_image_files(tmp_path, capsys):
    secret = tmp_path / "secret"
    secret.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret / "private.png")
    (secret / "key.txt").write_text("ssh-rsa AAAA")
    cases = {
        "../secret/private.png": "outside",                  # a path leaving the folder
        str(secret / "private.png"): "outside",              # an absolute path
        "link.png": "outside",                               # a symlink to a file outside
        "sub/private.png": "outside",                        # a symlinked folder
        "inlink.png": "symlink",                             # a symlink, even to the folder's own file
        "insub/img-0.png": "symlink",                        # a symlinked folder inside the folder
        "fake.png": "not an image",                          # a text file named .png
        "fifo.png": "not a regular file",                    # a FIFO (would block a reader)
        "nope.png": "missing",                               # absent
        "": "not a file name",
    }
    for k, (name, why) in enumerate(cases.items()):
        gen = make_generated(tmp_path / f"gen{k}")
        (gen / "link.png").symlink_to(secret / "private.png")
        (gen / "sub").symlink_to(secret)
        (gen / "inlink.png").symlink_to(gen / "img-0.png")
        (gen / "insub").symlink_to(gen)
        (gen / "fake.png").write_text("ssh-rsa AAAA")
        os.mkfifo(gen / "fifo.png")
        _rewrite_names(gen, {2: name})
        out = tmp_path / f"out{k}"
        err = refused(capsys, "export", "--from", str(gen), "--out", str(out), "--format", "imagefolder,zip",
                      "--quiet")
        assert why in err and "records.jsonl:3" in err, (name, err)
        assert not out.exists() and not (tmp_path / f"out{k}.zip").exists()
    assert sorted(p.name for p in secret.iterdir()) == ["key.txt", "private.png"]


def test_export_copies_never_links_the_source_files(tmp_path):
    gen = make_generated(tmp_path / "gen")
    out = tmp_path / "exp"
    assert main(["export", "--from", str(gen), "--out", str(out), "--format", "imagefolder,authors", "--quiet"]) == 0
    for src in gen.glob("*.png"):
        assert src.stat().st_nlink == 1          # no export file shares the source's inode
    exported = list(out.rglob("*.png"))
    assert len(exported) == 8
    (gen / "img-0.png").write_bytes(b"changed later")   # the export does not change with its source
    assert all(p.read_bytes() != b"changed later" for p in exported)


# =========================================================================== 8. CSV cells are inert
FORMULAS = ["=HYPERLINK(\"http://x\")", "+1+2", "-3", "@SUM(A1)", "\tTab", "\rCR", "'quoted", "Laysan Albatross"]


def test_meta_csv_neutralises_formula_cells_and_reads_back_exactly(tmp_path):
    from diffmix_core.classify import read_synthetic

    gen = make_generated(tmp_path / "gen", names=FORMULAS, n=len(FORMULAS))
    out = tmp_path / "exp"
    assert main(["export", "--from", str(gen), "--out", str(out), "--format", "authors", "--quiet"]) == 0
    with open(out / "authors" / "meta.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(FORMULAS)
    for row in rows:
        for col in ("First Directory", "Second Directory", "Path"):
            assert not row[col].startswith(("=", "+", "-", "@", "\t", "\r")), (col, row[col])
        assert float(row["Strength"]) == 0.5 and int(row["Number"]) >= 0   # numbers stay numbers
    assert rows[-1]["First Directory"] == "Laysan Albatross"                 # plain names unchanged
    _, items = read_synthetic(out, classes=FORMULAS)                          # the project's reader: exact names
    assert sorted(it.source_class for it in items) == sorted(FORMULAS)
    assert all(it.path.is_file() for it in items)


# =========================================================================== 10. files keep the user's umask
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exports_and_atomic_files_keep_the_users_umask(tmp_path, umask):
    gen = make_generated(tmp_path / "gen")
    proc = cli("export", "--from", str(gen), "--out", str(tmp_path / "exp"), "--format", "imagefolder,authors,zip",
               "--quiet", umask=umask)
    assert proc.returncode == 0, proc.stderr
    paths = [tmp_path / "exp", tmp_path / "exp.zip", *(tmp_path / "exp").rglob("*")]
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert mode == want, (p, oct(mode), oct(want))
    for p in gen.rglob("*"):   # records.jsonl and the PNGs written here through atomic_path
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_current_umask(), p


def _current_umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old
