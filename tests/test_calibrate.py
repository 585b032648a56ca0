"""Calibration (calibrate.py): the statistics, the job limit, the profile round trip, and the whole
run on the shipped demo world through the library and `diffmix calibrate`, checked against
`diffmix demo evaluate`'s computation on the same images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmix_core.calibrate import (CALIBRATION_FILE, GRID_FILE, MAX_JOBS_ENV, PLOT_FILE, bootstrap_recommendation,
                                    plan_jobs, source_means, t_interval, target_classes)
from diffmix_core.config import CalibrateConfig, TranslateConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "assets" / "demo" / "bundle"
DEMO_BIRDS = ROOT / "assets" / "demo" / "birds"
STRENGTHS = (0.5, 0.9)
STEPS = 6   # few scheduler steps (s = 0.5 runs 3, s = 0.9 runs 5): the same for both sides of the check


# --------------------------------------------------------------------------- pure parts
def test_targets_cycle_after_the_source_so_every_class_is_reached_equally():
    classes = ("a", "b", "c", "d")
    assert target_classes(classes, "c", 2) == ["d", "a"]
    assert target_classes(classes, "a") == ["b", "c", "d"]
    reached = [t for c in classes for t in target_classes(classes, c, 2)]
    assert sorted(reached) == sorted(classes * 2)


def test_t_interval_matches_the_textbook_and_clips_to_the_range():
    from scipy.stats import t

    v = np.array([0.2, 0.4, 0.6, 0.8, np.nan])
    got = t_interval(v, 0.95, (0.0, 1.0))
    half = t.ppf(0.975, 3) * np.std([0.2, 0.4, 0.6, 0.8], ddof=1) / 2
    assert got["n"] == 4 and got["mean"] == pytest.approx(0.5)
    assert (got["low"], got["high"]) == (pytest.approx(0.5 - half, abs=1e-6), pytest.approx(0.5 + half, abs=1e-6))
    wide = t_interval(np.array([0.0, 1.0]), 0.95, (0.0, 1.0))
    assert (wide["low"], wide["high"]) == (0.0, 1.0)          # t(0.975, 1) = 12.7: clipped to [0, 1]
    assert t_interval(np.array([0.3]))["low"] is None          # one source: no interval
    assert t_interval(np.array([np.nan])) is None


def test_source_means_average_each_sources_targets_and_seeds():
    recs = [{"strength": s, "target_class": t, "source_class": "x", "scores": {"p_target": p, "top1": top}}
            for s, t, p, top in [(0.5, "a", 0.2, "a"), (0.5, "b", 0.4, "x"), (0.9, "a", 0.8, "a"),
                                 (0.5, "a", 1.0, "a")]]
    index = [0, 0, 0, 1]
    p = source_means(recs, index, [0.5, 0.9], "p_target")
    assert p[0].tolist() == pytest.approx([0.3, 0.8]) and p[1, 0] == 1.0 and np.isnan(p[1, 1])
    assert source_means(recs, index, [0.5, 0.9], "target_hit")[0, 0] == 0.5


def _matrices(p_target: np.ndarray, distance: np.ndarray) -> dict:
    nan = np.full_like(p_target, np.nan)
    return {"p_target": p_target, "distance": distance, "clip_win": nan, "ssim": nan}


def test_bootstrap_interval_collapses_on_a_clear_winner_and_spans_an_ambiguous_one():
    rng = np.random.default_rng(0)
    n = 30
    # 0.9 clears the bar for every source and is the most diverse: every resample picks it
    clear = _matrices(np.column_stack([rng.uniform(0.0, 0.2, n), rng.uniform(0.8, 1.0, n)]),
                      np.column_stack([np.full(n, 0.3), np.full(n, 0.8)]))
    got = bootstrap_recommendation(clear, [0.5, 0.9], 0.5, 200, 0.95)
    assert (got["low"], got["high"]) == (0.9, 0.9) and got["shares"]["0.9"] == 1.0
    # 0.9's mean P(target) sits on the bar: resamples fall on both sides, so the interval covers both
    edge = _matrices(np.column_stack([rng.uniform(0.55, 0.65, n), rng.choice([0.2, 0.8], n)]),
                     np.column_stack([np.full(n, 0.3), np.full(n, 0.8)]))
    got = bootstrap_recommendation(edge, [0.5, 0.9], 0.5, 400, 0.95)
    assert (got["low"], got["high"]) == (0.5, 0.9)
    assert 0.05 < got["shares"]["0.5"] < 0.95
    assert bootstrap_recommendation(_matrices(clear["p_target"][:1], clear["distance"][:1]), [0.5, 0.9], 0.5,
                                    100, 0.95)["low"] is None   # one source: no interval


def test_config_refuses_bad_values():
    for bad in ({"per_class": 0}, {"targets": -1}, {"strengths": (0.0,)}, {"strengths": (0.5, 0.5)},
                {"seeds": ()}, {"confidence": 1.0}, {"draw_seed": -1}):
        with pytest.raises(ValueError):
            CalibrateConfig(**bad)


class _Bundle:
    classes = ("a", "b", "c")

    def class_index(self, name):
        return self.classes.index(name)


def test_over_the_limit_is_refused_naming_every_factor(monkeypatch):
    from diffmix_core.translate import Source

    sources = [Source(Image.new("RGB", (8, 8)), c, c) for c in _Bundle.classes]
    config = CalibrateConfig(per_class=1, targets=0, strengths=(0.3, 0.5, 0.7, 0.9), seeds=(0, 1))
    with pytest.raises(ValueError, match=r"3 sources x 2 targets x 4 strengths x 2 seeds = 48 images exceeds the "
                                         r"limit of 40 .*--max-jobs or DIFFMIX_MAX_CALIBRATION_JOBS"):
        plan_jobs(_Bundle(), sources, config, TranslateConfig(), limit=40)
    monkeypatch.setenv(MAX_JOBS_ENV, "47")
    with pytest.raises(ValueError, match="limit of 47"):
        plan_jobs(_Bundle(), sources, config, TranslateConfig())
    monkeypatch.setenv(MAX_JOBS_ENV, "48")
    jobs = plan_jobs(_Bundle(), sources, config, TranslateConfig(num_inference_steps=10))
    assert len(jobs) == 48 and [j.target_class for j in jobs[::8]] == ["b", "c", "c", "a", "a", "b"]
    with pytest.raises(ValueError, match=r"source class\(es\) \['z'\] are not classes of the bundle"):
        plan_jobs(_Bundle(), [Source(Image.new("RGB", (8, 8)), "z", "z")], config, TranslateConfig())
    with pytest.raises(ValueError, match="strategy 'diff-aug' does not"):
        plan_jobs(_Bundle(), sources, config, TranslateConfig(strategy="diff-aug"))


def test_profile_keeps_a_calibration_and_says_where_the_strength_came_from():
    from diffmix_core.bundle import Profile

    old = Profile.from_dict({"strength": 0.7, "thresholds": {}}, source="saved profile")
    assert old.calibration is None and "calibration" not in old.to_dict()
    assert old.strength_source() == "strength 0.7 from your saved profile"
    summary = {"date": "2026-12-02T14:00:00+00:00", "sources": 20, "classes": list("abcdefghij"),
               "targets_per_source": 3, "strengths": [0.3, 0.5, 0.7, 0.9], "seeds": [0], "images": 240,
               "interval": [0.7, 0.9], "confidence": 0.95, "curves": [{"strength": 0.3}]}
    new = Profile.from_dict({"strength": 0.9, "calibration": summary}, source="saved profile")
    assert Profile.from_dict(json.loads(json.dumps(new.to_dict()))).calibration == summary
    text = new.strength_source()
    assert "calibration on 2026-12-02" in text and "20 sources of 10 classes x 3 targets x 4 strengths x 1 seed(s) " \
        "= 240 images, 95% interval 0.7-0.9" in text
    with pytest.raises(ValueError, match="calibration must be null or an object"):
        Profile.from_dict({"strength": 0.9, "calibration": [1, 2]})


def test_cli_refuses_over_the_limit_before_loading_a_model(capsys):
    from diffmix_core.cli import main

    with pytest.raises(SystemExit) as err:
        main(["calibrate", "--bundle", str(DEMO_BUNDLE), "--per-class", "1", "--targets", "all", "--max-jobs", "50",
              "--out", "unused"])
    assert err.value.code == 2
    assert "10 sources x 9 targets x 4 strengths x 1 seeds = 360 images exceeds the limit of 50" in \
        capsys.readouterr().err
    assert not Path("unused").exists()


# --------------------------------------------------------------------------- the demo world
@pytest.fixture(scope="module")
def demo():
    """One calibration of the demo world: the first test image of each class, to the next class,
    at two strengths (20 images), with the progress it reported."""
    from diffmix_core.apply import load_pipeline_for
    from diffmix_core.bundle import load_bundle
    from diffmix_core.calibrate import calibrate
    from diffmix_core.config import PipelineConfig
    from diffmix_core.demo.world import sources_of
    from diffmix_core.reference import bundle_reference_path, load_reference
    from diffmix_core.translate import translate

    bundle = load_bundle(DEMO_BUNDLE)
    pipe = load_pipeline_for(PipelineConfig(device="cpu", dtype="fp32"), bundle)   # as demo evaluate runs

    def generate(bundle, jobs, config, callback=None):   # how the app hands in its engine
        return translate(pipe, jobs, config, bundle=bundle, show_progress=False, callback=callback)

    calls = []
    cal = calibrate(bundle, sources_of(DEMO_BIRDS, "test", 1), CalibrateConfig(targets=1, strengths=STRENGTHS),
                    translate_config=TranslateConfig(num_inference_steps=STEPS, guidance_scale=2.5),
                    reference=load_reference(bundle_reference_path(bundle), device="cpu"), generate=generate,
                    progress=lambda *a: calls.append(a), show_progress=False)
    return {"bundle": bundle, "cal": cal, "progress": calls}


def test_calibration_outputs_on_the_demo_world(demo):
    cal, bundle = demo["cal"], demo["bundle"]
    assert len(cal.records) == len(cal.images) == 20 and cal.settings["n_sources"] == 10
    assert [c["strength"] for c in cal.curves] == list(STRENGTHS)
    for c in cal.curves:
        assert c["n_images"] == 10 and c["n_sources"] == 10
        for key in ("p_target", "p_source", "target_hit", "distance"):
            assert c[key]["n"] == 10 and c[key]["low"] <= c[key]["mean"] <= c[key]["high"]
    # the demo bundle names its CLIP: CLIP-target is there
    assert cal.clip.startswith("CLIP:") and all(c["clip_target"] is not None for c in cal.curves)
    rec = cal.recommendation
    assert rec["strength"] in STRENGTHS and rec["low"] <= rec["high"] and rec["measure"] == "p_target"
    assert sum(rec["shares"].values()) == pytest.approx(1.0)
    # the per-class table: every class a target once per strength, its flag consistent with its row
    assert [row["target"] for row in cal.by_target] == list(bundle.classes)
    for row in cal.by_target:
        reached = [p["strength"] for p in row["by_strength"] if p["faithfulness"] >= rec["recommend_min_p_target"]]
        assert row["reaches_at"] == (min(reached) if reached else None)
        assert row["hard_to_reach"] == (not reached)
    header, rows = cal.table()
    assert header[2:4] == ["hit @ 0.5", "hit @ 0.9"] and len(rows) == 10
    stages = {c[0] for c in demo["progress"]}
    assert stages == {"translate", "score"} and demo["progress"][-1] == ("score", 20, 20)
    grid = cal.grid()   # 3 rows (source, 0.5, 0.9) x 6 sources
    assert grid.width > 6 * 128 and grid.height > 3 * 128
    assert "recommended strength" in cal.text()


def test_target_hit_agrees_with_demo_evaluate_on_the_same_images(demo):
    """`diffmix demo evaluate`'s computation (demo.world.evaluate_world) on the same sources, targets,
    strengths, seed and sampler: its per-strength target-hit lies within calibration's interval."""
    from diffmix_core.demo.world import evaluate_world

    result = evaluate_world(demo["bundle"], DEMO_BIRDS, strengths=STRENGTHS, per_class=1, guidance_scale=2.5,
                            num_inference_steps=STEPS, seed=0, targets_per_source=1, show_progress=False)
    evaluated = {r["strength"]: r for r in result["rows"]}
    assert {(r["source_id"], r["target_class"], r["strength"]) for r in result["records"]} == \
        {(r["source_id"], r["target_class"], r["strength"]) for r in demo["cal"].records}
    for curve in demo["cal"].curves:
        hit = curve["target_hit"]
        assert hit["low"] - 1e-9 <= evaluated[curve["strength"]]["target_hit"] <= hit["high"] + 1e-9
        assert evaluated[curve["strength"]]["n"] == curve["n_images"]


