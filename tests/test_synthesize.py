"""Bulk synthesis: plan properties, resume after SIGKILL, shards, accelerate, exports."""
from __future__ import annotations

import collections
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffmix_core.cli import main
from diffmix_core.config import SynthesizeConfig, TranslateConfig
from diffmix_core.data import Dataset, Item
from diffmix_core.records import read_jsonl, read_png_record
from diffmix_core.synthesize import (batch_order, finished_record, job_seed, make_plan, parse_shard, read_plan,
                                     shard_jobs, synthesize, target_weights, write_plan)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"red circle": (220, 40, 40), "green square": (40, 190, 60), "blue triangle": (40, 60, 220)}


def fake_train(counts: dict[str, int]) -> Dataset:
    """A train split without files (plans never open images)."""
    classes = tuple(counts)
    items = tuple(Item(f"{c}/{i}.png", Path(f"/nowhere/{c}/{i}.png"), k, c)
                  for k, c in enumerate(classes) for i in range(counts[c]))
    return Dataset(root=Path("/nowhere"), classes=classes, items=items)


# --------------------------------------------------------------------------- plan properties
def test_plan_counts_sources_and_uniform_pairs():
    train = fake_train({"a": 3, "b": 5, "c": 2, "d": 6})
    jobs = make_plan(train, SynthesizeConfig(multiplier=250, seed=1), "diff-mix")
    assert len(jobs) == 250 * 16 and [j.idx for j in jobs] == list(range(len(jobs)))
    ids = {c: {it.id for it in its} for c, its in train.by_class().items()}
    assert all(j.source_id in ids[j.source_class] and j.strength == 0.5 for j in jobs)
    pairs = collections.Counter((j.source_class, j.target_class) for j in jobs)
    expected = len(jobs) / 16   # 4 x 4 pairs, same-class allowed, uniform and independent
    assert len(pairs) == 16 and all(abs(n - expected) < 0.2 * expected for n in pairs.values())
    # within a class every train image serves as a source about equally often
    per_image = collections.Counter(j.source_id for j in jobs if j.source_class == "d")
    assert len(per_image) == 6 and max(per_image.values()) < 1.4 * min(per_image.values())
    assert len(make_plan(train, SynthesizeConfig(multiplier=5), "diff-mix")) == 80   # paper default: 5x


def test_plan_long_tail_target_weighting_with_class_uniform_pairing():
    """--pairing class-uniform keeps the old long-tail plan: sources uniform over classes, the
    target class drawn with p ~ 1/(n_c + 1)."""
    counts = {"many": 30, "mid": 9, "few": 1}
    train = fake_train(counts)
    p = target_weights(list(counts.values()), long_tail=True)
    assert p == pytest.approx(np.array([1 / 31, 1 / 10, 1 / 2]) / (1 / 31 + 1 / 10 + 1 / 2))
    jobs = make_plan(train, SynthesizeConfig(multiplier=100, long_tail=True, pairing="class-uniform"), "diff-mix")
    freq = collections.Counter(j.target_class for j in jobs)
    for c, want in zip(counts, p):
        assert freq[c] / len(jobs) == pytest.approx(want, abs=0.02)
    src = collections.Counter(j.source_class for j in jobs)   # sources stay uniform over classes
    assert all(abs(n / len(jobs) - 1 / 3) < 0.03 for n in src.values())


