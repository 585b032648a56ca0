"""The app's Calibrate mode (diffmix_core/app/calibration.py, ui.py's /calibrate and
/save_calibration): refused before the model lane, run through the launched app as a remote
user drives it, saved as the dataset's profile, then named in the bundle panel."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_world, world_environment   # the app_url fixture (conftest) serves this file's world

STRENGTHS = "0.5, 1.0"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The placeholder bundle with a reference classifier (test_ui's world) and a small ImageFolder
    dataset the app is started with (DIFFMIX_DATA)."""
    root = tmp_path_factory.mktemp("calui")
    bundle_dir = make_world(root, tmp_path_factory.getbasetemp())
    rng = np.random.default_rng(0)
    for cls in ("crow", "duck"):   # an ImageFolder of 2 classes x 5 images: enough for a train split
        (root / "data" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "data" / cls / f"{i}.png")
    with world_environment(root, DIFFMIX_DATA=str(root / "data")):
        yield {"root": root, "bundle": str(bundle_dir)}


# --------------------------------------------------------------------------- before the model lane
def test_a_request_is_checked_and_counted_before_any_model(world, monkeypatch):
    from diffmix_core.app.calibration import EXAMPLES, CalibrationRequest, plan_calibration
    from diffmix_core.app.store import Limits
    from diffmix_core.bundle import load_bundle

    bundle = load_bundle(world["bundle"])
    ok = CalibrationRequest(EXAMPLES, per_class=1, targets=2, strengths=STRENGTHS, seeds="0, 1", steps=2)
    plan = plan_calibration(bundle, ok, Limits())
    assert len(plan.jobs) == 4 * 2 * 2 * 2   # 4 classes have examples x 2 targets x 2 strengths x 2 seeds
    with pytest.raises(ValueError, match=r"4 sources x 2 targets x 2 strengths x 2 seeds = 32 images exceeds "
                                         r"the limit of 20"):
        plan_calibration(bundle, ok, Limits(max_calibration_jobs=20))
    for bad, match in ((dict(strengths="0.5, " * 100), "the strengths text is 500 characters; the limit is 200"),
                       (dict(strengths="0.1:0.9:100000000"), "100,000,000 strengths exceed .*DIFFMIX_MAX_CALIBRATION"),
                       (dict(per_class=1.5), "sources per class must be a whole number"),
                       (dict(targets=float("inf")), "targets per source must be a whole number"),
                       (dict(per_class=10**9), "sources per class exceed the limit"),
                       (dict(strategy="diff-aug"), "calibration sends sources to other classes"),
                       (dict(strategy="ti-mix"), "class tokens of a TI-only fine-tune"),
                       (dict(origin="/etc"), "sources must come from"),
                       (dict(strengths="0, 0.5"), r"strengths must be in \(0, 1\]")):
        with pytest.raises(ValueError, match=match):
            plan_calibration(bundle, CalibrationRequest(**{**vars(ok), **bad}), Limits())
    monkeypatch.delenv("DIFFMIX_DATA")
    with pytest.raises(ValueError, match="started without a dataset folder.*DIFFMIX_DATA"):
        plan_calibration(bundle, CalibrationRequest("dataset", per_class=1), Limits())


def test_the_strategy_list_offers_what_the_bundle_can_run(world):
    """A joint bundle is not offered ti-mix (it needs a TI-only fine-tune's tokens): the list follows
    the engine's own rule (translate.strategy_unavailable), as the sweep's strategy list does."""
    from diffmix_core.ui import on_calibrate_bundle

    dropdown = on_calibrate_bundle(world["bundle"])[0]
    offered = [c[0] if isinstance(c, tuple) else c for c in dropdown.choices]
    assert offered == ["diff-mix", "real-mix"] and dropdown.value == "diff-mix"


def test_progress_says_estimating_until_a_rate_exists_then_an_eta():
    from diffmix_core.app.calibration import ProgressClock

    now = [100.0]
    clock = ProgressClock(8, clock=lambda: now[0])
    assert clock("translate", 2, 20) == (0.1, "8 image(s): step 2/20, estimating…")
    now[0] += 3.0                               # 4 more steps in 3 s: 14 left take 10.5 s
    assert clock("translate", 6, 20) == (0.3, "8 image(s): step 6/20, about 10 s left")
    assert clock("score", 4, 8) == (0.5, "8 image(s): scoring 4/8")