def test_cli_writes_the_files_and_saves_the_profile(tmp_path, monkeypatch, capsys):
    from diffmix_core.bundle import load_bundle
    from diffmix_core.cli import main
    from diffmix_core.profiles import load_profile

    monkeypatch.setenv("DIFFMIX_OUTPUT", str(tmp_path / "outputs"))
    out = tmp_path / "cal"
    assert main(["calibrate", "--bundle", str(DEMO_BUNDLE), "--data", str(DEMO_BIRDS), "--split", "test",
                 "--per-class", "1", "--targets", "1", "--strengths", "0.5", "0.9", "--steps", "4",
                 "--clip-model", "none", "--bootstrap", "200", "--out", str(out), "--save-profile", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "recommended strength" in printed and "from a calibration on" in printed
    data = json.loads((out / CALIBRATION_FILE).read_text())
    assert data["settings"]["images"] == 20 and data["settings"]["translate"]["num_inference_steps"] == 4
    assert data["settings"]["source_origin"] == f"{DEMO_BIRDS} (test split)"
    assert all(c["clip_target"] is None for c in data["curves"]) and "CLIP unavailable" in data["clip"]
    assert data["recommendation"]["strength"] in STRENGTHS and len(data["by_target"]) == 10
    for name in (PLOT_FILE, GRID_FILE):
        assert Image.open(out / name).size[0] > 300
    profile = load_profile(load_bundle(DEMO_BUNDLE))
    assert profile.source == "saved profile" and profile.strength == data["recommendation"]["strength"]
    assert profile.calibration["images"] == 20 and profile.calibration["seeds"] == [0]
    assert profile.num_inference_steps == 4 and profile.guidance_scale == 2.5   # what it was found with
    assert [c["strength"] for c in profile.calibration["curves"]] == list(STRENGTHS)
