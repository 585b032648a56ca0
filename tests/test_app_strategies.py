"""The app's strategies: diff-ii with a second source of the class, several strategies side by
side in one sweep, the fast preview switch, and strategies a bundle cannot run left out; driven
through gradio_client against the launched app, as a script drives it."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

# the world (the app's test world) and app_url (the launched app) fixtures: conftest.py


def _sweep(client, world, strategy, *extra, strengths="0.5, 1.0", seeds="0"):
    """/sweep on the owl example (1 source, 2 strengths, 2 steps); ``extra``: fast, partner,
    partner upload, inversion steps."""
    return client.predict(world["bundle"], None, world["example"], "owl", "duck", strengths, seeds, 2, 5.0,
                          strategy, *extra, api_name="/sweep")


def _records(world, ids):
    from diffmix_core.records import read_jsonl

    found = {}
    for file in (world["root"] / "sessions").glob("*/records.jsonl"):
        found.update({r["id"]: r for r in read_jsonl(file) if r["id"] in ids})
    return [found[i] for i in ids]


def test_one_rule_says_which_strategies_a_bundle_runs(world):
    from diffmix_core.app.cache import open_bundle_cached
    from diffmix_core.translate import bundle_mode, check_bundle_for, strategy_unavailable
    from diffmix_core.ui import strategy_choices

    bundle = open_bundle_cached(world["bundle"])
    assert bundle_mode(bundle) == "joint"
    assert strategy_unavailable("diff-ii", bundle) is None and strategy_unavailable("diff-mix", bundle) is None
    reason = strategy_unavailable("ti-mix", bundle)
    assert "TI-only" in reason
    with pytest.raises(ValueError, match="TI-only"):   # the engine's (and the CLI's) check says the same
        check_bundle_for("ti-mix", bundle)
    offered, info = strategy_choices(bundle)
    assert {"diff-mix", "diff-aug", "diff-ii"} <= set(offered) and not {"ti-mix", "ti-aug"} & set(offered)
    assert "ti-mix, ti-aug" in info and "TI-only" in info


def test_ti_strategies_not_offered_and_refused_over_the_api(app_url, world):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    out = client.predict(world["bundle"], api_name="/bundle_info")
    shown = [o for o in out if isinstance(o, dict) and "diff-mix" in str(o.get("choices", ""))]
    assert shown, out
    choices = [c[1] if isinstance(c, (list, tuple)) else c for c in shown[0]["choices"]]
    assert "diff-ii" in choices and "ti-mix" not in choices and "ti-aug" not in choices
    with pytest.raises(Exception, match="TI-only"):
        _sweep(client, world, "ti-mix")


def test_diff_ii_sweep_names_source_and_partner(app_url, world):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    picture, _, _, table, plot, _, status, *_ = _sweep(client, world, "diff-ii", False, "", None, 3)
    rows = table["data"]
    assert len(rows) == 2 and plot is not None
    records = _records(world, [r[0] for r in rows])
    partner = str(Path(world["example"]).with_name("1.png"))   # the only other owl example
    for rec in records:
        assert rec["strategy"] == "diff-ii" and rec["source_class"] == rec["target_class"] == "owl"
        assert rec["source_path"] == world["example"] and rec["source_id"] == "0"
        assert Path(rec["partner_path"]).resolve() == Path(partner).resolve() and rec["partner_id"] == "1"
        assert rec["partner_sha256"] != rec["source_sha256"] and rec["inversion_steps"] == 3
    assert sorted(r["strength"] for r in records) == [0.5, 1.0]   # the axis is s, as for the others
    assert "diff-ii partner" in status and "`1.png`" in status
    assert rows[0][-2] == "1"   # the table names the partner
    # the user's choice of partner: the same class's example, named in the records
    rows = _sweep(client, world, "diff-ii", False, partner, None, 3, strengths="0.5")[3]["data"]
    assert _records(world, [rows[0][0]])[0]["partner_id"] == "1"
    with pytest.raises(Exception, match="example of 'duck'"):
        _sweep(client, world, "diff-ii", False, str(Path(world["example"]).parent.parent / "duck" / "0.png"), None, 3)


def test_strategies_side_by_side(app_url, world):
    from gradio_client import Client

    from diffmix_core.app.views import md_text
    from diffmix_core.grid import GAP, HEAD_H, LABEL_W, tile_size

    client = Client(app_url, verbose=False)
    picture, _, _, table, plot, _, status, *_ = _sweep(client, world, ["diff-mix", "diff-aug"], seeds="0, 1")
    rows = table["data"]
    strategy_at = list(table["headers"]).index("strategy")
    assert [r[strategy_at] for r in rows] == ["diff-mix"] * 4 + ["diff-aug"] * 4
    assert {r[3] for r in rows if r[strategy_at] == "diff-aug"} == {"owl"}   # intra-class keeps the class
    # scores per strategy
    assert all(f"**{md_text(k)}**: s 0.5: P(target)" in status for k in ("diff-mix", "diff-aug"))
    assert plot is not None
    t = tile_size(32)
    with Image.open(picture) as im:   # source + 2 blocks of 2 seeds, 2 strength rows
        assert im.size == (LABEL_W + 5 * (t + GAP) + GAP, HEAD_H + 2 * (t + GAP) + GAP)
    # comma-separated over the API, diff-ii among them; every job counts against the limit
    rows = _sweep(client, world, "diff-mix, diff-ii", False, "", None, 3, strengths="0.5")[3]["data"]
    assert [r[strategy_at] for r in rows] == ["diff-mix", "diff-ii"]
    with pytest.raises(Exception, match="exceeds the limit"):
        _sweep(client, world, "diff-mix, diff-aug, diff-ii", strengths="0.1:1:8", seeds="n=8")


def test_grid_blocks_are_labelled():
    from diffmix_core.grid import layout

    recs = [{"id": f"{k}{s}{seed}", "strategy": k, "strength": s, "seed": seed, "target_class": "duck",
             "source_path": "x.png", "steps_run": 1, "num_inference_steps": 2}
            for k in ("diff-mix", "diff-ii") for s in (0.5, 1.0) for seed in (0, 1)]
    grid = layout(recs, 32, block=lambda r: r["strategy"])
    assert grid.columns == ("source", "diff-mix · seed 0", "diff-mix · seed 1",
                            "diff-ii · seed 0", "diff-ii · seed 1")
    assert grid.cells[1] == (None, "diff-mix1.00", "diff-mix1.01", "diff-ii1.00", "diff-ii1.01")


def test_fast_preview_is_recorded_and_in_the_command(app_url, world):
    from gradio_client import Client

    from diffmix_core.app.sweep import FAST_PREVIEW
    from diffmix_core.app.views import command_for

    client = Client(app_url, verbose=False)
    fast = _sweep(client, world, "diff-mix", True)[3]["data"]
    plain = _sweep(client, world, "diff-mix")[3]["data"]   # the old single-strategy call still works
    rec_fast, rec_plain = _records(world, [fast[0][0], plain[0][0]])
    assert rec_fast["cache_interval"] == FAST_PREVIEW and rec_plain["cache_interval"] == 1
    assert rec_fast["id"] != rec_plain["id"]
    assert f"--cache-interval {FAST_PREVIEW}" in command_for(rec_fast)
    assert "--cache-interval" not in command_for(rec_plain)


def test_copy_as_command_remakes_each_strategy_block(world, tmp_path):
    """A side-by-side sweep with the fast preview: each block's command (its strategy, diff-ii's
    partner and inversion, the cache setting) makes its images again, pixel for pixel."""
    import shlex

    import numpy as np

    from diffmix_core.app.store import open_store
    from diffmix_core.app.sweep import SweepRequest, run_sweep
    from diffmix_core.app.views import command_for
    from diffmix_core.bundle import load_bundle
    from diffmix_core.cli import main
    from diffmix_core.data import load_image
    from diffmix_core.records import read_jsonl
    from diffmix_core.translate import Source

    bundle = load_bundle(world["bundle"])
    store = open_store("")
    src = Source(load_image(world["example"]), "owl", "0", world["example"])
    request = SweepRequest("owl", "duck", "0.5, 1.0", "0", 4, 5.0, "diff-mix, diff-ii", cache_interval=3,
                           inversion_steps=3)
    out = run_sweep(store, bundle, src, request)
    assert [r["strategy"] for r in out.records] == ["diff-mix"] * 2 + ["diff-ii"] * 2
    assert set(out.summaries) == {"diff-mix", "diff-ii"} and out.figure is not None
    for name in ("diff-mix", "diff-ii"):
        block = [r for r in out.records if r["strategy"] == name]
        again = tmp_path / name
        cmd = command_for(block[0], out.records, str(again))
        assert "--cache-interval 3" in cmd and ("--partner" in cmd) == (name == "diff-ii")
        assert main(shlex.split(cmd)[1:] + ["--quiet"]) == 0
        made = read_jsonl(again / "records.jsonl")
        assert [r["id"] for r in made] == [r["id"] for r in block]
        for new, rec in zip(made, block):
            assert np.array_equal(np.asarray(load_image(again / new["file_name"])),
                                  np.asarray(load_image(store.image_path(rec))))


def test_partner_shown_next_to_the_source(world):
    """The partner dropdown lists the source class's examples; the partner shown is the one the
    sweep draws (first seed), or the user's."""
    from diffmix_core.ui import on_partner_view

    other = str(Path(world["example"]).with_name("1.png"))
    box, shown = on_partner_view(world["bundle"], None, world["example"], "owl", "0, 1", "", None)
    assert [v for _, v in box.choices] == ["", world["example"], other] and box.value == ""
    assert shown.label == "diff-ii partner: 1" and shown.value is not None
    box, shown = on_partner_view(world["bundle"], None, other, "owl", "0", world["example"], None)
    assert box.value == world["example"] and shown.label == "diff-ii partner: 0"
    box, shown = on_partner_view(world["bundle"], None, None, "owl", "0", "", None)
    assert shown.label == "diff-ii partner: none yet"
