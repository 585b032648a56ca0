"""Reliability and security (issue 9), the cases no stage's own tests cover: bad images
through the fine-tuning loader and the app's upload, hostile weight files, limits
through the CLI and the running app, hostile class names through a real export,
a full disk and SIGKILLs during fine-tuning, and many users at once."""
from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffmix_core.apply import apply_bundle
from diffmix_core.authors import import_diffmix
from diffmix_core.bundle import load_bundle
from diffmix_core.cli import main
from diffmix_core.data import read_dataset
from diffmix_core.records import read_jsonl, sha256_file

from helpers import (CLASSES, WIDTH, Payload, bundle_weights, make_bad_cases, make_good_cases, make_imagefolder,
                     make_world, shape_image, sweep, tiny_bundle, world_environment)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffmix_core"
FINETUNE_FAST = ["--superclass", "bird", "--lr", "1e-2", "--ti-lr", "1e-1", "--shots", "2", "--resolution", "32",
                 "--rank", "2", "--lora-alpha", "2", "--num-workers", "0", "--sample-steps", "0", "--quiet"]


# =========================================================================== 1. image inputs
def test_finetune_loader_reports_skips_and_strict_fails_on_every_bad_image(tiny_model_dir, tmp_path, capsys):
    """ImageFolder and CSV datasets holding every bad case of test_images next to every good one."""
    ds = make_imagefolder(tmp_path / "ds", classes=("owl", "duck"), per_class=2)
    good = make_good_cases(ds / "owl")
    bad = make_bad_cases(ds / "duck")
    present = {n: v for n, v in bad.items() if v[0].exists()}   # a folder cannot list a missing file
    with pytest.warns(UserWarning, match=f"skipped {len(present)} unusable"):
        data = read_dataset(ds, show_progress=False)
    reasons = dict(data.skipped)
    assert set(reasons) == {str(p) for p, _ in present.values()}
    for name, (path, fragment) in present.items():
        assert fragment in reasons[str(path)], name
    assert data.counts() == [2, 2 + len(good)]   # every good odd image is kept (label order: duck, owl)
    # a CSV can name a file that does not exist: reported too
    rows = [(p.relative_to(ds).as_posix(), "duck") for p, _ in bad.values()] + [("owl/img_000.png", "owl"),
                                                                             ("duck/img_000.png", "duck")]
    with open(ds / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    with pytest.warns(UserWarning):
        data = read_dataset(ds / "list.csv", show_progress=False)
    reasons = dict(data.skipped)
    assert len(reasons) == len(bad) and reasons[str(bad["missing"][0])] == "file not found"
    # `diffmix finetune --strict` names every bad file and writes nothing
    out = tmp_path / "bundle"
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--data", str(ds), "--base", str(tiny_model_dir), "--out", str(out), "--strict",
              "--max-steps", "1", *FINETUNE_FAST])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"{len(present)} unusable file(s)" in err
    for name, (path, fragment) in present.items():
        assert str(path) in err and fragment in err, name
    assert not out.exists() and not (ds / "diffmix_split.json").exists()


# =========================================================================== 2. hostile weight files
def _fix_hash(folder: Path, rel: str) -> None:
    """Make adapter.json agree with the (damaged) file, as an attacker or a bad copy tool would."""
    meta = json.loads((folder / "adapter.json").read_text())
    meta["files"][rel] = sha256_file(folder / rel)
    (folder / "adapter.json").write_text(json.dumps(meta))


def _truncate(folder: Path, rel: str, keep: float = 0.5) -> None:
    data = (folder / rel).read_bytes()
    (folder / rel).write_bytes(data[: int(len(data) * keep)])


def _poison(folder: Path, rel: str, value: float) -> None:
    tensors = load_file(folder / rel)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, folder / rel)