def test_plan_long_tail_sources_uniform_over_images():
    """The authors' long-tail plan (the default for --long-tail): every train image equally likely
    as a source, so a class in proportion to its size; targets uniform over all classes (the
    training loader weights them later)."""
    counts = {"many": 30, "mid": 9, "few": 1}
    train = fake_train(counts)
    jobs = make_plan(train, SynthesizeConfig(multiplier=100, long_tail=True), "diff-mix")   # 4,000 jobs
    src = collections.Counter(j.source_class for j in jobs)
    for c, n in counts.items():
        assert src[c] / len(jobs) == pytest.approx(n / 40, abs=0.03)
    assert src["few"] < 0.06 * len(jobs)          # class-uniform pairing would use the one tail image ~1/3
    tgt = collections.Counter(j.target_class for j in jobs)
    assert all(abs(n / len(jobs) - 1 / 3) < 0.03 for n in tgt.values())
    ids = {c: {it.id for it in its} for c, its in train.by_class().items()}
    assert all(j.source_id in ids[j.source_class] for j in jobs)
    per_image = collections.Counter(j.source_id for j in jobs if j.source_class == "many")
    assert len(per_image) == 30 and max(per_image.values()) < 2 * min(per_image.values())
    explicit = make_plan(train, SynthesizeConfig(multiplier=100, pairing="image-uniform", long_tail=True), "diff-mix")
    assert explicit == jobs
    with pytest.raises(ValueError, match="pairing"):
        SynthesizeConfig(pairing="per-class")


def test_plan_is_deterministic_and_seeds_derive_from_index():
    train = fake_train({"a": 4, "b": 4})
    config = SynthesizeConfig(multiplier=10, strength_strategy="beta", seed=7)
    a, b = make_plan(train, config, "diff-mix"), make_plan(train, config, "diff-mix")
    assert a == b
    assert make_plan(train, SynthesizeConfig(multiplier=10, strength_strategy="beta", seed=8), "diff-mix") != a
    assert [j.seed for j in a] == [job_seed(7, i) for i in range(len(a))]
    assert len({j.seed for j in a}) == len(a)


def test_strength_strategies_and_pairings():
    train = fake_train({"a": 5, "b": 5})
    uniform = make_plan(train, SynthesizeConfig(multiplier=200, strength_strategy="uniform"), "diff-mix")
    freq = collections.Counter(j.strength for j in uniform)
    assert set(freq) == {0.3, 0.5, 0.7, 0.9} and min(freq.values()) > 0.2 * len(uniform)
    beta = [j.strength for j in make_plan(train, SynthesizeConfig(multiplier=200, strength_strategy="beta"), "ti-mix")]
    assert min(beta) >= 0.1 and max(beta) <= 0.9 and np.mean(beta) == pytest.approx(0.5, abs=0.02)
    assert all(j.target_class == j.source_class for j in make_plan(train, SynthesizeConfig(), "diff-aug"))
    gen = make_plan(train, SynthesizeConfig(), "real-gen")
    assert all(j.source_id is None and j.strength == 1.0 and j.source_class == j.target_class for j in gen)
    with pytest.raises(ValueError, match="strength_strategy"):
        SynthesizeConfig(strength_strategy="cosine")
    with pytest.raises(ValueError, match="multiplier"):
        SynthesizeConfig(multiplier=0)


def test_shards_partition_the_plan():
    jobs = make_plan(fake_train({"a": 3, "b": 4}), SynthesizeConfig(multiplier=3), "diff-mix")
    for n in (1, 2, 3, 5):
        parts = [shard_jobs(jobs, (i, n)) for i in range(n)]
        assert sorted(j.idx for p in parts for j in p) == list(range(len(jobs)))
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_batches_group_by_steps():
    jobs = make_plan(fake_train({"a": 3, "b": 4}), SynthesizeConfig(multiplier=4, strength_strategy="uniform"), "diff-mix")
    groups = batch_order(jobs, 25, 4)
    flat = [j for g in groups for j in g]
    assert sorted(j.idx for j in flat) == list(range(len(jobs))) and all(len(g) <= 4 for g in groups)
    assert [j.strength for j in flat] == sorted((j.strength for j in jobs), reverse=True)
    assert len({(j.source_class, j.target_class) for j in groups[0]}) > 1   # pairs mix within a batch


def test_plan_file_refuses_other_settings(tmp_path):
    train = fake_train({"a": 2, "b": 2})
    jobs = make_plan(train, SynthesizeConfig(), "diff-mix")
    write_plan(tmp_path, {"x": 1}, jobs)
    assert read_plan(tmp_path).jobs == tuple(jobs)
    write_plan(tmp_path, {"x": 1}, jobs)   # same plan: accepted (resume)
    with pytest.raises(ValueError, match=r"another plan \(differs in x\)"):
        write_plan(tmp_path, {"x": 2}, jobs)