# --------------------------------------------------------------------------- the running app
def _calibrate(client, world, origin="bundle examples", per_class=1, targets=1, seeds="0"):
    return client.predict(world["bundle"], origin, per_class, targets, STRENGTHS, seeds, 2, 5.0, "diff-mix", "train",
                          api_name="/calibrate")


def _files(files: list) -> dict[str, Path]:
    """{name: downloaded path} of a gr.File output."""
    paths = [Path(f["path"] if isinstance(f, dict) else f) for f in files]
    return {p.name: p for p in paths}


def test_calibrate_in_the_app_then_save_it_as_the_profile(app_url, world):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    assert {"/calibrate", "/save_calibration"} <= set(client.view_api(return_format="dict",
                                                                     print_info=False)["named_endpoints"])
    with pytest.raises(Exception, match="no calibration in this session yet"):
        client.predict(world["bundle"], api_name="/save_calibration")
    text, plot, table, grid, files = _calibrate(client, world)
    files = _files(files)
    assert set(files) == {"calibration.json", "calibration.png", "calibration_grid.png"}
    kept = list((world["root"] / "sessions").glob("*/calibrations/1/calibration.json"))   # in the session's folder
    assert len(kept) == 1 and kept[0].read_bytes() == files["calibration.json"].read_bytes()
    cal = json.loads(files["calibration.json"].read_text())
    s, r = cal["settings"], cal["recommendation"]
    assert (s["n_sources"], s["targets_per_source"], s["strengths"], s["seeds"], s["images"]) == (4, 1, [0.5, 1.0],
                                                                                                  [0], 8)
    assert s["translate"]["num_inference_steps"] == 2 and s["source_origin"] == "the bundle's example images"
    # the per-target table: the four sources' next classes, 2 images each (2 strengths x 1 seed)
    assert table["headers"] == ["target", "images", "hit @ 0.5", "hit @ 1", "reaches bar at", "hard to reach"]
    assert [row[0] for row in table["data"]] == [row["target"] for row in cal["by_target"]]
    assert [row[1] for row in table["data"]] == [2] * 4
    assert r["strength"] in (0.5, 1.0)   # random reference weights: no bar is met, so the most faithful
    assert f"recommended strength for the dataset: {r['strength']:g}**" in text
    assert plot is not None and Path(grid).is_file()
    msg = client.predict(world["bundle"], api_name="/save_calibration")
    assert "from a calibration on" in msg.replace("\\", "")
    profile = json.loads(next((world["root"] / "out" / "profiles").glob("*.json")).read_text())
    assert profile["strength"] == r["strength"] and profile["calibration"]["images"] == 8
    assert profile["num_inference_steps"] == 2
    panel = client.predict(world["bundle"], api_name="/bundle_info")[0].replace("\\", "")
    assert f"strength {r['strength']} from a calibration on" in panel
    assert "4 sources of 10 classes x 1 targets x 2 strengths x 1 seed(s) = 8 images" in panel


def test_over_the_limit_or_from_the_dataset(app_url, world, monkeypatch):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    monkeypatch.setenv("DIFFMIX_MAX_CALIBRATION_JOBS", "5")
    with pytest.raises(Exception, match="= 8 images exceeds the limit of 5"):
        _calibrate(client, world)
    monkeypatch.delenv("DIFFMIX_MAX_CALIBRATION_JOBS")
    text, _, table, _, files = _calibrate(client, world, origin="dataset", targets=0)
    cal = json.loads(_files(files)["calibration.json"].read_text())
    assert cal["settings"]["source_origin"].endswith("(train split)")
    assert cal["settings"]["targets_per_source"] == 9   # 0 = all other classes
    assert {src["class"] for src in cal["settings"]["sources"]} == {"crow", "duck"}
    assert [row[1] for row in table["data"]] == [row["n"] for row in cal["by_target"]]
