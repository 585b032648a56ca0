"""The app: handlers as plain functions (diffmix_core/app), then the launched app driven
through gradio_client as a remote user drives it."""
from __future__ import annotations

import json
import shutil
import threading
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import sweep   # the world and app_url fixtures: conftest.py


# --------------------------------------------------------------------------- plain handlers
def test_parse_strengths_and_seeds():
    from diffmix_core.jobs import parse_seeds, parse_strengths

    assert parse_strengths("0.3, 0.5 0.7") == [0.3, 0.5, 0.7]
    assert parse_strengths("0.1:0.9:5") == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert parse_seeds("0, 1, 7") == [0, 1, 7] and parse_seeds("n=3") == [0, 1, 2]
    for bad, match in (("", "at least one"), ("1.5", "between 0 and 1"), ("0.1:0.9", "from:to:count"),
                       ("a, b", "could not read")):
        with pytest.raises(ValueError, match=match):
            parse_strengths(bad)
    with pytest.raises(ValueError, match="n=<count>"):
        parse_seeds("n=x")


def test_jobs_matrix_intra_and_gen(world):
    from diffmix_core.bundle import load_bundle
    from diffmix_core.jobs import ALL_OTHER, sweep_jobs
    from diffmix_core.translate import Source

    bundle = load_bundle(world["bundle"])
    src = Source(Image.new("RGB", (8, 8)), "owl", "x")
    jobs = sweep_jobs(bundle, src, "owl", ALL_OTHER, [0.5, 0.9], [0, 1], "diff-mix")
    assert len(jobs) == (len(bundle.classes) - 1) * 4 and "owl" not in {j.target_class for j in jobs}
    assert [(j.strength, j.seed) for j in jobs[:4]] == [(0.5, 0), (0.5, 1), (0.9, 0), (0.9, 1)]
    assert {j.target_class for j in sweep_jobs(bundle, src, "owl", "duck", [0.5], [0], "diff-aug")} == {"owl"}
    several = sweep_jobs(bundle, src, "owl", "duck, crow", [0.5], [0, 1], "diff-mix")   # side by side
    assert [(j.target_class, j.seed) for j in several] == [("duck", 0), ("duck", 1), ("crow", 0), ("crow", 1)]
    gen = sweep_jobs(bundle, None, "owl", "duck", [0.3, 0.5], [0, 1], "diff-gen")
    assert len(gen) == 2 and all(j.source is None and j.strength == 1.0 for j in gen)
    with pytest.raises(ValueError, match="example image or upload"):
        sweep_jobs(bundle, None, "owl", "duck", [0.5], [0], "diff-mix")
    with pytest.raises(ValueError, match="unknown class 'emu'"):
        sweep_jobs(bundle, src, "owl", "emu", [0.5], [0], "diff-mix")


def test_one_threshold_vocabulary():
    """config.Thresholds: the app's auto-select, a profile and synthesize's filter read the same tests."""
    from diffmix_core.config import Thresholds

    t = Thresholds.from_dict({"min_p_target": "0.5", "max_ssim": 0.4, "min_distance": ""})
    assert t.as_dict() == {"min_p_target": 0.5, "max_ssim": 0.4} and t.active and not Thresholds().active
    assert t.reason({"p_target": 0.2, "ssim": 0.9}) == "p_target 0.200 < 0.5; ssim 0.900 > 0.4"
    assert t.reason({"p_target": 0.7}) is None                        # synthesis: a missing score never rejects
    assert t.failures({"p_target": 0.7}, missing_fails=True) == ["no ssim score"]
    for bad, match in (({"p_min": 1}, "unknown threshold"), ({"min_p_target": 1.5}, r"in \[0, 1\]"),
                       ({"min_distance": 0.5, "max_distance": 0.2}, "above max_distance"),
                       ({"max_ssim": "x"}, "must be a number")):
        with pytest.raises(ValueError, match=match):
            Thresholds.from_dict(bad)