# --------------------------------------------------------------------------- runs on the tiny pipeline
@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    """ImageFolder: 3 classes x 4 coloured shapes at 32 px."""
    root = tmp_path_factory.mktemp("shapes")
    for c, colour in SHAPES.items():
        folder = root / c.replace(" ", "_")
        folder.mkdir()
        for i in range(4):
            im = Image.new("RGB", (32, 32), (250 - 20 * i, 250, 240))
            draw = ImageDraw.Draw(im)
            box = [4 + i, 5, 27, 26 - i]
            {"red circle": draw.ellipse, "green square": draw.rectangle}.get(c, lambda b, fill: draw.polygon(
                [(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])], fill=fill))(box, fill=colour)
            im.save(folder / f"{i}.png")
    return root


def synth_args(model, data, out, *extra) -> list[str]:
    return ["synthesize", "--base", str(model), "--superclass", "shape", "--data", str(data), "--out", str(out),
            "--strategy", "real-mix", "--multiplier", "2", "--steps", "2", "--strength-strategy", "uniform",
            "--strengths", "0.5", "1.0", "--quiet", *extra]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, shapes_dir, tmp_path_factory) -> Path:
    """One uninterrupted run, with both export layouts."""
    out = tmp_path_factory.mktemp("full") / "out"
    assert main(synth_args(tiny_model_dir, shapes_dir, out, "--batch-size", "4",
                           "--export", "imagefolder,authors")) == 0
    return out


def files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def assert_same_result(out: Path, ref: Path, ignore: tuple[str, ...] = ()) -> None:
    """Same files; same records (in PNGs and indexes); pixels equal up to float noise."""
    names = [f for f in files(ref) if not f.startswith(ignore)]
    assert [f for f in files(out) if not f.startswith(ignore)] == names
    for name in names:
        if name.startswith("images/"):
            assert read_png_record(out / name) == read_png_record(ref / name)
            a = np.asarray(Image.open(out / name), dtype=np.int16)
            b = np.asarray(Image.open(ref / name), dtype=np.int16)
            assert np.abs(a - b).max() <= 2, name
    assert read_jsonl(out / "records.jsonl") == read_jsonl(ref / "records.jsonl")
    assert (out / "plan.jsonl").read_bytes() == (ref / "plan.jsonl").read_bytes()