LORA, EMB = "pytorch_lora_weights.safetensors", "embeddings/class_1.safetensors"
WEIGHT_FAULTS = {   # name: (damage, expected message)
    "truncated_embedding": (lambda b: _truncate(b, EMB), "truncated or corrupted"),
    "truncated_lora": (lambda b: _truncate(b, LORA), "truncated or corrupted"),
    "header_only_lora": (lambda b: _truncate(b, LORA, 0.0001), "truncated or corrupted"),
    "nan_embedding": (lambda b: _poison(b, EMB, float("nan")), "NaN or infinite"),
    "inf_lora": (lambda b: _poison(b, LORA, float("inf")), "NaN or infinite"),
    "missing_token_file": (lambda b: (b / EMB).unlink(), "class_1.safetensors"),
}


def test_broken_weight_files_are_refused_clearly(tiny_model_dir, tmp_path, capsys):
    """Each fault keeps its sha256 consistent, so only the loader's own checks can catch it;
    the API raises ValueError/FileNotFoundError and `diffmix translate` exits 2 with the message."""
    clean = tiny_bundle(tmp_path, tiny_model_dir, "clean")
    owl = tmp_path / "owl.png"
    shape_image(1).save(owl)
    for name, (damage, message) in WEIGHT_FAULTS.items():
        b = tmp_path / name
        shutil.copytree(clean, b)
        damage(b)
        rel = LORA if "lora" in name else EMB
        if (b / rel).exists():
            _fix_hash(b, rel)
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
            load_bundle(b)
        out = tmp_path / f"out-{name}"
        with pytest.raises(SystemExit) as info:
            main(["translate", "--bundle", str(b), "--image", str(owl), "--source-class", CLASSES[0],
                  "--target", CLASSES[1], "--steps", "2", "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and "Traceback" not in err, name
        assert not out.exists(), name


def test_file_damaged_after_load_never_reaches_the_pipeline(tiny_pipe, tiny_model_dir, tmp_path):
    b = tiny_bundle(tmp_path, tiny_model_dir)
    bundle = load_bundle(b)
    vocab = len(tiny_pipe.tokenizer)
    _truncate(b, EMB)
    _fix_hash(b, EMB)   # even a matching adapter.json on disk: apply re-checks what was loaded
    with pytest.raises(ValueError, match="changed since the bundle was loaded"):
        apply_bundle(tiny_pipe, bundle)
    assert len(tiny_pipe.tokenizer) == vocab and getattr(tiny_pipe, "diffmix_bundle", None) is None
    assert not any(tiny_pipe.get_list_adapters().values())


def test_importer_refuses_nan_and_truncated_weights(tmp_path, tiny_model_dir):
    emb = tmp_path / "learned_embeds.bin"
    vec = torch.zeros(WIDTH)
    vec[3] = float("nan")
    torch.save({"learned_embeds_dict": {"<class_0>": vec, "<class_1>": torch.zeros(WIDTH)},
                "name2placeholder": {"a": "<class_0>", "b": "<class_1>"}}, emb)
    with pytest.raises(ValueError, match="NaN or infinite"):
        import_diffmix(emb, None, base_model=str(tiny_model_dir), superclass="bird", out_dir=tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    torch.save({"learned_embeds_dict": {"<class_0>": torch.zeros(WIDTH)}, "name2placeholder": {"a": "<class_0>"}},
               emb)
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.x.to_q.lora.down.weight": torch.zeros(2, 4), "unet.x.to_q.lora.up.weight": torch.zeros(4, 2)},
              lora)
    lora.write_bytes(lora.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        import_diffmix(emb, lora, base_model=str(tiny_model_dir), superclass="bird", out_dir=tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_reference_loader_refuses_pickled_code(tmp_path):
    """The other torch-file reader (classifier start weights): the payload never runs."""
    from diffmix_core.classifier import read_state_dict

    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.pth"
    torch.save({"state_dict": {"fc.weight": Payload(marker)}}, evil)
    with pytest.raises(ValueError, match=r"weights_only=True\) refused it"):
        read_state_dict(evil)
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    calls, offenders = 0, []
    for file in sorted(PACKAGE.rglob("*.py")):
        text = file.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls += 1
            if "weights_only=True" not in text[m.end():i]:
                offenders.append(f"{file.name}:{text[:m.start()].count(chr(10)) + 1}")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M) or \
                "allow_pickle=True" in text:
            offenders.append(f"{file.name}: pickle")
    assert calls >= 2 and offenders == []


# =========================================================================== 3. limits
def test_cli_pixel_limit_says_the_limit_and_how_to_raise_it(tiny_model_dir, tmp_path, capsys):
    img = tmp_path / "src.png"
    shape_image(0, 16).save(img)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["translate", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--source-class", "owl",
              "--target", "duck", "--image", str(img), "--max-pixels", "100", "--steps", "2", "--out", str(out),
              "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "exceeds the limit of 100" in err and "--max-pixels" in err
    assert not out.exists()
    # DIFFMIX_MAX_PIXELS (read when the package is imported): a fresh process
    ds = make_imagefolder(tmp_path / "ds", classes=("owl", "duck"), per_class=2)
    proc = subprocess.run([sys.executable, "-m", "diffmix_core", "split", "--data", str(ds), "--strict", "--quiet"],
                          cwd=ROOT, env=dict(os.environ, DIFFMIX_MAX_PIXELS="100", PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "4 unusable" in proc.stderr and "exceeds the limit of 100" in proc.stderr
    assert "DIFFMIX_MAX_PIXELS" in proc.stderr


# =========================================================================== 4. files
HOSTILE = ["a/b", "a_b", "a b", "A/B", "../../escape", "..", ".", "x\x00y\n\tz", "C" * 300, "Ωmega 鳥", "鳥",
           "/abs/path", "con", "a\\b"]


def test_hostile_class_names_export_to_safe_distinct_files(tmp_path):
    from diffmix_core.export import export_records, read_synthetic, verify_manifest
    from diffmix_core.labels import soft_label

    items = []
    for i, (src, tgt) in enumerate(zip(HOSTILE, HOSTILE[1:] + HOSTILE[:1])):
        rec = {"id": f"r{i}", "plan_idx": i, "source_class": src, "target_class": tgt, "strength": 0.5,
               "seed": i, "soft_label": soft_label(src, tgt, 0.5), "strategy": "diff-mix"}
        items.append((Image.new("RGB", (8, 8), (i * 10, 0, 0)), rec))
    box = tmp_path / "box"
    out = export_records(items, box / "exp", ["imagefolder", "authors", "zip"], classes=HOSTILE,
                         show_progress=False)
    assert sorted(p.name for p in box.iterdir()) == ["exp", "exp.zip"]       # nothing escaped the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box"]
    files = [p for p in out.rglob("*") if p.is_file()]
    # + metadata.jsonl, README.md (dataset card), meta.csv, manifest.json, MANIFEST.sha256
    assert len(files) == 2 * len(items) + 5 and verify_manifest(out) == []
    for p in files:
        assert p.resolve().is_relative_to(out.resolve())
        rel = p.relative_to(out).as_posix()
        assert rel.isascii() and rel.isprintable() and all(len(part) <= 100 for part in rel.split("/"))
    folders = {}   # meta.csv's name (the authors' spelling) -> its authors folder: one per name, never shared
    for row in csv.DictReader(open(out / "authors" / "meta.csv", newline="", encoding="utf-8")):
        folder = (out / "authors" / "data" / row["Path"]).parent.name
        assert folders.setdefault(row["First Directory"], folder) == folder
        assert (out / "authors" / "data" / row["Path"]).is_file()
    assert len(folders) == len(HOSTILE) and len(set(folders.values())) == len(HOSTILE)
    layout, back = read_synthetic(out / "authors", classes=HOSTILE)   # and every name reads back exactly
    assert layout == "authors" and len(back) == len(HOSTILE)
    for item in back:
        n = int(item.path.name.rsplit("-", 2)[1])
        assert (item.source_class, item.target_class) == (HOSTILE[n], HOSTILE[(n + 1) % len(HOSTILE)])
    rows = read_jsonl(out / "imagefolder" / "metadata.jsonl")
    assert [r["source_class"] for r in rows] == HOSTILE                         # names kept exactly in the data
    with zipfile.ZipFile(box / "exp.zip") as zf:
        names = zf.namelist()
    assert all(n.startswith("exp/") and ".." not in n.split("/") for n in names) and len(names) == len(files)


def test_full_disk_while_checkpointing_keeps_earlier_checkpoints(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import diffmix_core.finetune as ft

    ds = make_imagefolder(tmp_path / "ds", per_class=6)
    out = tmp_path / "run"
    args = ["finetune", "--data", str(ds), "--base", str(tiny_model_dir), "--out", str(out), "--max-steps", "2",
            "--checkpoint-every", "1", "--split-file", str(tmp_path / "split.json"), *FINETUNE_FAST]
    real, calls = ft.save_file, []

    def full_disk_on_second(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\0" * 10)   # a partial file, as a filling disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ft, "save_file", full_disk_on_second)
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "No space left on device" in err and "step-000002" in err and "latest: step-000001" in err
    assert "--resume" in err
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-000001"]            # no partial folder left
    load_bundle(ck / "step-000001" / "bundle")
    assert load_file(ck / "step-000001" / "optimizer.safetensors")
    monkeypatch.setattr(ft, "save_file", real)
    assert main(args + ["--resume"]) == 0 and load_bundle(out).meta["steps"] == 2


# =========================================================================== 5. crashes
def _wait_for(cond, proc, timeout=240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not cond():
        time.sleep(0.02)


def _checkpoints(out: Path) -> list[str]:
    ck = out / "checkpoints"
    return sorted(p.name for p in ck.glob("step-*") if (p / "trainer_state.json").is_file()) if ck.is_dir() else []


def _assert_nothing_corrupt(out: Path) -> None:
    """Every visible file is whole; partial writes only ever exist under hidden temporary names."""
    for p in out.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(out).parts) or not p.is_file():
            continue
        if p.suffix == ".safetensors":
            load_file(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            read_jsonl(p)
    for name in _checkpoints(out):
        load_bundle(out / "checkpoints" / name / "bundle")


@pytest.mark.slow
def test_finetune_sigkilled_twice_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    ds = make_imagefolder(tmp_path / "ds", per_class=6)
    common = ["--data", str(ds), "--base", str(tiny_model_dir), "--max-steps", "30", "--checkpoint-every", "1",
              "--split-file", str(tmp_path / "split.json"), *FINETUNE_FAST]
    assert main(["finetune", "--out", str(tmp_path / "whole"), *common]) == 0
    out = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, "-m", "diffmix_core", "finetune", "--out", str(out), *common]
    kills = []
    # Kill right as a checkpoint lands, then mid-step a few checkpoints into the resumed run. The
    # triggers are checkpoint counts, not wall time, so a fast machine cannot finish the run first.
    for n, (more, delay) in enumerate(((1, 0.0), (3, 0.05))):
        proc = subprocess.Popen(cmd + (["--resume"] if n else []), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        before = len(_checkpoints(out))
        _wait_for(lambda: len(_checkpoints(out)) >= before + more, proc)
        time.sleep(delay)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills.append(_checkpoints(out)[-1])
        assert not (out / "adapter.json").exists()
        _assert_nothing_corrupt(out)
    assert kills[0] < kills[1] < "step-000030"
    assert main(["finetune", "--out", str(out), "--resume", *common]) == 0
    _assert_nothing_corrupt(out)
    a, b = bundle_weights(tmp_path / "whole"), bundle_weights(out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)
    losses = [[r["loss"] for r in read_jsonl(p / "train_log.jsonl")] for p in (tmp_path / "whole", out)]
    np.testing.assert_allclose(losses[0], losses[1], atol=1e-5)


# =========================================================================== 6. the app: uploads, limits, many users
@pytest.fixture(scope="module")
def app_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel-app")
    with world_environment(root):
        bundle_dir = make_world(root, tmp_path_factory.getbasetemp())
        yield {"root": root, "bundle": str(bundle_dir), "example": str(bundle_dir / "examples" / "owl" / "0.png")}


def _launch(queue_size: int | None = None):
    from diffmix_core.ui import build_demo

    if queue_size is not None:
        os.environ["DIFFMIX_QUEUE_SIZE"] = str(queue_size)
    try:
        demo = build_demo()
    finally:
        os.environ.pop("DIFFMIX_QUEUE_SIZE", None)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    return demo


@pytest.fixture(scope="module")
def app(app_world):
    demo = _launch()
    yield demo.local_url
    demo.close()


TABLE = 3   # /sweep's outputs: grid, grid download, sweep checkboxes, table, ...


def test_app_upload_of_every_bad_image_is_refused_and_the_app_keeps_serving(app, app_world, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app, verbose=False)
    bad = make_bad_cases(tmp_path)
    tried = 0
    for name, (path, fragment) in bad.items():
        if not path.exists():
            continue   # an upload is always a file that exists
        with pytest.raises(Exception, match=re.escape(fragment)):
            sweep(client, app_world, upload=handle_file(str(path)), example="")
        tried += 1
    assert tried == 5
    sources = list((app_world["root"] / "sessions").rglob("sources/*"))
    assert not any(p.name.startswith(("trunc", "empty", "text", "bomb")) for p in sources)   # nothing kept
    table = sweep(client, app_world, upload=handle_file(str(make_good_cases(tmp_path)["exif_rotated"][0])),
                   example="")[TABLE]
    made = list((app_world["root"] / "sessions").rglob(f"images/{table['data'][0][0]}.png"))
    with Image.open(made[0]) as im:
        assert im.size == (16, 24)                                                  # still serving, EXIF applied


def test_app_limits_from_the_environment(app, app_world, tmp_path, monkeypatch):
    from gradio_client import Client, handle_file

    client = Client(app, verbose=False)
    monkeypatch.setenv("DIFFMIX_MAX_JOBS", "1")
    with pytest.raises(Exception, match=r"limit of 1 per .*DIFFMIX_MAX_JOBS"):
        sweep(client, app_world, strengths="0.5, 1.0")
    monkeypatch.setenv("DIFFMIX_MAX_UPLOAD_MB", "0")
    img = tmp_path / "up.png"
    shape_image(2, 32).save(img)
    with pytest.raises(Exception, match=r"limit is 0 MB .*DIFFMIX_MAX_UPLOAD_MB"):
        sweep(client, app_world, upload=handle_file(str(img)), example="")
    monkeypatch.delenv("DIFFMIX_MAX_UPLOAD_MB")
    ids = [r[0] for r in sweep(client, app_world)[TABLE]["data"]]
    ids += [r[0] for r in sweep(client, app_world, seeds="1")[TABLE]["data"]]
    monkeypatch.setenv("DIFFMIX_MAX_CURATED", "1")
    with pytest.raises(Exception, match=r"limit is 1 .*DIFFMIX_MAX_CURATED"):
        client.predict(",".join(ids), "add", api_name="/select")


def test_eight_concurrent_sessions_sweep_select_export(app, app_world):
    from gradio_client import Client

    n = 8
    results, errors = {}, []

    def user(i: int) -> None:
        try:
            client = Client(app, verbose=False)
            table = sweep(client, app_world, strengths="0.5" if i % 2 else "0.5, 1.0", seeds=str(100 + i))[TABLE]
            ids = [r[0] for r in table["data"]]
            client.predict(",".join(ids), "add", api_name="/select")
            msg, folder, zip_path = client.predict(api_name="/export")
            results[i] = (ids, app_world["root"] / "out" / folder, Path(zip_path))   # folder: under the output root
        except Exception as err:   # noqa: BLE001 - collected and reported below
            errors.append(f"user {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=user, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == [] and len(results) == n
    all_ids = [i for ids, _, _ in results.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)) == sum(1 if i % 2 else 2 for i in range(n))
    for i, (ids, folder, zip_path) in results.items():
        rows = read_jsonl(folder / "imagefolder" / "metadata.jsonl")
        assert [r["id"] for r in rows] == ids and {r["seed"] for r in rows} == {100 + i}
        assert len(list((folder / "imagefolder").glob("*.png"))) == len(ids) and zip_path.is_file()
    assert len({f for _, f, _ in results.values()}) == n


def test_queue_bound_answers_overload_quickly(app_world, monkeypatch):
    """DIFFMIX_QUEUE_SIZE=1 and a sweep that takes 3 s: of 5 simultaneous sweeps one runs, one
    waits, and the rest are told at once that the queue is full (Gradio's QueueError)."""
    from gradio_client import Client
    from gradio_client.utils import QueueError

    import diffmix_core.app.cache as S

    real = S.translate

    def slow(*a, **k):
        time.sleep(3.0)
        return real(*a, **k)

    monkeypatch.setattr(S, "translate", slow)
    demo = _launch(queue_size=1)
    try:
        clients = [Client(demo.local_url, verbose=False) for _ in range(5)]
        outcome, lock = {}, threading.Lock()

        def go(i: int, c) -> None:
            t0 = time.monotonic()
            try:
                sweep(c, app_world, seeds=str(200 + i))
                res = "ok"
            except QueueError as err:
                res = f"full: {err}"
            except Exception as err:   # noqa: BLE001
                res = f"other: {type(err).__name__}: {err}"
            with lock:
                outcome[i] = (res, time.monotonic() - t0)

        threads = [threading.Thread(target=go, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:   # 0.3 s apart: Gradio checks the queue's size before an event's validator runs,
            t.start()         # so joins within the same instant may all pass the check
            time.sleep(0.3)
        for t in threads:
            t.join(120)
    finally:
        demo.close()
    full = [(r, s) for r, s in outcome.values() if r.startswith("full")]
    ok = [r for r, _ in outcome.values() if r == "ok"]
    assert len(outcome) == 5 and not [r for r, _ in outcome.values() if r.startswith("other")], outcome
    assert len(full) >= 2 and len(ok) >= 1, outcome
    assert all("Queue is full" in r and s < 2.5 for r, s in full), outcome   # told before the first sweep ends


# =========================================================================== issue 25: the app's remake command
def test_app_remake_command_keeps_the_feature_cache_interval(tiny_model_dir, tmp_path):
    """A record made with ``--cache-interval 2`` (DeepCache) is made again by the command the app
    offers for it, pixel for pixel: the command carries the interval (1, the default, is left out)."""
    import shlex

    from diffmix_core.app.views import command_for

    bundle = tiny_bundle(tmp_path, tiny_model_dir, lora=False)
    src = tmp_path / "src.png"
    Image.new("RGB", (32, 32), (200, 60, 30)).save(src)
    first = tmp_path / "first"
    common = ["--bundle", str(bundle), "--image", str(src), "--source-class", CLASSES[0], "--target", CLASSES[1],
              "--strength", "0.7", "--seed", "3", "--steps", "4", "--quiet"]
    assert main(["translate", *common, "--cache-interval", "2", "--out", str(first)]) == 0
    rec = read_jsonl(first / "records.jsonl")[0]
    assert rec["cache_interval"] == 2
    again = tmp_path / "again"
    cmd = command_for(rec, [rec], str(again))
    assert "--cache-interval 2" in cmd
    assert main(shlex.split(cmd)[1:] + ["--quiet"]) == 0
    made = read_jsonl(again / "records.jsonl")[0]
    assert made["cache_interval"] == 2 and made["id"] == rec["id"]
    assert np.array_equal(np.asarray(Image.open(again / made["file_name"])),
                          np.asarray(Image.open(first / rec["file_name"])))
    plain = read_jsonl(first / "records.jsonl")[0] | {"cache_interval": 1}
    assert "--cache-interval" not in command_for(plain)