def test_thresholds_select_and_say_what_they_ignore():
    from diffmix_core.app.sweep import passing

    recs = [{"id": "a", "scores": {"p_target": 0.9, "ssim": 0.2}}, {"id": "b", "scores": {"p_target": 0.1, "ssim": 0.1}},
            {"id": "c", "scores": {"p_target": 0.8, "ssim": 0.9}}]
    assert passing(recs, {"min_p_target": 0.5, "max_ssim": 0.5}) == (["a"], [])
    ids, notes = passing(recs, {"min_clip_target": 0.2, "max_ssim": None})
    assert ids == ["a", "b", "c"] and "CLIP(target) >= 0.2 ignored" in notes[0]
    with pytest.raises(ValueError, match="unknown threshold"):
        passing(recs, {"p_min": 1})


def test_curate_modes_limits_and_isolation(world, monkeypatch):
    from diffmix_core.app.store import Limits, open_store, update_curated
    from diffmix_core.translate import Result

    a, b = open_store(""), open_store(None)
    assert a.token != b.token and open_store(a.token).root == a.root
    assert open_store("../../etc").root.parent == a.root.parent   # a bad token is a new session, not a path
    rec = {"id": "i1", "soft_label": {"owl": 1.0}}
    ids = a.add([Result(Image.new("RGB", (4, 4)), dict(rec, id=f"i{n}")) for n in range(3)])
    a.save_state(dict(a.state(), last_sweep=ids))
    assert update_curated(a, ["i0", "i1"], "add") == ["i0", "i1"]
    assert update_curated(a, ["i1", "i2"], "toggle") == ["i0", "i2"]
    assert update_curated(a, ["i1"], "set") == ["i1"]
    assert update_curated(a, ["i1"], "remove") == []
    with pytest.raises(ValueError, match="unknown image id"):
        update_curated(b, ["i0"], "add")                            # b cannot touch a's images
    with pytest.raises(ValueError, match="limit is 2 .*DIFFMIX_MAX_CURATED"):
        update_curated(a, ids, "add", Limits(max_curated=2))
    assert b.state()["curated"] == [] and a.state()["curated"] == []


def test_sweep_scores_profile_and_export(world, monkeypatch):
    """The engine, the scores (reference classifier attached, CLIP off), the profile and two exports."""
    from diffmix_core.bundle import load_bundle
    from diffmix_core.data import load_image
    from diffmix_core.export import verify_manifest
    from diffmix_core.records import read_jsonl, read_png_record
    from diffmix_core.profiles import load_profile, save_profile
    from diffmix_core.app.cache import clip_scorer, reference_for
    from diffmix_core.app.store import Limits, export_curated, open_store, update_curated
    from diffmix_core.app.sweep import SweepRequest, run_sweep
    from diffmix_core.app.views import bundle_markdown, caption
    from diffmix_core.translate import Source

    bundle = load_bundle(world["bundle"])
    store = open_store("")
    src = Source(load_image(world["example"]), "owl", "owl0", world["example"])
    with pytest.raises(ValueError, match="limit of 3 per .*DIFFMIX_MAX_JOBS"):
        run_sweep(store, bundle, src, SweepRequest("owl", "duck", "0.5, 1.0", "n=2", 2, 5.0, "diff-mix"),
                  limits=Limits(max_jobs=3))
    out = run_sweep(store, bundle, src, SweepRequest("owl", "duck", "0.5, 1.0", "0, 1", 2, 5.0, "diff-mix"))
    assert out.columns == 2 and [(r["strength"], r["seed"]) for r in out.records] == [(0.5, 0), (0.5, 1), (1.0, 0), (1.0, 1)]
    sc = out.records[0]["scores"]
    assert 0 <= sc["p_target"] <= 1 and sc["clip_target"] is None and sc["ssim"] is not None
    assert "P(target)" in caption(out.records[0]) and "label: owl 0.29, duck 0.71" in caption(out.records[0])
    assert out.figure is not None and out.summary["recommended_strength"] in (0.5, 1.0)
    assert any("CLIP unavailable: no CLIP model given" in n for n in out.notes)
    _, ref_status = reference_for(bundle)
    assert "test_resnet" in bundle_markdown(bundle, clip_scorer().status, ref_status)
    saved = read_png_record(store.image_path(out.records[0]))
    assert saved["id"] == out.ids[0] and saved["scores"]["p_target"] == sc["p_target"]
    # tune per dataset: the profile is a user overlay under the output root; the bundle is untouched
    before = (bundle.path / "adapter.json").read_bytes()
    path = save_profile(bundle, 0.5, {"min_p_target": 0.2, "max_ssim": ""}, {"strategy": "diff-mix"})
    assert path.parent == world["root"] / "out" / "profiles" and bundle.hash[:16] in path.name
    assert (bundle.path / "adapter.json").read_bytes() == before and load_bundle(bundle.path).hash == bundle.hash
    profile = load_profile(load_bundle(bundle.path))
    assert (profile.strength, profile.thresholds.as_dict(), profile.source) == (0.5, {"min_p_target": 0.2},
                                                                                 "saved profile")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        save_profile(bundle, 1.5, {})
    path.unlink()
    # export: twice, never over the first; files reload and match the records
    update_curated(store, out.ids[:3], "add")
    first, zip1 = export_curated(store)
    second, zip2 = export_curated(store)
    assert first != second and zip1.is_file() and zip2.is_file()
    rows = read_jsonl(first / "imagefolder" / "metadata.jsonl")
    assert [r["id"] for r in rows] == out.ids[:3] and verify_manifest(first) == []
    for row, rec in zip(rows, out.records):
        assert row["soft_label"] == rec["soft_label"] and row["seed"] == rec["seed"]
        assert row["soft_label_vector"][bundle.classes.index("duck")] == pytest.approx(rec["soft_label"]["duck"])
        exported = load_image(first / "imagefolder" / row["file_name"])
        assert np.array_equal(np.asarray(exported), np.asarray(load_image(store.image_path(rec))))
    assert (first / "authors" / "meta.csv").read_text().splitlines()[0] == \
        "First Directory,Second Directory,Number,Strength,Path"