def test_full_run_outputs(full_run, shapes_dir):
    plan = read_plan(full_run)
    train = plan.header["train_images"]
    assert len(plan.jobs) == 2 * train and plan.header["split_file"] == str(shapes_dir / "diffmix_split.json")
    split = json.loads((shapes_dir / "diffmix_split.json").read_text())
    train_ids = set(split["splits"]["train"])
    assert {j.source_id for j in plan.jobs} <= train_ids   # the train split only
    records = read_jsonl(full_run / "records.jsonl")
    assert [r["plan_idx"] for r in records] == list(range(len(plan.jobs)))
    for job, rec in zip(plan.jobs, records):
        assert (rec["file_name"], rec["seed"], rec["target_class"]) == (f"images/{job.idx:06d}.png", job.seed,
                                                                         job.target_class)
        assert read_png_record(full_run / rec["file_name"]) == rec
    with open(full_run / "export" / "authors" / "meta.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["Number"]) for r in rows] == list(range(len(plan.jobs)))
    assert all((full_run / "export" / "authors" / "data" / r["Path"]).is_file() for r in rows)
    meta = read_jsonl(full_run / "export" / "imagefolder" / "metadata.jsonl")
    assert len(meta) == len(plan.jobs) and meta[0]["soft_label_vector"] is not None
    assert not [f for f in files(full_run) if Path(f).name.startswith(".")]


def test_sigkill_then_rerun_equals_uninterrupted(full_run, tiny_model_dir, shapes_dir, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "diffmix_core", *synth_args(tiny_model_dir, shapes_dir, out, "--batch-size", "1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "images").glob("*.png"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    made = sorted((out / "images").glob("*.png"))
    assert 2 <= len(made) < len(read_plan(out).jobs)
    plan = {j.idx: j for j in read_plan(out).jobs}
    assert all(finished_record(out, plan[int(p.stem)]) is not None for p in made)   # every PNG there is whole
    assert not (out / "records.jsonl").exists()
    assert main(synth_args(tiny_model_dir, shapes_dir, out, "--batch-size", "3",
                           "--export", "imagefolder,authors")) == 0
    assert_same_result(out, full_run, ignore=("export/",))
    shard_log = sorted(read_jsonl(out / "records-0-of-1.jsonl"), key=lambda r: r["plan_idx"])
    assert shard_log == read_jsonl(full_run / "records.jsonl")
    assert files(out / "export") == files(full_run / "export")


def test_shards_union_equals_whole_plan(full_run, tiny_model_dir, shapes_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(synth_args(tiny_model_dir, shapes_dir, out, "--shard", "0/2")) == 0
    assert "still to make by other shards" in capsys.readouterr().out
    plan = read_plan(out)
    assert sorted(int(p.stem) for p in (out / "images").glob("*.png")) == [j.idx for j in plan.jobs if j.idx % 2 == 0]
    assert not (out / "records.jsonl").exists()
    assert main(synth_args(tiny_model_dir, shapes_dir, out, "--shard", "1/2")) == 0   # the last shard merges
    assert "merged" in capsys.readouterr().out
    assert_same_result(out, full_run, ignore=("export/", "records-"))
    halves = read_jsonl(out / "records-0-of-2.jsonl") + read_jsonl(out / "records-1-of-2.jsonl")
    assert sorted(r["plan_idx"] for r in halves) == list(range(len(plan.jobs)))
    # a rerun of a finished shard makes nothing and loads no model
    import diffmix_core.models

    monkeypatch.setattr(diffmix_core.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(synth_args(tiny_model_dir, shapes_dir, out, "--shard", "1/2")) == 0
    assert "already made" in capsys.readouterr().out


def test_rerun_with_other_settings_is_refused(full_run, tiny_model_dir, shapes_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(synth_args(tiny_model_dir, shapes_dir, full_run, "--seed", "3"))
    assert info.value.code == 2 and "holds another plan" in capsys.readouterr().err


def test_text_embeddings_computed_once_per_prompt(tiny_pipe, shapes_dir, tmp_path, monkeypatch):
    from diffmix_core.data import read_dataset
    from diffmix_core.synthesize import Plan

    calls = collections.Counter()
    original = type(tiny_pipe).encode_prompt

    def counting(self, prompt, *a, **k):
        calls[prompt] += 1
        return original(self, prompt, *a, **k)

    monkeypatch.setattr(type(tiny_pipe), "encode_prompt", counting)
    train = read_dataset(shapes_dir, show_progress=False)
    jobs = make_plan(train, SynthesizeConfig(multiplier=1), "real-mix")
    config = TranslateConfig(strategy="real-mix", num_inference_steps=2, batch_size=2)
    summary = synthesize(tiny_pipe, Plan({"classes": list(train.classes)}, tuple(jobs)), tmp_path, config,
                         superclass="shape", show_progress=False)
    assert summary["made"] == len(jobs) == 12
    assert len(calls) == len({j.target_class for j in jobs}) and set(calls.values()) == {1}
    assert "encode_prompt" not in vars(tiny_pipe)   # the pipeline is left as it was


@pytest.mark.slow
def test_two_processes_under_accelerate(full_run, tiny_model_dir, shapes_dir, tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("accelerate launcher not installed")
    out = tmp_path / "out"
    # accelerate's --cpu launches ONE process (multi-CPU expects mpirun); --multi_gpu starts torchrun's
    # workers, which form a gloo group on a machine without GPUs.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffmix_core",
           *synth_args(tiny_model_dir, shapes_dir, out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "shard 0/2" in res.stdout and "shard 1/2" in res.stdout and res.stdout.count("merged") == 1
    assert_same_result(out, full_run, ignore=("export/", "records-"))


def test_filter_keeps_rejects_apart(tiny_pipe, shapes_dir, tmp_path):
    from diffmix_core.config import Thresholds
    from diffmix_core.data import read_dataset
    from diffmix_core.synthesize import Plan, merge

    train = read_dataset(shapes_dir, show_progress=False)
    jobs = make_plan(train, SynthesizeConfig(multiplier=0.5), "real-mix")   # 6 jobs

    def scorer(images, records):   # stands in for scoring.score_images: P(target) by seed parity
        assert len(images) == len(records) and all(isinstance(im, Image.Image) for im in images)
        return [{"p_target": 0.9 if r["seed"] % 2 else 0.1, "ssim": None} for r in records]

    config = TranslateConfig(strategy="real-mix", num_inference_steps=2, batch_size=4)
    plan = Plan({"classes": list(train.classes)}, tuple(jobs))
    summary = synthesize(tiny_pipe, plan, tmp_path, config, superclass="shape", scorer=scorer,
                         filter_config=Thresholds(min_p_target=0.5), show_progress=False)
    bad = {j.idx for j in jobs if j.seed % 2 == 0}
    assert summary["rejected"] == len(bad) and 0 < len(bad) < len(jobs)
    assert {int(p.stem) for p in (tmp_path / "rejected").glob("*.png")} == bad
    m = merge(tmp_path, plan, export=["authors"], show_progress=False)
    assert (m["kept"], m["rejected"]) == (len(jobs) - len(bad), len(bad))
    rejected = read_jsonl(tmp_path / "rejected.jsonl")
    assert all(r["rejected"] == "p_target 0.100 < 0.5" and r["scores"]["p_target"] == 0.1 for r in rejected)
    assert {r["plan_idx"] for r in read_jsonl(tmp_path / "records.jsonl")} == {j.idx for j in jobs} - bad
    with open(tmp_path / "export" / "authors" / "meta.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(jobs) - len(bad)
    # rejected images count as made: a rerun makes nothing
    again = synthesize(tiny_pipe, plan, tmp_path, config, superclass="shape", show_progress=False)
    assert again["made"] == 0 and again["skipped"] == len(jobs)


def test_threshold_without_reference_is_refused(tiny_model_dir, shapes_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(synth_args(tiny_model_dir, shapes_dir, tmp_path / "o", "--min-p-target", "0.5"))
    assert "needs a reference classifier" in capsys.readouterr().err


def test_diff_ii_plan_pairs_images_of_one_class():
    """diff-ii: target = source class; the partner is another train image of the class (uniform over
    them, seeded), the source itself only for a class with a single image; other strategies have none."""
    train = fake_train({"a": 4, "b": 1, "c": 3})
    jobs = make_plan(train, SynthesizeConfig(multiplier=200, seed=3), "diff-ii")
    assert jobs == make_plan(train, SynthesizeConfig(multiplier=200, seed=3), "diff-ii")
    assert jobs != make_plan(train, SynthesizeConfig(multiplier=200, seed=4), "diff-ii")
    pairs = collections.Counter()
    for j in jobs:
        assert j.target_class == j.source_class and j.partner_id.split("/")[0] == j.source_class
        assert j.partner_path == str(Path("/nowhere", j.partner_id))
        assert (j.partner_id == j.source_id) == (j.source_class == "b")
        pairs[(j.source_id, j.partner_id)] += 1
    for src in (f"a/{i}.png" for i in range(4)):
        partners = [pairs[(src, f"a/{i}.png")] for i in range(4) if f"a/{i}.png" != src]
        assert min(partners) > 0.5 * max(partners)   # uniform over the 3 others (about 67 each)
    assert all(j.partner_id is None for j in make_plan(train, SynthesizeConfig(multiplier=2), "diff-aug"))
