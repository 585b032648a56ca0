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
import time
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from diffmix_core.cli import main
from diffmix_core.labels import soft_label
from diffmix_core.records import write_jsonl_atomic
from helpers import (WIDTH, Payload, make_generated, make_imagefolder, make_world, png_header_only, sweep, tiny_bundle,
                     tree, world_environment)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["owl", "duck", "crow"]


def cli(*args: str, cwd: Path | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    """`python -m diffmix_core ...` in a fresh process, as a user types it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "diffmix_core", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


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
    from diffmix_core.export import read_synthetic

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


# =========================================================================== 4. content-addressed ids
def test_translate_two_sources_with_one_file_name_never_collide(tiny_model_dir, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a" / "photo.png")
    Image.new("RGB", (32, 32), (10, 10, 200)).save(tmp_path / "b" / "photo.png")
    out = tmp_path / "out"
    assert main(["translate", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--source-class", "owl",
                 "--target", "duck", "--strength", "0.5", "--steps", "2", "--quiet", "--out", str(out),
                 "--image", str(tmp_path / "a" / "photo.png"), str(tmp_path / "b" / "photo.png")]) == 0
    from diffmix_core.records import read_jsonl, read_png_record

    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 2 and len({r["id"] for r in records}) == 2
    assert len({r["file_name"] for r in records}) == 2 and len(list(out.glob("*.png"))) == 2
    assert len({r["source_sha256"] for r in records}) == 2
    for r in records:   # each image is its own source's, and its PNG says so
        assert read_png_record(out / r["file_name"])["source_sha256"] == r["source_sha256"]
    # the same pixels under another name are the same source: same id (a rerun replaces, never duplicates)
    (tmp_path / "c").mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "c" / "photo.png")
    assert main(["translate", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--source-class", "owl",
                 "--target", "duck", "--strength", "0.5", "--steps", "2", "--quiet", "--out", str(out),
                 "--image", str(tmp_path / "c" / "photo.png")]) == 0
    assert len(read_jsonl(out / "records.jsonl")) == 2 and len(list(out.glob("*.png"))) == 2


# =========================================================================== 5. bounded before any work
def test_cli_requests_are_bounded_before_any_work(tiny_model_dir, tmp_path, capsys):
    import time

    img = tmp_path / "x.png"
    Image.new("RGB", (16, 16)).save(img)
    base = ["translate", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--source-class", "owl",
            "--steps", "2", "--quiet", "--out", str(tmp_path / "out")]
    t0 = time.perf_counter()
    err = refused(capsys, *base, "--image", *[str(img)] * 8, "--target", *[f"t{i}" for i in range(16)],
                  "--strength", *[f"0.{i}" for i in range(2, 10)], "--seed", *[str(i) for i in range(8)])
    assert "8 images x 16 targets x 8 strengths x 8 seeds = 8,192 images exceeds the limit of 4,096" in err
    err = refused(capsys, *base, "--image", str(img), "--target", "a", "b", "--strength", "0.5", "0.7",
                  "--seed", "0", "1", "--max-jobs", "4")
    assert "= 8 images exceeds the limit of 4" in err and "--max-jobs" in err
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "out").exists()   # refused before loading anything
    # image shapes, from the header: a side, an aspect ratio
    for path, why in ((png_header_only(tmp_path / "wide.png", 20_000, 10), "side over the limit of 16,384"),
                      (png_header_only(tmp_path / "thin.png", 3_000, 2), "longer than 500 times")):
        err = refused(capsys, *base, "--image", str(path), "--target", "duck")
        assert why in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bulk_plan_bounded_before_it_is_drawn(tiny_model_dir, tmp_path, capsys):
    import time

    data = make_imagefolder(tmp_path / "ds", per_class=3)
    t0 = time.perf_counter()
    err = refused(capsys, "synthesize", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--data", str(data),
                  "--out", str(tmp_path / "syn"), "--multiplier", "1e12", "--quiet", "--shard", "0/1")
    assert "exceeds the limit of 10,000,000 per plan" in err and time.perf_counter() - t0 < 30
    assert not (tmp_path / "syn" / "plan.jsonl").exists()


def test_output_work_is_bounded_for_huge_and_thin_sources(tiny_model_dir, tmp_path, monkeypatch):
    from diffmix_core import translate as tr

    assert tr.model_input_size((16, 24), 512, "keep-aspect", 64) == (448, 640)        # ordinary: unchanged
    for shape in ((300, 1), (16_000, 40), (1, 499)):                                   # thin: within res^2
        w, h = tr.model_input_size(shape, 512, "keep-aspect", 64)
        assert w * h <= 512 * 512 and min(w, h) >= 64
    monkeypatch.setattr(tr, "MAX_OUTPUT_PIXELS", 4096)
    Image.new("RGB", (200, 100), (9, 99, 9)).save(tmp_path / "big.png")
    out = tmp_path / "out"
    assert main(["translate", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--source-class", "owl",
                 "--target", "duck", "--strength", "0", "0.5", "--steps", "2", "--quiet", "--out", str(out),
                 "--image", str(tmp_path / "big.png")]) == 0
    sizes = {Image.open(p).size for p in out.glob("*.png")}
    assert sizes == {(90, 45)}   # 200x100 scaled to <= 4096 px, aspect kept, for s = 0 and s > 0 alike


# =========================================================================== 6. hostile bundles are bounded
def _edit(bundle: Path, **changes) -> None:
    meta = json.loads((bundle / "adapter.json").read_text())
    meta.update(changes)
    (bundle / "adapter.json").write_text(json.dumps(meta))   # NaN is written as NaN, as json.loads reads it


TEMPLATES = ["a {word:>100000000} bird", "a {word!r}", "a {word.__class__.__mro__}", "a {word[0]}",
             "{word} {superclass.__init__.__globals__}", "{word} {0}", "{word} {}", "{word}" + "x" * 2000]


def test_hostile_bundle_fields_are_refused(tiny_model_dir, tmp_path, capsys):
    import shutil

    from diffmix_core.bundle import load_bundle, make_prompt
    good = tiny_bundle(tmp_path, tiny_model_dir, lora=False)
    cases = {f"template {t[:30]!r}": dict(template=t) for t in TEMPLATES}
    cases.update({
        "resolution 10**6": dict(resolution=1_000_000), "resolution 0": dict(resolution=0),
        "resolution 33": dict(resolution=33),
        "profile NaN strength": dict(profile={"strength": float("nan")}),
        "profile inf guidance": dict(profile={"guidance_scale": float("inf")}),
        "profile 10**9 steps": dict(profile={"num_inference_steps": 10**9}),
        "profile strategy": dict(profile={"strategy": "rm -rf"}),
        "profile NaN threshold": dict(profile={"thresholds": {"min_p_target": float("nan")}}),
        "recommended NaN": dict(recommended_strength=float("nan")),
        "examples outside": dict(examples="../"),
        "reference unlisted": dict(reference_classifier="adapter.json"),
    })
    for k, (name, change) in enumerate(cases.items()):
        bundle = tmp_path / f"b{k}"
        shutil.copytree(good, bundle)
        _edit(bundle, **change)
        with pytest.raises(ValueError):
            load_bundle(bundle)
        err = refused(capsys, "translate", "--bundle", str(bundle), "--image", str(bundle / "adapter.json"),
                      "--source-class", "a", "--target", "b", "--out", str(tmp_path / f"o{k}"), "--quiet")
        assert "adapter.json" in err and "Traceback" not in err, (name, err)
    for t in TEMPLATES:
        with pytest.raises(ValueError):
            make_prompt("x", "bird", t)
    assert make_prompt("<c>", "bird", "a photo of a {word} {superclass}") == "a photo of a <c> bird"


def test_bundle_paths_stay_inside_after_resolving_symlinks(tiny_model_dir, tmp_path):
    import shutil

    from diffmix_core.bundle import load_bundle
    good = tiny_bundle(tmp_path, tiny_model_dir, lora=False)
    outside = tmp_path / "outside"
    outside.mkdir()
    # an examples folder that is a symlink to somewhere else
    b = tmp_path / "b-examples"
    shutil.copytree(good, b)
    (b / "ex").symlink_to(outside)
    _edit(b, examples="ex")
    with pytest.raises(ValueError, match="leaves the bundle"):
        load_bundle(b)
    # a listed weight file that is a symlink to an identical file outside (same sha256)
    b = tmp_path / "b-weights"
    shutil.copytree(good, b)
    rel = "embeddings/class_1.safetensors"
    shutil.copyfile(b / rel, outside / "class_1.safetensors")
    (b / rel).unlink()
    (b / rel).symlink_to(outside / "class_1.safetensors")
    with pytest.raises(ValueError, match="leaves the bundle"):
        load_bundle(b)
    assert load_bundle(good).num_classes == 3


def test_reference_classifier_sizes_and_paths_are_bounded(tmp_path):
    import timm
    from safetensors.torch import save_file

    from diffmix_core.reference import load_reference

    folder = tmp_path / "ref"
    folder.mkdir()
    save_file(timm.create_model("test_resnet", num_classes=2).state_dict(), folder / "model.safetensors")
    for pre, weights, why in (({"input_size": 100_000}, "model.safetensors", "input_size"),
                              ({"input_size": [3, 10**6, 10**6]}, "model.safetensors", "input_size"),
                              ({}, "../ref/../outside.safetensors", "outside")):
        (folder / "reference.json").write_text(json.dumps({"model_name": "test_resnet", "classes": ["a", "b"],
                                                           "weights": weights, "preprocessing": pre}))
        with pytest.raises(ValueError, match=why):
            load_reference(folder, device="cpu")


# =========================================================================== 9. numbers are checked
def test_nan_inf_and_out_of_range_numbers_are_refused_by_the_cli(tiny_model_dir, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.new("RGB", (16, 16)).save(img)
    base = ["translate", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--source-class", "owl",
            "--target", "duck", "--quiet", "--image", str(img), "--out", str(tmp_path / "out")]
    cases = {("--guidance", "nan"): "guidance_scale must be a finite number",
             ("--guidance", "inf"): "guidance_scale must be a finite number",
             ("--label-gamma", "nan"): "label_gamma must be a finite number",
             ("--strength", "nan"): "strength must be between 0 and 1",
             ("--strength", "inf"): "strength must be between 0 and 1",
             ("--seed", "-2"): "--seed must be an integer from 0 to 2**64 - 1",   # -1 = a random seed
             ("--seed", str(2**64)): "--seed must be an integer from 0 to 2**64 - 1",
             ("--steps", "1000000000"): "num_inference_steps must be from 1 to 1000"}
    for args, why in cases.items():
        err = refused(capsys, *base, *args)
        assert why in err and "Traceback" not in err, (args, err)
    data = make_imagefolder(tmp_path / "ds", per_class=3)
    for args, why in ((("--seed", "-5"), "seed must be an integer from 0"),
                      (("--multiplier", "nan"), "multiplier must be a finite number"),
                      (("--strength", "nan"), "strength must be a finite number")):
        err = refused(capsys, "synthesize", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--data",
                      str(data), "--out", str(tmp_path / "syn"), "--quiet", "--shard", "0/1", *args)
        assert why in err, (args, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "syn" / "plan.jsonl").exists()


def test_every_config_refuses_nan_and_bad_seeds():
    import dataclasses

    from diffmix_core import config as C

    checked, classes = 0, 0
    for cls in vars(C).values():   # every config class that builds from its defaults
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and hasattr(cls, "__post_init__")):
            continue
        kwargs = {"superclass": "bird"} if cls is C.FinetuneConfig else {}
        try:
            cls(**kwargs)
        except TypeError:   # needs arguments (ExperimentConfig, ExperimentArm...): covered through the others
            continue
        classes += 1
        for f in dataclasses.fields(cls):
            if f.type in ("float", "float | None"):
                for bad in (float("nan"), float("inf")):
                    with pytest.raises(ValueError, match="finite"):
                        cls(**kwargs, **{f.name: bad})
                    checked += 1
            if f.name in C.SEED_FIELDS:
                for bad in (-1, 2**64):
                    with pytest.raises(ValueError, match="2\\*\\*64"):
                        cls(**kwargs, **{f.name: bad})
                    checked += 1
    assert classes >= 11 and checked > 60


def test_pickled_weights_in_a_base_folder_are_refused_in_one_line(tiny_model_dir, tmp_path):
    import shutil

    import torch

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    marker = tmp_path / "pwned"
    for f in (base / "unet").glob("*.safetensors"):
        f.unlink()
    torch.save({"weight": Payload(marker)}, base / "unet" / "diffusion_pytorch_model.bin")
    img = tmp_path / "x.png"
    Image.new("RGB", (16, 16)).save(img)
    proc = cli("translate", "--base", str(base), "--strategy", "real-mix", "--source-class", "owl", "--target",
               "duck", "--steps", "2", "--quiet", "--image", str(img), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "unet/ holds only pickled weights" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


# =========================================================================== the app, over HTTP
HOSTILE_CLASSES = ["<img src=x onerror=alert(1)>", "=HYPERLINK(\"http://evil\")", "*bold* [link](http://x)"]


def _hostile_bundle(root: Path, tiny_model_dir: Path) -> Path:
    """A loadable bundle whose class names are markup and formulas, with one example per class."""
    import torch

    from diffmix_core.bundle import save_bundle

    folder = root / "bundles" / "hostile"
    tokens = [f"<h{i}>" for i in range(len(HOSTILE_CLASSES))]
    for i, name in enumerate(HOSTILE_CLASSES):
        (folder / "examples" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (60 * i, 90, 30)).save(folder / "examples" / name / "0.png")
    save_bundle(folder, classes=HOSTILE_CLASSES, tokens=tokens,
                embeddings={t: torch.randn(WIDTH, generator=torch.Generator().manual_seed(i))
                            for i, t in enumerate(tokens)},
                lora_state_dict=None, base_model=str(tiny_model_dir), superclass="bird", resolution=32,
                extra={"examples": "examples"})
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sec-app")
    with world_environment(root, DIFFMIX_MAX_UPLOAD_MB="1", GRADIO_TEMP_DIR=str(root / "gradio-tmp")):
        yield from _serve_world(root, tmp_path_factory, tiny_model_dir)


def _serve_world(root: Path, tmp_path_factory, tiny_model_dir):
    """The world fixture's body, inside its environment: the bundles, the app launched, torn down after."""
    bundle = make_world(root, tmp_path_factory.getbasetemp())
    hostile = _hostile_bundle(root, tiny_model_dir)
    broken = root / "bundles" / "broken"
    broken.mkdir(parents=True)
    (broken / "adapter.json").write_text("{not json")
    evil = root / "bundles" / "evil-template"
    import shutil

    shutil.copytree(hostile, evil)
    meta = json.loads((evil / "adapter.json").read_text())
    meta["template"] = "{word:>100000000}"
    (evil / "adapter.json").write_text(json.dumps(meta))
    tokens: list[str] = []
    import diffmix_core.app.store as S

    real_new_token = S.new_token

    def recording_new_token() -> str:   # the secrets the server hands out, to search every output for
        tokens.append(real_new_token())
        return tokens[-1]

    S.new_token = recording_new_token
    from diffmix_core.ui import build_demo

    demo = build_demo()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield {"root": root, "bundle": str(bundle), "hostile": str(hostile), "url": demo.local_url, "demo": demo,
           "example": str(bundle / "examples" / "owl" / "0.png"), "tokens": tokens}
    demo.close()
    S.new_token = real_new_token


def _fn_index(demo, name: str) -> int:
    return next(i for i, f in enumerate(demo.fns.values()) if f.fn is not None and f.fn.__name__ == name)


def _raw_call(url: str, fn_index: int, data: list | str, session_hash: str) -> dict:
    """Trigger any event (private ones too) the way a script without gradio_client can: join the
    queue, then read the event stream until the result."""
    import httpx

    data = data if isinstance(data, str) else json.dumps(data)   # a str: raw JSON (NaN, 1e400 ...)
    body = (f'{{"data": {data}, "fn_index": {fn_index}, "session_hash": "{session_hash}", '
            '"event_data": null, "trigger_id": null}')
    with httpx.Client(timeout=120) as http:
        r = http.post(url + "gradio_api/queue/join", content=body, headers={"content-type": "application/json"})
        if r.status_code != 200:   # refused when it joined the queue (the inputs' validator or Gradio's checks)
            return {"msg": "process_completed", "success": False, "output": {"error": r.text}}
        with http.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    msg = json.loads(line[5:])
                    if msg.get("msg") == "process_completed":
                        return msg
    raise AssertionError("no result")


# 3. records carry no secrets; what a session shows cannot open it
def test_session_token_never_leaks_and_what_leaks_opens_nothing(world, tmp_path):
    from gradio_client import Client, handle_file

    from diffmix_core.records import read_png_record

    victim = Client(world["url"], verbose=False)
    up = tmp_path / "mine.png"
    Image.new("RGB", (32, 32), (1, 200, 3)).save(up)
    out = sweep(victim, world, upload=handle_file(str(up)), example="", strengths="0.5, 1.0")
    ids = [r[0] for r in out[3]["data"]]
    victim.predict(",".join(ids), "add", api_name="/select")
    msg, shown_folder, zip_path = victim.predict(api_name="/export")
    assert not Path(shown_folder).is_absolute() and str(world["root"]) not in msg   # issue 25 item 11
    folder = world["root"] / "out" / shown_folder
    # everything the victim was shown or could share
    shown = json.dumps([out, msg, folder, zip_path], default=str)
    session_dirs = [p for p in (world["root"] / "sessions").iterdir() if p.is_dir()]
    mine = [p for p in session_dirs if (p / "images" / f"{ids[0]}.png").is_file()]
    assert len(mine) == 1 and world["tokens"], "the server handed out no session token"
    blobs = [shown, Path(zip_path).read_bytes().decode("latin-1")]
    blobs += [p.read_bytes().decode("latin-1") for p in Path(folder).rglob("*") if p.is_file()]
    blobs += [p.read_bytes().decode("latin-1") for d in session_dirs for p in d.rglob("*") if p.is_file()]
    for token in world["tokens"]:   # no token in any output, export file, record or PNG chunk
        assert not any(token in b for b in blobs)
    for row in (json.loads(line) for line in (Path(folder) / "imagefolder" / "metadata.jsonl").open()):
        assert row["source_path"].startswith("sources/") and str(world["root"]) not in row["source_path"]
    png = next(Path(folder).rglob("*.png"))
    assert read_png_record(png)["source_path"].startswith("sources/")
    # the attack: every 32-hex string the victim's outputs and export show, and the session's folder
    # name itself, tried as a token (restore "it", then export "its" batch), as a raw HTTP client would
    import re

    guesses = sorted(set(re.findall(r"[0-9a-f]{32}", "".join(blobs[:-1]))) | {mine[0].name})
    demo = world["demo"]
    for k, guess in enumerate(guesses[:40]):
        hacked = _raw_call(world["url"], _fn_index(demo, "on_session"), [guess, guess], f"attacker{k:04d}")
        assert hacked["success"]
        result = _raw_call(world["url"], _fn_index(demo, "on_export"), [None], f"attacker{k:04d}")
        assert not result["success"] and "curated batch is empty" in json.dumps(result), guess
    # the victim still has its own batch
    again = victim.predict(api_name="/export")
    assert len(list((world["root"] / "out" / again[1] / "imagefolder").glob("*.png"))) == len(ids)


def test_idle_sessions_expire_and_sessions_and_exports_are_bounded(world, monkeypatch):
    import diffmix_core.app.store as S
    from gradio_client import Client

    client = Client(world["url"], verbose=False)
    ids = [r[0] for r in sweep(client, world, seeds="5")[3]["data"]]
    client.predict(",".join(ids), "add", api_name="/select")
    mine = [p for p in (world["root"] / "sessions").iterdir() if (p / "records.jsonl").is_file()
            and ids[0] in (p / "records.jsonl").read_text()]
    assert len(mine) == 1
    old = time.time() - 25 * 3600   # idle for 25 h: past the default 24 h
    os.utime(mine[0], (old, old))
    with pytest.raises(Exception, match="unknown image id"):
        client.predict(",".join(ids), "add", api_name="/select")
    assert not mine[0].exists()   # expired: its images went with it
    # size policy: sessions over DIFFMIX_SESSIONS_MAX_MB lose the least recently used first
    stale = []
    for k in range(3):
        d = world["root"] / "sessions" / f"{k:032x}"
        d.mkdir()
        (d / "blob").write_bytes(os.urandom(600_000))
        os.utime(d, (old + 24 * 3600 + k, old + 24 * 3600 + k))   # idle 1 h, oldest first
        stale.append(d)
    monkeypatch.setenv("DIFFMIX_SESSIONS_MAX_MB", "1")
    S._PRUNED.clear()
    sweep(Client(world["url"], verbose=False), world, seeds="6")
    assert not stale[0].exists() and not stale[1].exists()   # the least recently used went first
    assert sum(p.stat().st_size for p in (world["root"] / "sessions").rglob("*") if p.is_file()) <= 2**20


def test_app_requests_are_bounded_before_any_work(world, tmp_path):
    import httpx
    from gradio_client import Client

    client = Client(world["url"], verbose=False)
    for strengths, seeds, why in (("0.1:0.9:100000000", "0", "100,000,000 strengths exceed the limit"),
                                  ("0.5", "n=1000000000", "1,000,000,000 seeds exceed the limit"),
                                  ("0.5", " ".join(["1"] * 5000),
                                   "give at most 64 seeds|seeds is 9,999 characters; the limit is"),
                                  ("0.5", ",".join(["1"] * 65), "65 seeds exceed the limit"),
                                  ("0.3, 0.5, 0.7, 0.9", "n=20", "= 80 images exceeds the limit of 64")):
        t0 = time.perf_counter()
        with pytest.raises(Exception, match=why):
            sweep(client, world, strengths=strengths, seeds=seeds)
        assert time.perf_counter() - t0 < 30   # a list of 10**8 would take minutes (and memory)
    # an upload over DIFFMIX_MAX_UPLOAD_MB (1 MB here) is refused by the HTTP layer and leaves nothing
    tmp = world["root"] / "gradio-tmp"
    before = sorted(p for p in tmp.rglob("*")) if tmp.exists() else []
    big = os.urandom(3 * 2**20)
    r = httpx.post(world["url"] + "gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=60)
    assert r.status_code == 413, (r.status_code, r.text[:200])
    after = sorted(p for p in tmp.rglob("*")) if tmp.exists() else []
    assert after == before
    # an upload our decoder refuses (a text file named .jpg) is deleted from Gradio's cache at once
    from gradio_client import handle_file

    fake = tmp_path / "not-an-image.jpg"
    fake.write_text("ssh-rsa AAAA")
    with pytest.raises(Exception, match="not an image"):
        sweep(client, world, upload=handle_file(str(fake)), example="")
    assert not list(tmp.rglob("not-an-image*")) and not list((world["root"] / "sessions").rglob("not-an-image*"))


def test_untrusted_text_is_escaped_and_broken_bundles_are_listed(world):
    import httpx
    from gradio_client import Client

    client = Client(world["url"], verbose=False)
    info = client.predict(world["hostile"], api_name="/bundle_info")[0]
    for name in HOSTILE_CLASSES:
        assert name not in info
    assert "<img" not in info and "&lt;img" in info and "\\*bold\\*" in info
    with pytest.raises(Exception) as err:
        sweep(client, world, source="<script>alert(1)</script>")
    assert "<script>" not in str(err.value) and "&lt;script&gt;" in str(err.value)
    # the CSV of a sweep over those classes: no cell starts a formula
    out = sweep(client, world, bundle=world["hostile"], source=HOSTILE_CLASSES[0], target=HOSTILE_CLASSES[1],
                 example=str(Path(world["hostile"]) / "examples" / HOSTILE_CLASSES[0] / "0.png"))
    import csv as _csv

    with open(out[5], newline="", encoding="utf-8") as f:
        rows = list(_csv.reader(f))
    assert any(HOSTILE_CLASSES[1][1:] in cell for row in rows for cell in row)
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in rows[1:] for cell in row
                   if not cell.lstrip("-").replace(".", "", 1).isdigit())
    # the app started although two bundles are broken, and lists them with their reasons
    config = httpx.get(world["url"] + "config", timeout=30).json()
    panel = next(c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == "broken-bundles")
    text = panel["value"].replace("\\", "")
    assert panel["visible"] and "Bundles left out" in text
    assert "bundles/broken`: " in text and "is not JSON" in text
    assert "bundles/evil-template`: " in text and "plain, nothing else in braces" in text
    assert "bundles/birds" not in text and "bundles/hostile" not in text   # the good ones are served


def test_profile_writes_from_anonymous_clients_are_refused(world, monkeypatch):
    from gradio_client import Client

    from diffmix_core.bundle import load_bundle
    from diffmix_core.profiles import profile_path

    bundle = load_bundle(world["bundle"])
    target = profile_path(bundle, world["root"] / "out")
    adapter = (Path(world["bundle"]) / "adapter.json").read_bytes()
    args = (world["bundle"], 0.7, "diff-mix", 10, 5.0, 0.5, None, None, None, None, None)
    proxied = [{h: "203.0.113.9"} for h in ("X-Forwarded-For", "CF-Connecting-IP", "True-Client-IP",
                                             "X-Forwarded-Host", "X-Real-IP", "Forwarded", "Fastly-Client-IP",
                                             "X-Forwarded-Proto", "X-Client-IP")]   # issue 25 item 15: any proxy
    for headers, env in [*((h, {}) for h in proxied), ({}, {"DIFFMIX_ALLOW_PROFILE_SAVE": "0"}),
                         ({}, {"SPACE_ID": "someone/space"})]:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        client = Client(world["url"], verbose=False, headers=headers)
        with pytest.raises(Exception, match="saving profiles is"):
            client.predict(*args, api_name="/save_profile")
        for k in env:
            monkeypatch.delenv(k)
        assert not target.exists() and (Path(world["bundle"]) / "adapter.json").read_bytes() == adapter
    # NaN and infinity (JSON clients cannot send them; a raw one can) are refused, nothing is written
    for bad in ("NaN", "Infinity", "1e400"):
        body = json.dumps([world["bundle"], 0.7, "diff-mix", 10, "GUIDANCE", None, None, None, None, None, None])
        result = _raw_call(world["url"], _fn_index(world["demo"], "on_save_profile"),
                           body.replace('"GUIDANCE"', bad), f"nan{bad[:3]}")
        why = json.dumps(result)   # ours, or Gradio's own slider bound (guidance is a slider up to 20)
        assert not result["success"] and ("guidance_scale must be a number" in why or "maximum value" in why), why
    assert not target.exists()
    msg = Client(world["url"], verbose=False).predict(*args, api_name="/save_profile")
    assert "saved" in msg and target.is_file() and (Path(world["bundle"]) / "adapter.json").read_bytes() == adapter


# =========================================================================== issue 25: third round (library)
def _adapter_with_classes(folder: Path, n: int) -> Path:
    """A hostile adapter.json with ``n`` classes (nothing else in it is valid: the class cap is
    checked before any other work)."""
    folder.mkdir(parents=True)
    names = [f"c{i}" for i in range(n)]
    (folder / "adapter.json").write_text(json.dumps({
        "format_version": 1, "base_model": {"model": "x/y", "revision": None}, "classes": names,
        "tokens": [f"<{c}>" for c in names], "superclass": "", "template": "{word}", "resolution": 512,
        "lora": None, "training": {}, "steps": 0, "files": {f"embeddings/{c}.safetensors": "0" * 64 for c in names}}))
    return folder


def test_class_count_is_capped_before_any_other_work(tmp_path, capsys, monkeypatch):
    from diffmix_core.bundle import load_bundle

    big = _adapter_with_classes(tmp_path / "big", 16_000)
    with pytest.raises(ValueError, match="16,000 classes: a bundle may have at most 10,000 classes"):
        load_bundle(big)
    err = refused(capsys, "translate", "--bundle", str(big), "--image", str(big / "adapter.json"),
                  "--source-class", "c0", "--target", "c1", "--out", str(tmp_path / "o"), "--quiet")
    assert "at most 10,000 classes" in err and "DIFFMIX_MAX_CLASSES" in err and "Traceback" not in err
    # configurable: with a higher cap the same file gets past the count (and fails on its missing files)
    monkeypatch.setenv("DIFFMIX_MAX_CLASSES", "20000")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_bundle(big)
    monkeypatch.setenv("DIFFMIX_MAX_CLASSES", "3")
    with pytest.raises(ValueError, match="at most 3 classes"):
        load_bundle(_adapter_with_classes(tmp_path / "four", 4))


class _CountingName(str):
    """A class name that counts how often it is compared for equality."""

    compared = 0

    def __eq__(self, other):
        type(self).compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_name_checks_are_linear_in_the_class_count():
    from diffmix_core.bundle import _check_names

    n = 9_000
    classes = [_CountingName(f"class {i}") for i in range(n)]
    tokens = [_CountingName(f"<c{i}>") for i in range(n)]
    _CountingName.compared = 0
    assert len(_check_names(classes, tokens)[0]) == n
    assert _CountingName.compared <= 4 * n, _CountingName.compared   # a pairwise check makes ~n**2 = 81,000,000
    with pytest.raises(ValueError, match=r"repeated: \['class 7'\]"):
        _check_names(classes + [_CountingName("class 7")], tokens + [_CountingName("<extra>")])


def _png(path: Path, colour=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def test_bundle_examples_are_regular_files_inside_the_bundle(tiny_model_dir, tmp_path):
    """A symlinked example, an absolute or '../' file_name in examples/metadata.jsonl: skipped with
    a warning by the one examples scan every consumer (the app, the demo grid) reads."""
    import shutil

    from diffmix_core.bundle import bundle_examples, load_bundle

    secret = _png(tmp_path / "outside" / "secret.png", (1, 2, 3))
    good = tiny_bundle(tmp_path, tiny_model_dir, lora=False)
    classes = load_bundle(good).classes
    # ImageFolder examples with a symlinked file and a symlinked class folder
    b = tmp_path / "linked"
    shutil.copytree(good, b)
    _png(b / "examples" / classes[0] / "own.png")
    (b / "examples" / classes[0] / "leak.png").symlink_to(secret)
    (b / "examples" / classes[1]).symlink_to(secret.parent)
    _edit(b, examples="examples")
    with pytest.warns(UserWarning, match="example.* skipped.*(symlink|outside)"):
        found = bundle_examples(load_bundle(b))
    assert found == [(str((b / "examples" / classes[0] / "own.png").resolve()), classes[0])]
    # metadata.jsonl naming files outside the examples folder
    m = tmp_path / "meta"
    shutil.copytree(good, m)
    _png(m / "examples" / "own.png")
    _png(m / "examples" / "own2.png", (9, 9, 9))
    _png(m / "ex-up.png")
    rows = [{"file_name": "own.png", "label": classes[0]}, {"file_name": "own2.png", "label": classes[1]},
            {"file_name": str(secret), "label": classes[1]},
            {"file_name": "../ex-up.png", "label": classes[1]}]
    write_jsonl_atomic(m / "examples" / "metadata.jsonl", rows)
    _edit(m, examples="examples")
    with pytest.warns(UserWarning, match="outside the folder"):
        found = bundle_examples(load_bundle(m))
    assert [Path(p).name for p, _ in found] == ["own.png", "own2.png"]


def _synthetic_set(root: Path) -> Path:
    from diffmix_core.export import ExportWriter

    with ExportWriter(root, ("imagefolder", "authors"), classes=CLASSES) as w:
        for n in range(4):
            src, tgt = CLASSES[n % 3], CLASSES[(n + 1) % 3]
            w.add(Image.new("RGB", (32, 32), (60 * n, 90, 30)),
                  {"id": f"r{n}", "source_class": src, "target_class": tgt, "strength": 0.5, "strength_run": 0.5,
                   "seed": n, "soft_label": soft_label(src, tgt, 0.5)}, number=n)
    return root


def test_synthetic_sets_never_follow_names_outside_their_folder(tmp_path, capsys):
    """`diffmix train --synthetic`: an absolute or '../' file_name in metadata.jsonl, a meta.csv Path
    with '..', or a symlinked image is refused before any training, naming the line."""
    import shutil

    from diffmix_core.export import read_synthetic

    data = tmp_path / "data"
    for k, name in enumerate(CLASSES):
        for i in range(4):
            _png(data / name / f"{i}.png", (80 * k, 200 - 50 * k, 40 + i))
    secret = _png(tmp_path / "secret.png", (1, 2, 3))
    good = _synthetic_set(tmp_path / "good")
    cases = {}
    for name, value in (("absolute", str(secret)), ("up", "../../secret.png")):
        case = tmp_path / name
        shutil.copytree(good, case)
        meta = case / "imagefolder" / "metadata.jsonl"
        rows = [json.loads(line) for line in meta.read_text().splitlines()]
        rows[1]["file_name"] = value
        write_jsonl_atomic(meta, rows)
        cases[name] = case / "imagefolder"
    link = tmp_path / "link"
    shutil.copytree(good, link)
    first = sorted((link / "imagefolder").glob("*.png"))[0]
    first.unlink()
    first.symlink_to(secret)
    cases["symlink"] = link / "imagefolder"
    csv_up = tmp_path / "csv"
    shutil.copytree(good, csv_up)
    text = (csv_up / "authors" / "meta.csv").read_text().splitlines()
    cells = text[1].split(",")
    cells[-1] = "../../secret.png"
    (csv_up / "authors" / "meta.csv").write_text("\n".join([text[0], ",".join(cells), *text[2:]]) + "\n")
    cases["meta.csv up"] = csv_up / "authors"
    for name, folder in cases.items():
        with pytest.raises(ValueError, match="outside|symlink"):
            read_synthetic(folder)
        err = refused(capsys, "train", "--data", str(data), "--synthetic", str(folder), "--out",
                      str(tmp_path / f"run-{name}"), "--epochs", "1", "--model", "test_resnet", "--pretrained", "none",
                      "--resolution", "32", "--quiet")
        assert ("outside" in err or "symlink" in err) and "Traceback" not in err, (name, err)
        assert not (tmp_path / f"run-{name}" / "report.json").exists()
    assert len(read_synthetic(good)[1]) == 4


def test_no_writer_replaces_or_writes_into_what_it_reads(tiny_model_dir, tmp_path, capsys):
    """export --overwrite never replaces the folder holding the images, the records or the bundle
    (nor writes inside the bundle); finetune --overwrite never writes into or over its dataset."""
    import shutil

    from diffmix_core.bundle import load_bundle

    syn = make_generated(tmp_path / "syn", n=6)   # laid out as synthesize does: images/ + records.jsonl
    (syn / "images").mkdir()
    rows = [json.loads(line) for line in (syn / "records.jsonl").read_text().splitlines()]
    for row in rows:
        shutil.move(syn / row["file_name"], syn / "images" / row["file_name"])
        row["file_name"] = f"images/{row['file_name']}"
    write_jsonl_atomic(syn / "records.jsonl", rows)
    before = tree(syn)
    for out in (syn / "images", syn):
        err = refused(capsys, "export", "--from", str(syn), "--out", str(out), "--overwrite", "--quiet")
        assert "contains" in err and "Traceback" not in err, err
    assert tree(syn) == before
    bundle = tiny_bundle(tmp_path, tiny_model_dir, lora=False)
    bundle_before = tree(bundle)
    classes = list(load_bundle(bundle).classes)
    _rewrite_classes(syn, classes)
    for out in (bundle, bundle / "export", bundle.parent):
        err = refused(capsys, "export", "--from", str(syn), "--out", str(out), "--bundle", str(bundle),
                      "--overwrite", "--quiet")
        assert "the bundle" in err or "source folder" in err, err
    assert tree(bundle) == bundle_before and load_bundle(bundle).num_classes == 3
    assert main(["export", "--from", str(syn), "--out", str(tmp_path / "exp"), "--bundle", str(bundle),
                 "--quiet"]) == 0   # the same export to its own folder works
    data = tmp_path / "data"
    for k, name in enumerate(classes):
        for i in range(10):
            Image.new("RGB", (32, 32), (80 * k, 40, 9 * i)).save(_mkdir(data / name.replace(" ", "_")) / f"{i}.png")
    data_before = tree(data)
    split = ["--split-file", str(tmp_path / "split.json")]
    for out in (data, data / "run"):   # every writer that reads a dataset: never into or over it
        for cmd in (["finetune", "--base", str(tiny_model_dir), "--overwrite", "--max-steps", "1"],
                    ["synthesize", "--bundle", str(bundle), "--multiplier", "1", "--steps", "2"],
                    ["train", "--model", "test_resnet", "--pretrained", "none", "--epochs", "1"],
                    ["train-reference", "--model-name", "test_resnet", "--pretrained", "none", "--epochs", "1"]):
            err = refused(capsys, cmd[0], "--data", str(data), "--out", str(out), *split, *cmd[1:], "--quiet")
            assert "the dataset" in err, (cmd, err)
    err = refused(capsys, "synthesize", "--data", str(data), *split, "--bundle", str(bundle), "--out",
                  str(bundle / "syn"), "--multiplier", "1", "--steps", "2", "--quiet")
    assert "the bundle" in err, err
    assert tree(data) == data_before and tree(bundle) == bundle_before


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _rewrite_classes(folder: Path, classes: list[str]) -> None:
    rows = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["source_class"], row["target_class"] = classes[i % 3], classes[(i + 1) % 3]
        row["soft_label"] = soft_label(row["source_class"], row["target_class"], 0.5)
    write_jsonl_atomic(folder / "records.jsonl", rows)


# =========================================================================== issue 25: third round (the app)
def _join(url: str, fn_index: int, data: list, session_hash: str) -> object:
    import httpx

    body = {"data": data, "fn_index": fn_index, "session_hash": session_hash, "event_data": None, "trigger_id": None}
    return httpx.post(url + "gradio_api/queue/join", json=body, timeout=60)


# 1. one request cannot stall the model lane; 10. a wrong-type call is one line
def test_oversized_and_wrong_type_fields_are_refused_at_once_outside_the_lane(world, capfd):
    import threading

    from gradio_client import Client

    other = Client(world["url"], verbose=False)
    done: dict = {}
    t = threading.Thread(target=lambda: done.setdefault("out", sweep(other, world, strengths="0.5, 1.0", seeds="8")))
    t.start()   # another session's small sweep, in the model lane meanwhile
    attacker = Client(world["url"], verbose=False)
    huge = "a/" * 5_000_000   # 10 MB: resolving it as a path took 25+ minutes inside the lane
    t0 = time.perf_counter()
    with pytest.raises(Exception, match=r"example is 10,000,000 characters; the limit is 4,096"):
        sweep(attacker, world, example=huge)
    assert time.perf_counter() - t0 < 5
    # every text field of every endpoint, by name (1 MB each: far over any bound)
    big = "x" * 1_000_000
    sweep_args = [world["bundle"], None, world["example"], "owl", "duck", "0.5", "0", 2, 5.0, "diff-mix"]
    names = ["bundle_path", "upload", "example", "source_class", "target", "strengths", "seeds", None, None, "strategy"]
    calls = [("/sweep", sweep_args, i, n) for i, n in enumerate(names) if n]
    calls += [("/bundle_info", [world["bundle"]], 0, "path"), ("/select", ["x", "add"], 0, "ids"),
              ("/select", ["x", "add"], 1, "mode"),
              ("/save_profile", [world["bundle"], 0.5, "diff-mix", 10, 5.0] + [None] * 6, 0, "bundle_path"),
              ("/save_profile", [world["bundle"], 0.5, "diff-mix", 10, 5.0] + [None] * 6, 2, "strategy")]
    # dropdowns and the file: Gradio itself refuses a value not offered, or text for a file (400)
    gradio_refuses = ("bundle_path", "path", "upload")
    for api, args, at, name in calls:
        args = list(args)
        args[at] = big
        t0 = time.perf_counter()
        why = "400 Bad Request" if name in gradio_refuses else rf"{name} is 1,000,000 characters; the limit is"
        with pytest.raises(Exception, match=why):
            attacker.predict(*args, api_name=api)
        assert time.perf_counter() - t0 < 5, (api, name)
    # the page's own events (private, reached by fn_index) are bounded the same way
    demo = world["demo"]
    for fn, data in (("on_bundle", [big]), ("on_bundle_text", [big]), ("on_restore", [big, ""]),
                     ("on_upload", [world["bundle"], None, big]),
                     ("on_source_change", [world["bundle"], None, big, "owl"])):
        r = _join(world["url"], _fn_index(demo, fn), data, "bigfields")
        assert r.status_code in (400, 422) and ("1,000,000 characters" in r.text or "list of choices" in r.text), (
            fn, r.status_code, r.text[:200])
    t.join(120)
    assert len(done["out"][3]["data"]) == 2   # the other session's sweep completed meanwhile
    # 10. wrong types: one clear line each, no traceback in the server's log
    capfd.readouterr()
    with pytest.raises(Exception, match="bundle_path is missing"):
        attacker.predict(None, None, world["example"], "owl", "duck", "0.5", "0", 2, 5.0, "diff-mix",
                         api_name="/sweep")
    with pytest.raises(Exception, match="ids is missing|ids must be text"):
        attacker.predict(None, "add", api_name="/select")
    for fn, data in (("on_bundle", [None]), ("on_select", [None, None, "add"]), ("on_sweep_box", [None, 5]),
                     ("on_export", [7]), ("bundle_info", [["a"]])):
        _join(world["url"], _fn_index(demo, fn), data, "wrongtypes")
    time.sleep(1)
    err = capfd.readouterr()
    assert "Traceback" not in err.err + err.out, (err.err + err.out)[-3000:]


# 2. the job limit counts exactly what will run, whatever the fields hold
def test_sweep_job_limit_counts_every_target_strength_and_seed(world, monkeypatch):
    from gradio_client import Client

    from diffmix_core.app.store import Limits
    from diffmix_core.app.sweep import SweepRequest, plan_sweep
    from diffmix_core.bundle import load_bundle
    from diffmix_core.data import load_image
    from diffmix_core.translate import Source

    monkeypatch.setenv("DIFFMIX_MAX_JOBS", "2")
    client = Client(world["url"], verbose=False)
    sessions = world["root"] / "sessions"
    before = len(list(sessions.rglob("*.png")))
    for target in ("duck,flamingo", "duck, flamingo, duck, flamingo", "all other classes"):
        with pytest.raises(Exception, match=r"(2|9) targets x 1 strengths x 2 seeds = (4|18) images exceeds the limit"):
            sweep(client, world, target=target, seeds="0, 1")
    assert len(list(sessions.rglob("*.png"))) == before   # nothing was made
    # the counted number is the number of jobs, for every kind of field and strategy
    bundle = load_bundle(world["bundle"])
    source = Source(load_image(world["example"]), "owl", "0", world["example"])
    limits = Limits(max_jobs=10_000)
    for strategy in ("diff-mix", "diff-aug", "diff-gen"):
        for target, strengths, seeds in (("duck", "0.5", "0"), ("duck,flamingo,duck", "0.5, 0.8, 0.5", "n=3"),
                                         ("all other classes", "0.5:1:4", "0, 1, -1"), (" duck ,, owl ", "1", "7")):
            request = SweepRequest("owl", target, strengths, seeds, 2, 5.0, strategy)
            n = len(plan_sweep(bundle, source, request, limits).jobs)
            assert len(plan_sweep(bundle, source, request, Limits(max_jobs=n)).jobs) == n   # counted == made
            with pytest.raises(ValueError, match="exceed|give at most"):
                plan_sweep(bundle, source, request, Limits(max_jobs=n - 1))


# 3. a typed bundle path loads only from the bundle folders (or the Hub), never the upload cache
def test_typed_bundle_paths_load_only_from_the_bundle_folders(world, tmp_path):
    import shutil

    import httpx

    demo, fn = world["demo"], _fn_index(world["demo"], "on_bundle_text")
    adapter = (Path(world["bundle"]) / "adapter.json").read_bytes()
    r = httpx.post(world["url"] + "gradio_api/upload", files={"files": ("adapter.json", adapter, "application/json")},
                   timeout=60)
    uploaded = Path(r.json()[0])
    assert uploaded.is_file()
    outside = tmp_path / "elsewhere"
    shutil.copytree(world["bundle"], outside)   # a loadable bundle, outside the bundle folders
    for typed in (str(uploaded), str(uploaded.parent), str(outside), str(outside / "adapter.json"), "/etc",
                  str(Path(world["bundle"]) / ".." / ".." / "out")):
        result = _raw_call(world["url"], fn, [typed], "typedpath")
        why = json.dumps(result)
        assert not result["success"] and "is not in this app's bundle folders" in why, why
        assert str(tmp_path) not in why and str(uploaded.parent) not in why
    ok = _raw_call(world["url"], fn, [world["hostile"]], "typedpath")
    assert ok["success"], ok


# 9. a bundle folder outside the working and temp dirs is served (its example images, nothing else)
def test_bundle_folder_outside_cwd_and_temp_is_served(world, monkeypatch):
    import shutil
    import tempfile
    import uuid

    import httpx
    from gradio_client import Client

    from diffmix_core.ui import build_demo

    root = Path.home() / ".cache" / f"diffmix-test-{uuid.uuid4().hex[:12]}"   # neither cwd nor temp
    for inside in (Path.cwd(), Path(tempfile.gettempdir()), world["root"] / "gradio-tmp"):
        assert not root.resolve().is_relative_to(inside.resolve())
    try:
        shutil.copytree(world["bundle"], root / "birds")
        monkeypatch.setenv("DIFFMIX_BUNDLES", str(root))
        demo = build_demo()
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
        try:
            client = Client(demo.local_url, verbose=False)
            out = client.predict(str(root / "birds"), api_name="/bundle_info")   # the page's first load, too
            assert "classes" in out[0] and len(out[1]) >= 4
            assert all(Path(item["image"]).is_file() for item in out[1])   # the example images came
            # nothing else of the bundle folder is served
            for name in ("adapter.json", "reference/meta.json"):
                r = httpx.get(f"{demo.local_url}gradio_api/file={root / 'birds' / name}", timeout=30)
                assert r.status_code in (403, 404), (name, r.status_code)
        finally:
            demo.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# 6. Gradio's cache stays within the sessions' bounds; uploads no handler took are deleted
def test_gradio_cache_is_bounded_and_unclaimed_uploads_go(world, monkeypatch, tmp_path):
    import httpx
    from gradio_client import Client, handle_file

    import diffmix_core.app.store as S

    cache = world["root"] / "gradio-tmp"
    client = Client(world["url"], verbose=False)
    up = tmp_path / "taken.png"
    Image.new("RGB", (32, 32), (9, 99, 199)).save(up)
    sweep(client, world, upload=handle_file(str(up)), example="")   # an upload a handler took
    taken = [p for p in cache.rglob("taken*.png")]
    assert taken
    anonymous = []
    for k in range(5):   # anonymous uploads no handler ever sees, ~0.9 MB each
        r = httpx.post(world["url"] + "gradio_api/upload",
                       files={"files": (f"junk{k}.png", os.urandom(900_000), "image/png")}, timeout=60)
        anonymous.append(Path(r.json()[0]))
    assert all(p.is_file() for p in anonymous)
    monkeypatch.setenv("DIFFMIX_UPLOAD_GRACE_S", "0")
    S._PRUNED.clear()
    client.predict("", "add", api_name="/select")   # any request tidies the cache
    assert not any(p.exists() for p in anonymous) and all(p.is_file() for p in taken)
    # and outputs (grids, CSVs, zips) with everything else stay within DIFFMIX_SESSIONS_MAX_MB
    monkeypatch.setenv("DIFFMIX_SESSIONS_MAX_MB", "1")
    for seed in range(3):
        S._PRUNED.clear()
        sweep(client, world, seeds=str(20 + seed))
    S._PRUNED.clear()
    client.predict("", "add", api_name="/select")
    assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) <= 2**20


# 11. visitors see no absolute server path: messages, panel, errors, exported records
def test_visitors_see_no_server_paths(world, tmp_path, monkeypatch):
    import tempfile

    from gradio_client import Client, handle_file

    from diffmix_core.records import read_png_record

    server = [str(world["root"]), tempfile.gettempdir(), str(Path.cwd())]
    def clean(text: object) -> bool:
        return not any(s in str(text) for s in server)

    client = Client(world["url"], verbose=False)
    panel = client.predict(world["bundle"], api_name="/bundle_info")[0]
    assert "base model" in panel and clean(panel), panel
    # an example source, every strategy that carries a path of its own (diff-ii names its partner)
    out = client.predict(world["bundle"], None, world["example"], "owl", "duck", "0.5, 1.0", "0", 2, 5.0,
                         "diff-mix, diff-ii", False, "", None, 3, api_name="/sweep")
    client.predict(",".join(r[0] for r in out[3]["data"]), "add", api_name="/select")
    msg, folder, _ = client.predict(api_name="/export")
    assert clean(msg) and clean(folder) and folder.startswith("exports/")
    exported = world["root"] / "out" / folder
    rows = [json.loads(line) for line in (exported / "imagefolder" / "metadata.jsonl").open()]
    assert {r["strategy"] for r in rows} == {"diff-mix", "diff-ii"}, rows
    for rec in rows + [read_png_record(p) for p in exported.rglob("*.png")]:
        for key in ("bundle", "base_model", "source_path"):
            assert rec.get(key) and clean(rec[key]) and not Path(rec[key]).is_absolute(), (key, rec.get(key))
        for key, value in rec.items():   # the class, not the known keys: no field names a server path
            assert clean(json.dumps(value)) and not (isinstance(value, str) and Path(value).is_absolute()), \
                (key, value)
    assert {r["source_path"] for r in rows} == {"examples/owl/0.png"} and rows[0]["bundle"] == "birds"
    assert {r["partner_path"] for r in rows if r["strategy"] == "diff-ii"} == {"examples/owl/1.png"}
    # an image error quotes no upload-cache path
    fake = tmp_path / "not-an-image.jpg"
    fake.write_text("hello")
    with pytest.raises(Exception) as err:
        sweep(client, world, upload=handle_file(str(fake)), example="")
    assert "not-an-image" in str(err.value) and clean(err.value), str(err.value)
    # the profile's path is shown under the output root
    monkeypatch.setenv("DIFFMIX_ALLOW_PROFILE_SAVE", "1")
    saved = client.predict(world["bundle"], 0.6, "diff-mix", 10, 5.0, None, None, None, None, None, None,
                           api_name="/save_profile")
    assert "saved to `profiles/" in saved and clean(saved), saved
    for p in (world["root"] / "out" / "profiles").glob("*.json"):
        p.unlink()   # leave no profile for the other tests