def test_bundle_panel_and_bundle_field(world):
    from diffmix_core.hub import open_bundle
    from diffmix_core.app.cache import app_bundles
    from diffmix_core.ui import on_bundle

    assert world["bundle"] in app_bundles().values()
    info, examples, src, tgt, strength, *th, strategy, steps, guidance, ex, up, prev, card, btn = \
        on_bundle(world["bundle"])
    assert (ex, up, prev) == ("", None, None) and "No source yet" in card   # a new bundle: no source chosen
    assert len(th) == 6 and (steps, guidance) == (25, 7.5)   # no sampler settings in the profile: the defaults
    assert "10 classes" in info and "CLIP off: none chosen" in info and "test_resnet" in info
    assert len(examples) == 8 and examples[0][1] == "owl"
    assert open_bundle(world["bundle"]).path == Path(world["bundle"]).resolve()
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a Hub repo id"):
        open_bundle("/no/such/bundle")
    with pytest.raises(FileNotFoundError, match="could not fetch bundle nobody/nothing"):
        open_bundle("nobody/nothing")   # HF_HUB_OFFLINE=1 in tests


def test_profile_sets_the_sweep_controls(world, tmp_path):
    """A bundle's own profile (as the shipped demo world carries) sets strength, strategy, steps and
    guidance when the bundle is picked; a user's saved overlay comes first."""
    from diffmix_core.bundle import load_bundle
    from diffmix_core.profiles import save_profile
    from diffmix_core.bundle import update_bundle_meta
    from diffmix_core.ui import on_bundle

    copy = tmp_path / "tuned"
    shutil.copytree(world["bundle"], copy)
    update_bundle_meta(copy, profile={"strength": 0.7, "thresholds": {"min_p_target": 0.3}, "strategy": "diff-aug",
                                      "num_inference_steps": 12, "guidance_scale": 2.5})
    _, _, _, _, strength, *th, strategy, steps, guidance, _, _, _, _, _ = on_bundle(str(copy))
    assert (strength, th[0], strategy.value, steps, guidance) == (0.7, 0.3, ["diff-aug"], 12, 2.5)
    path = save_profile(load_bundle(copy), 0.4, {"max_ssim": 0.8}, {"num_inference_steps": 6},
                        root=world["root"] / "out")
    try:
        _, _, _, _, strength, *th, strategy, steps, guidance, _, _, _, _, _ = on_bundle(str(copy))
        assert (strength, th[0], th[-1], strategy.value, steps, guidance) == (0.4, None, 0.8, ["diff-aug"], 6, 2.5)
    finally:
        path.unlink()


def test_upload_limit_message(world, tmp_path):
    from diffmix_core.app.store import Limits, check_upload

    big = tmp_path / "big.png"
    big.write_bytes(b"x" * (2 * 2**20))
    with pytest.raises(ValueError, match="limit is 1 MB .*DIFFMIX_MAX_UPLOAD_MB"):
        check_upload(big, Limits(max_upload_mb=1))


def test_cli_app_launches_the_same_blocks(monkeypatch):
    import gradio as gr

    from diffmix_core.cli import main

    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(kw, blocks=self))
    monkeypatch.setattr("diffmix_core.ui.build_demo", lambda: gr.Blocks())
    assert main(["app", "--host", "127.0.0.1", "--port", "7999"]) == 0
    assert seen["server_name"] == "127.0.0.1" and seen["server_port"] == 7999


# --------------------------------------------------------------------------- the running app
_sweep = partial(sweep, seeds="0, 1", strengths="0.5, 1.0")   # this file's sweep: 2 seeds x 2 strengths


def test_client_sweep_select_export_reload(app_url, world, tmp_path):
    from gradio_client import Client

    from diffmix_core.data import load_image
    from diffmix_core.export import verify_manifest
    from diffmix_core.records import read_jsonl

    client = Client(app_url, verbose=False)
    assert {"/sweep", "/select", "/auto_select", "/export", "/save_profile"} <= set(
        client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    picture, grid_png, box, table, plot, csv, status, tune, count, cur_gallery, cur_box = _sweep(client, world)
    assert plot is not None and "example `0.png`" in status
    assert ("recommended strength (this sweep)" in status) != ("no strength passes" in status)   # one verdict
    with Image.open(picture) as im:   # the labelled grid: a source column + 2 seeds, 2 strength rows
        from diffmix_core.grid import GAP, HEAD_H, LABEL_W, tile_size
        t = tile_size(32)
        assert im.size == (LABEL_W + 3 * (t + GAP) + GAP, HEAD_H + 2 * (t + GAP) + GAP)
    rows = table["data"]
    assert [(r[1], r[2], r[3]) for r in rows] == [("0", "owl", "duck")] * 4     # the source that ran, by id
    assert [(r[4], r[6]) for r in rows] == [(0.5, 0), (0.5, 1), (1.0, 0), (1.0, 1)]
    assert Path(csv).read_text().splitlines()[0].startswith("id,source_id,source,target,strength")
    ids = [r[0] for r in rows]
    images = {i: next((world["root"] / "sessions").glob(f"*/images/{i}.png")) for i in ids}
    count, cur_gallery, cur_box, sweep_box = client.predict(f"{ids[1]},{ids[3]}", "add", api_name="/select")
    assert "2 image(s)" in count and cur_box["value"] == [ids[1], ids[3]]
    msg, folder, zip_path = client.predict(api_name="/export")
    folder = world["root"] / "out" / folder   # shown relative to the output root
    assert "exported 2 image(s)" in msg and verify_manifest(folder) == []
    exported = read_jsonl(folder / "imagefolder" / "metadata.jsonl")
    assert [r["id"] for r in exported] == [ids[1], ids[3]]
    for r, shown, expected in zip(exported, (images[ids[1]], images[ids[3]]), ((0.5, 1), (1.0, 1))):
        assert (r["strength"], r["seed"], r["target_class"]) == (*expected, "duck")
        assert np.array_equal(np.asarray(load_image(folder / "imagefolder" / r["file_name"])),
                              np.asarray(load_image(shown)))
    with zipfile.ZipFile(zip_path) as zf:
        assert f"{folder.name}/imagefolder/metadata.jsonl" in zf.namelist()
    msg2, folder2, _ = client.predict(api_name="/export")
    assert world["root"] / "out" / folder2 != folder and folder.is_dir()   # never over an earlier export


def test_two_clients_never_see_each_others_selections(app_url, world):
    from gradio_client import Client

    a, b = Client(app_url, verbose=False), Client(app_url, verbose=False)
    out = {}

    def work(name, client, seeds):
        table = _sweep(client, world, seeds=seeds, strengths="0.5")[3]
        ids = [r[0] for r in table["data"]]
        out[name] = (ids, client.predict(",".join(ids), "add", api_name="/select"))

    threads = [threading.Thread(target=work, args=("a", a, "3")), threading.Thread(target=work, args=("b", b, "4"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    (ids_a, sel_a), (ids_b, sel_b) = out["a"], out["b"]
    assert set(ids_a).isdisjoint(ids_b)
    assert sel_a[2]["value"] == ids_a and sel_b[2]["value"] == ids_b
    with pytest.raises(Exception, match="unknown image id"):
        a.predict(ids_b[0], "add", api_name="/select")
    _, folder, _ = b.predict(api_name="/export")
    exported = world["root"] / "out" / folder / "imagefolder" / "metadata.jsonl"   # folder: under the output root
    assert [json.loads(line)["id"] for line in exported.open()] == ids_b


def test_bad_input_is_a_clear_error_and_app_keeps_serving(app_url, world, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(Exception, match="not an image"):
        _sweep(client, world, upload=handle_file(str(bad)), example="")
    with pytest.raises(Exception, match="smallest usable strength"):
        client.predict(world["bundle"], None, world["example"], "owl", "duck", "0.01", "0", 25, 5.0, "diff-mix",
                       api_name="/sweep")
    with pytest.raises(Exception, match="not one of the bundle's example images"):
        _sweep(client, world, example=str(bad))
    with pytest.raises(Exception, match="curated batch is empty"):
        client.predict(api_name="/export")
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (10, 200, 10)).save(good)
    rows = _sweep(client, world, seeds="0", strengths="0.5", upload=handle_file(str(good)), example="")[3]["data"]
    assert rows[0][1] == "good"                               # the upload ran, and the table says so
    with Image.open(next((world["root"] / "sessions").glob(f"*/images/{rows[0][0]}.png"))) as im:
        assert im.size == (40, 30)
    with pytest.raises(Exception, match="not both"):
        _sweep(client, world, seeds="0", strengths="0.5", upload=handle_file(str(good)))


def test_clip_loads_in_the_background(monkeypatch):
    """A slow CLIP load (a first download, or offline Hub look-ups timing out) holds up neither
    the page nor a sweep: the scorer says it is still loading, then becomes what loaded."""
    import threading

    from diffmix_core import scoring
    from diffmix_core.app import cache

    release = threading.Event()

    def slow_load(model, pretrained):
        release.wait(30)
        return scoring.ClipScorer(f"{model}/{pretrained}", reason="weights not found (test)")

    monkeypatch.setattr(scoring, "load_clip", slow_load)
    monkeypatch.setenv("DIFFMIX_CLIP_MODEL", "slow-test-model")
    first = cache.clip_scorer()
    assert not first.available and "still loading" in first.status
    release.set()
    assert "weights not found (test)" in cache.clip_scorer(wait=True).status


def test_clip_offline_is_one_quiet_line_at_once(monkeypatch):
    """Offline and not cached: CLIP is off at once (no Hub retries), said in one short line with the
    details folded under it."""
    import time

    from diffmix_core.scoring import ClipScorer
    from diffmix_core.app.cache import clip_offline_reason
    from diffmix_core.app.views import clip_line

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    reason = clip_offline_reason("hf-hub:nobody/no-such-clip", "")
    assert time.perf_counter() - t < 1.0 and reason.startswith("no weights available offline")
    line = clip_line(ClipScorer("hf-hub:nobody/no-such-clip", reason=reason))
    assert line.startswith("<details><summary>CLIP off: no weights available offline</summary>")
    assert clip_offline_reason("none", "") is None and clip_offline_reason("local-dir:/x", "") is None


def test_copy_as_command_makes_the_same_pixels(world, tmp_path):
    """The command the app offers for a result makes that image again, pixel for pixel, into a
    folder under the output root; seed -1 draws a random seed that the record keeps."""
    import shlex

    from diffmix_core.bundle import load_bundle
    from diffmix_core.cli import main
    from diffmix_core.data import load_image
    from diffmix_core.records import read_jsonl
    from diffmix_core.app.store import open_store
    from diffmix_core.app.sweep import SweepRequest, run_sweep
    from diffmix_core.app.views import command_for
    from diffmix_core.translate import Source

    bundle = load_bundle(world["bundle"])
    store = open_store("")
    src = Source(load_image(world["example"]), "owl", "0", world["example"])
    out = run_sweep(store, bundle, src, SweepRequest("owl", "duck", "0.5, 1.0", "0, -1", 3, 5.0, "diff-mix"))
    assert len(out.records) == 4 and out.records[3]["seed"] not in (-1, 0)
    cmd = command_for(out.records[2], out.records)
    again = Path(shlex.split(cmd)[-1])   # --out: under the output root, absolute (never the working folder)
    assert shlex.split(cmd)[-2] == "--out" and again.is_absolute() and again.parent == world["root"] / "out" / "translate"
    assert cmd.startswith("diffmix translate --bundle ") and main(shlex.split(cmd)[1:] + ["--quiet"]) == 0
    made = read_jsonl(again / "records.jsonl")
    assert [(r["strength"], r["seed"]) for r in made] == [(r["strength"], r["seed"]) for r in out.records]
    for new, rec in zip(made, out.records):
        assert np.array_equal(np.asarray(load_image(again / new["file_name"])),
                              np.asarray(load_image(store.image_path(rec))))


def test_who_may_save_a_profile(monkeypatch):
    """A local user may; a proxied, remote or Space visitor may not, unless the operator says so."""
    from diffmix_core.profiles import SAVE_ENV, saving_allowed

    monkeypatch.delenv(SAVE_ENV, raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert saving_allowed("127.0.0.1")[0] and saving_allowed("::1")[0] and saving_allowed("localhost")[0]
    assert not saving_allowed("127.0.0.1", {"X-Forwarded-For": "8.8.8.8"})[0]      # behind a proxy
    allowed, why = saving_allowed("10.1.2.3")
    assert not allowed and SAVE_ENV in why and not saving_allowed(None)[0]
    monkeypatch.setenv("SPACE_ID", "someone/diffmix")
    assert not saving_allowed("127.0.0.1")[0]
    monkeypatch.setenv(SAVE_ENV, "1")
    assert saving_allowed("10.1.2.3")[0]
    monkeypatch.setenv(SAVE_ENV, "0")
    assert not saving_allowed("127.0.0.1")[0]


def test_who_sees_server_paths(monkeypatch):
    """Only the local user (a tile's runnable command names the server's files); saving turned on
    for everyone does not make a remote visitor local, and a Space or a share link has none."""
    from diffmix_core.profiles import SAVE_ENV, local_visitor

    monkeypatch.delenv(SAVE_ENV, raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert local_visitor("127.0.0.1") and local_visitor("::1") and local_visitor("localhost")
    assert not local_visitor("127.0.0.1", {"x-forwarded-for": "8.8.8.8"}) and not local_visitor("10.1.2.3")
    assert not local_visitor(None)
    monkeypatch.setenv(SAVE_ENV, "1")
    assert local_visitor("127.0.0.1") and not local_visitor("10.1.2.3")
    monkeypatch.setenv(SAVE_ENV, "0")   # diffmix app --share
    assert not local_visitor("127.0.0.1")
    monkeypatch.delenv(SAVE_ENV)
    monkeypatch.setenv("SPACE_ID", "someone/diffmix")
    assert not local_visitor("127.0.0.1")


def test_a_visitor_who_may_not_save_gets_a_message_and_nothing_is_written(app_url, world, monkeypatch):
    from gradio_client import Client

    monkeypatch.setenv("DIFFMIX_ALLOW_PROFILE_SAVE", "0")
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="turned off on this server"):
        client.predict(world["bundle"], 0.5, "diff-mix", 25, 5.0, 0.5, None, None, None, None, None,
                       api_name="/save_profile")
    assert not (world["root"] / "out" / "profiles").exists() or not any((world["root"] / "out" / "profiles").iterdir())


# --------------------------------------------------------------------------- issue 27: what a newcomer trips on
def test_first_eta_waits_for_a_timed_step():
    """The first progress line says "estimating…" (the first step also carries loading and warm-up);
    later ones estimate from the time per step measured since then, not from the whole wait."""
    from diffmix_core.ui import _progress_callback

    shown = []
    ticks = iter([0.0, 30.0, 32.0, 36.0])   # start; step 1 after 30 s of loading; then 2 s per step
    report = _progress_callback(lambda value, unit="", desc="": shown.append((value, desc)), 4, lambda: next(ticks))
    report(1, 10)
    report(2, 10)
    report(4, 10)
    assert shown[0] == ((1, 10), "4 image(s): step 1/10, 30 s, estimating…")
    assert shown[1][1].endswith("step 2/10, 32 s, about 16 s left")   # 2 s per step x 8 steps
    assert shown[2][1].endswith("step 4/10, 36 s, about 12 s left")   # (36 - 30) / 3 steps x 6


def test_an_upload_needs_its_class_before_a_sweep(app_url, world, tmp_path):
    """Over the API as on the page: an upload with no class is refused with a message that says
    what to do; the reference classifier's guesses are offered as a hint, never chosen."""
    from gradio_client import Client, handle_file

    from diffmix_core.bundle import load_bundle
    from diffmix_core.app.sweep import class_guesses
    from diffmix_core.data import load_image
    from diffmix_core.ui import on_upload

    photo = tmp_path / "my_goose.png"
    Image.new("RGB", (40, 30), (240, 240, 230)).save(photo)
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="choose the class of the uploaded image my_goose.png"):
        client.predict(world["bundle"], handle_file(str(photo)), "", "", "duck", "0.5", "0", 2, 5.0, "diff-mix",
                       api_name="/sweep")
    guesses = class_guesses(load_bundle(world["bundle"]), load_image(photo))
    assert len(guesses) == 3 and [p for _, p in guesses] == sorted((p for _, p in guesses), reverse=True)
    preview, example, card, source_class = on_upload(world["bundle"], str(photo), "owl")
    assert example == "" and source_class.value is None                        # the class box is cleared
    assert "Choose the class of my\\_goose\\.png" in card and f"{guesses[0][0]} {guesses[0][1]:.2f}" in card


def test_a_reload_restores_the_form_the_sweep_and_the_export(world):
    """A page (re)load shows one consistent state from the session on disk: the last sweep's bundle,
    source, classes and settings in the form, its grid and status, and the last export to download."""
    from diffmix_core.app.store import open_store
    from diffmix_core.app.sweep import SweepRequest, run_sweep
    from diffmix_core.bundle import load_bundle
    from diffmix_core.data import load_image
    from diffmix_core.translate import Source
    from diffmix_core.ui import RESTORE_OUTPUTS, on_export, on_restore, on_session, update_curated

    bundle = load_bundle(world["bundle"])
    store = open_store("")
    fresh = dict(zip(RESTORE_OUTPUTS, on_restore(store.token, world["bundle"])))
    assert fresh["source_class"] is fresh["export_zip"] is fresh["grid"]   # nothing yet: gr.skip(), the bundle's form
    src = Source(load_image(world["example"]), "owl", "0", world["example"])
    out = run_sweep(store, bundle, src, SweepRequest("owl", "crow", "0.5", "0", 2, 3.0, "diff-mix"))
    update_curated(store, out.ids, "add")
    _, message, folder, served = on_export(store.token)
    token, saved, choice = on_session("", store.token)
    assert token == saved == store.token and choice.value == world["bundle"]
    page = dict(zip(RESTORE_OUTPUTS, on_restore(token, world["bundle"])))
    assert (page["source_class"], page["target"], page["strengths"], page["seeds"], page["steps"], page["guidance"],
            page["strategy"], page["fast"]) == ("owl", "crow", "0.5", "0", 2, 3.0, ["diff-mix"], False)
    assert page["example"] == world["example"] and page["upload"] is None and "class **owl**" in page["card"]
    assert "sweep 1" in page["status"] and Path(page["grid"]).is_file()
    assert (page["export_msg"], page["export_dir"], page["export_zip"]) == (message, folder, served)
    assert Path(served).is_file()
