"""The app in a real browser (Debian chromium + Python playwright, no browser download),
on the shipped demo world as a newcomer meets it. Replays the two ways the source used to
be relabelled (saving a profile; an upload that stuck after an example was clicked) and
the whole loop: pick, sweep, curate by clicking tiles, save the profile, sweep again,
export. The records on disk are the judge. Screenshots go to a temp dir only
(docs/screenshot.py makes the README's)."""
from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from helpers import app_environment, tree_digest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
DEMO_BUNDLE = ROOT / "assets" / "demo" / "bundle"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]
CLASSES = ["crow", "duck", "flamingo", "goose", "owl", "parrot", "peacock", "penguin", "rooster", "turkey"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium); playwright never downloads a browser here"),
]


def _git_status() -> str:
    try:
        return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "git unavailable"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    pytest.importorskip("playwright.sync_api", reason="needs the Python playwright package")
    from playwright.sync_api import expect

    # Every wait is on a server round-trip. CI machines run these 2-3x slower than a quiet 2-core
    # box (an upload after a sweep took over Playwright's 5 s default there), so no expectation
    # (here) or action (_browser_page) uses the defaults: a real hang still fails, a slow machine does not.
    expect.set_options(timeout=60_000)
    root = tmp_path_factory.mktemp("browser")
    # DIFFMIX_BUNDLES unset: the app's own default, the shipped demo world first;
    # DIFFMIX_ALLOW_PROFILE_SAVE unset: the browser is a local user, saving is on.
    with app_environment(DIFFMIX_OUTPUT=str(root / "out"), DIFFMIX_CLIP_MODEL="none"):
        from diffmix_core.ui import build_demo

        before = (tree_digest(DEMO_BUNDLE), _git_status())
        demo = build_demo()
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
        yield demo.local_url, root
        demo.close()
    assert (tree_digest(DEMO_BUNDLE), _git_status()) == before, "the app wrote into the repository"


@pytest.fixture
def page(app, tmp_path, monkeypatch):
    """A fresh browser page on the app, with its own sessions folder (the session on disk is read back)."""
    url, _ = app
    monkeypatch.setenv("DIFFMIX_SESSIONS", str(tmp_path / "sessions"))
    with _browser_page(url, tmp_path / "sessions") as pg:
        yield pg


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _browser_page(url: str, sessions: Path, **context):
    """A page of a fresh chromium on the app at the tests' window size, loaded, whose actions
    wait up to 2 min (a slow CI machine); ``context``: the browser context's options (headers)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}, **context).new_page()
            page.set_default_timeout(120_000)
            page.goto(url)
            expect(page.get_by_text("10 classes")).to_be_visible(timeout=240_000)   # a busy CPU: slow first load
            page.sessions = sessions
            yield page
        finally:
            browser.close()


def _example(page, cls: str, n: int = 0) -> Path:
    """Click the n-th example of ``cls`` (the gallery lists the bundle's examples in label order)."""
    from playwright.sync_api import expect

    files = sorted((DEMO_BUNDLE / "examples" / cls).glob("*.png"))
    before = sum(len(list((DEMO_BUNDLE / "examples" / c).glob("*.png"))) for c in CLASSES[:CLASSES.index(cls)])
    page.locator("#examples button.thumbnail-item").nth(before + n).click()
    expect(page.get_by_label("Example chosen")).to_have_value(str(files[n]))
    return files[n]


def _choose(page, label: str, value: str) -> None:
    from playwright.sync_api import expect

    box = page.get_by_label(label)
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).click()
    expect(box).to_have_value(value)


def _sweep(page, n: int, strengths: str = "0.5, 0.9", seeds: str = "0", progress: bool = False) -> list[dict]:
    """Run sweep number ``n`` of this page's session; its records, read from the session on disk."""
    import re

    from playwright.sync_api import expect

    from diffmix_core.app.store import Store

    page.get_by_label("Strengths").fill(strengths)
    page.get_by_label("Seeds").fill(seeds)
    page.get_by_role("button", name="Run sweep").click()
    if progress:   # the engine's steps, live, with an estimate of the time left
        expect(page.get_by_text(re.compile(r"image\(s\): step \d+/\d+, \d+ s, about \d+ s left")).first) \
            .to_be_visible(timeout=300_000)
    expect(page.locator("#status")).to_contain_text(f"sweep {n} ran", timeout=600_000)
    (folder,) = [d for d in page.sessions.iterdir()]
    store = Store("", folder)   # read from disk: the folder name is a hash, it does not open the session
    records = store.records()
    return [records[i] for i in store.state()["last_sweep"]]


def _settled(page, img) -> dict:
    """The box of picture ``img`` once it has loaded and stopped moving. Each sweep and each click
    replaces the grid picture (the curated frame): on a slow machine a click or a measurement
    made at once meets a picture still being swapped in (zero size, or the old one)."""
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle())
    box, before = img.bounding_box(), None
    while box != before:
        page.wait_for_timeout(200)
        before, box = box, img.bounding_box()
    return box


def _click_tile(page, records: list[dict], row: int, col: int) -> None:
    """Click the tile at (row, col) of the grid picture, converting picture pixels to screen pixels
    the way Gradio converts them back (object-fit: contain)."""
    from diffmix_core.grid import layout, screen_point

    img = page.locator("#grid img")
    img.scroll_into_view_if_needed()
    box = _settled(page, img)
    page.mouse.click(*screen_point(layout(records, records[0]["resolution"]), row, col,
                                   (box["x"], box["y"], box["width"], box["height"])))


# --------------------------------------------------------------------------- the relabelling paths
def test_saving_a_profile_never_relabels_the_source(page, app, tmp_path):
    """Pick the peacock example, target penguin, save the profile, sweep: the records say
    peacock -> penguin, and the profile went to the output root, not into the bundle."""
    from playwright.sync_api import expect

    _, root = app
    peacock = _example(page, "peacock")
    expect(page.get_by_label("Source class")).to_have_value("peacock")
    _choose(page, "Target class", "penguin")
    page.get_by_label("Chosen strength").fill("0.7")
    page.get_by_role("button", name="Save strength + thresholds as my profile").click()
    expect(page.get_by_text("saved to")).to_be_visible()
    expect(page.get_by_label("Source class")).to_have_value("peacock")
    expect(page.get_by_label("Target class")).to_have_value("penguin")
    expect(page.get_by_label("Example chosen")).to_have_value(str(peacock))
    records = _sweep(page, 1)
    assert {(r["source_class"], r["target_class"], r["source_path"]) for r in records} == \
        {("peacock", "penguin", str(peacock))}
    assert len(list((root / "out" / "profiles").glob("bundle-*.json"))) == 1
    page.screenshot(path=str(tmp_path / "after-profile.png"), full_page=True)


def test_an_upload_never_sticks_after_an_example_is_clicked(page, tmp_path):
    """Upload a photo, then click an example: the example runs, and the records say so."""
    from playwright.sync_api import expect

    photo = tmp_path / "my-photo.png"
    Image.new("RGB", (80, 60), (200, 120, 40)).save(photo)
    page.locator("#upload input[type=file]").set_input_files(str(photo))
    expect(page.locator("#source-card")).to_contain_text("upload my-photo.png")
    owl = _example(page, "owl")
    expect(page.locator("#source-card")).to_contain_text(f"example owl/{owl.name}")
    records = _sweep(page, 1, strengths="0.5")
    assert [(r["source_path"], r["source_id"], r["source_class"]) for r in records] == [(str(owl), owl.stem, "owl")]
    expect(page.locator("#status")).to_contain_text(f"example {owl.name}")
    # and the other way round: an upload after the example runs the upload
    page.locator("#upload input[type=file]").set_input_files(str(photo))
    expect(page.get_by_label("Example chosen")).to_have_value("")
    expect(page.get_by_label("Source class")).to_have_value("")   # an upload's class is the user's to choose
    _choose(page, "Source class", "owl")
    records = _sweep(page, 2, strengths="0.5")
    assert records[0]["source_id"] == "my-photo" and records[0]["source_path"].startswith("sources/")
    # a class that disagrees with the example's folder is flagged before the sweep
    _example(page, "duck")
    _choose(page, "Source class", "goose")
    expect(page.locator("#source-card")).to_contain_text("differs from the example's folder")


# --------------------------------------------------------------------------- the whole loop
def test_pick_sweep_curate_save_sweep_export(page, app, tmp_path):
    from playwright.sync_api import expect

    from diffmix_core.records import read_jsonl

    _, root = app
    expect(page.get_by_label("number input for Guidance")).to_have_value("2.5")   # from the bundle's profile
    owl = _example(page, "owl")
    _choose(page, "Target class", "parrot")
    first = _sweep(page, 1, strengths="0.3, 0.5, 0.7, 0.9", seeds="0, 1", progress=True)
    assert [(r["strength"], r["seed"]) for r in first] == [(s, k) for s in (0.3, 0.5, 0.7, 0.9) for k in (0, 1)]
    expect(page.locator("#plot img").first).to_be_visible()
    _click_tile(page, first, 2, 1)   # s 0.7, seed 0 (column 0 is the source)
    expect(page.get_by_text("Curated batch: 1 image(s)")).to_be_visible()
    _click_tile(page, first, 3, 2)   # s 0.9, seed 1
    expect(page.get_by_text("Curated batch: 2 image(s)")).to_be_visible()
    expect(page.locator("#tile-info")).to_contain_text("strength 0.9")
    expect(page.locator("#tile-command")).to_contain_text("diffmix translate --bundle")   # copy as command
    _click_tile(page, first, 0, 0)   # the source column: nothing happens
    _click_tile(page, first, 2, 1)   # again: un-curated
    expect(page.get_by_text("Curated batch: 1 image(s)")).to_be_visible()
    _click_tile(page, first, 2, 1)
    expect(page.get_by_text("Curated batch: 2 image(s)")).to_be_visible()
    page.get_by_label("Chosen strength").fill("0.7")
    page.get_by_role("button", name="Save strength + thresholds as my profile").click()
    expect(page.get_by_text("saved to")).to_be_visible()
    second = _sweep(page, 2, strengths="0.7", seeds="5")
    assert [(r["source_class"], r["target_class"], r["source_path"], r["seed"]) for r in second] == \
        [("owl", "parrot", str(owl), 5)]
    _click_tile(page, second, 0, 1)
    expect(page.get_by_text("Curated batch: 3 image(s)")).to_be_visible()
    page.screenshot(path=str(tmp_path / "loop.png"), full_page=True)
    page.get_by_role("button", name="Export batch").click()
    expect(page.get_by_text("exported 3 image(s)")).to_be_visible()
    folder = page.get_by_label("Export folder").input_value()   # shown relative to the output root
    assert Path(folder).parent == Path("exports")
    rows = read_jsonl(root / "out" / folder / "imagefolder" / "metadata.jsonl")
    want = {(0.7, 0), (0.9, 1), (0.7, 5)}
    assert {(r["strength"], r["seed"]) for r in rows} == want
    # exported records name the source relative to its bundle (no server paths leave the app)
    assert {(r["source_class"], r["target_class"], r["source_path"]) for r in rows} == \
        {("owl", "parrot", owl.relative_to(DEMO_BUNDLE).as_posix())}
    # a page reload finds the same session: the curated batch is still there
    page.reload()
    expect(page.get_by_text("Curated batch: 3 image(s)")).to_be_visible()


def test_a_remote_visitor_sees_no_server_path_in_a_tile_or_an_export(app, tmp_path, monkeypatch):
    """A visitor behind a proxy (X-Forwarded-For: not the local user) sweeps diff-mix and diff-ii side
    by side, clicks the diff-ii tile and exports it: the tile's command and the exported records name
    the bundle by its folder name and both sources (diff-ii's partner too) relative to it."""
    from playwright.sync_api import expect

    from diffmix_core.records import read_jsonl

    url, root = app
    monkeypatch.setenv("DIFFMIX_SESSIONS", str(tmp_path / "sessions"))
    server = [str(ROOT), str(root), "/tmp", str(Path.home())]
    with _browser_page(url, tmp_path / "sessions", extra_http_headers={"X-Forwarded-For": "203.0.113.7"}) as page:
        owl = _example(page, "owl")
        _choose(page, "Target class", "parrot")
        box = page.get_by_label("Strategies")
        box.click()
        page.get_by_role("option", name="diff-ii", exact=True).click()
        page.keyboard.press("Escape")
        records = _sweep(page, 1, strengths="0.5", seeds="0")
        assert [r["strategy"] for r in records] == ["diff-mix", "diff-ii"]
        assert records[1]["partner_path"] and Path(records[1]["partner_path"]).is_absolute()   # the server's
        _click_tile(page, records, 0, 2)   # s 0.5; columns: source, diff-mix, diff-ii
        expect(page.get_by_text("Curated batch: 1 image(s)")).to_be_visible()
        command = page.locator("#tile-command").inner_text()
        assert "--strategy diff-ii" in command and "--partner examples/owl/" in command, command
        assert f"--image {owl.relative_to(DEMO_BUNDLE).as_posix()}" in command and "--out OUT" in command
        assert not any(s in command for s in server), command
        page.get_by_role("button", name="Export batch").click()
        expect(page.get_by_text("exported 1 image(s)")).to_be_visible()
        folder = page.get_by_label("Export folder").input_value()
    (row,) = read_jsonl(root / "out" / folder / "imagefolder" / "metadata.jsonl")
    assert row["strategy"] == "diff-ii" and row["bundle"] == "bundle"
    assert row["source_path"] == owl.relative_to(DEMO_BUNDLE).as_posix()
    assert row["partner_path"] == Path(records[1]["partner_path"]).relative_to(DEMO_BUNDLE).as_posix()
    assert not any(s in json.dumps(row) for s in server), row


def test_a_typo_keeps_the_previous_results(page):
    from playwright.sync_api import expect

    _example(page, "crow")
    _sweep(page, 1, strengths="0.5")
    grid_src = page.locator("#grid img").get_attribute("src")
    page.get_by_label("Strengths").fill("0.5, 1.7")
    page.get_by_role("button", name="Run sweep").click()
    expect(page.get_by_text("strengths must be between 0 and 1").first).to_be_visible()
    assert page.locator("#grid img").get_attribute("src") == grid_src
    expect(page.locator("#status")).to_contain_text("sweep 1 ran")


# --------------------------------------------------------------------------- issue 27: one consistent page
def test_upload_asks_for_its_class_and_a_reload_restores_the_whole_page(page, app, tmp_path):
    """An upload clears the class (the reference classifier's top guesses as a hint) and a sweep
    without one is refused; "all other classes" wraps into bands whose tiles stay >= 120 px; the
    plot's label does not sit on its titles and the legend gives the distance's range; the first
    ETA waits for a measured step; "copy as command" writes under the output root; after a reload
    the form, the source, the grid and the last export (its download too) are the sweep's."""
    import re

    from playwright.sync_api import expect

    from diffmix_core.app.store import Store
    from diffmix_core.grid import MAX_WIDTH, layout

    _, root = app
    photo = tmp_path / "my_goose.png"
    Image.new("RGB", (80, 60), (220, 220, 210)).save(photo)
    page.locator("#upload input[type=file]").set_input_files(str(photo))
    expect(page.locator("#source-card")).to_contain_text("Choose the class of my_goose.png")
    expect(page.locator("#source-card")).to_contain_text("reference classifier's guesses")
    expect(page.get_by_label("Source class")).to_have_value("")
    page.get_by_role("button", name="Run sweep").click()
    expect(page.get_by_text("choose the class of the uploaded image").first).to_be_visible()
    _choose(page, "Source class", "goose")
    _choose(page, "Target class", "all other classes")
    page.get_by_label("Strengths").fill("0.5")
    page.get_by_label("Seeds").fill("0")
    page.get_by_role("button", name="Run sweep").click()
    expect(page.get_by_text(re.compile(r"step \d+/\d+, \d+ s, (estimating…|about \d+ s left)")).first) \
        .to_be_visible(timeout=300_000)
    expect(page.locator("#status")).to_contain_text("sweep 1 ran", timeout=600_000)
    (folder,) = list(page.sessions.iterdir())
    store = Store("", folder)
    records = [store.records()[i] for i in store.state()["last_sweep"]]
    assert len(records) == 9 and {r["source_class"] for r in records} == {"goose"}
    # the grid: bands of targets, every tile at least 120 px wide as shown
    grid = layout(records, records[0]["resolution"])
    img = page.locator("#grid img")
    box = _settled(page, img)
    natural_w, natural_h = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    assert natural_w <= MAX_WIDTH and len(grid.bands) > 1
    assert grid.tile / max(natural_w / box["width"], natural_h / box["height"]) >= 120
    # the plot: no label over the left title; the legend states the distance's range
    plot = page.locator("#plot img").first
    expect(plot).to_be_visible()
    image = _settled(page, plot)
    for label in page.locator("#plot").get_by_text("Faithfulness / diversity vs strength").all():
        if label.is_visible():   # a label may stay in the page, but not over the plot
            box = label.bounding_box()
            assert box["y"] + box["height"] <= image["y"] or box["y"] >= image["y"] + image["height"], (box, image)
    page.get_by_text("What the scores and the plot mean").click()
    expect(page.get_by_text("at most 2").first).to_be_visible()
    # copy as command: --out under the output root
    _click_tile(page, records, 0, 1)
    expect(page.get_by_text("Curated batch: 1 image(s)")).to_be_visible()
    expect(page.locator("#tile-command")).to_contain_text(f"--out {root / 'out'}/")
    page.get_by_role("button", name="Export batch").click()
    expect(page.get_by_text("exported 1 image(s)")).to_be_visible()
    export_dir = page.get_by_label("Export folder").input_value()
    # a reload: one consistent page
    page.reload()
    expect(page.locator("#status")).to_contain_text("sweep 1 ran", timeout=60_000)
    expect(page.get_by_label("Source class")).to_have_value("goose")
    expect(page.get_by_label("Target class")).to_have_value("all other classes")
    expect(page.get_by_label("Strengths")).to_have_value("0.5")
    expect(page.get_by_label("Seeds")).to_have_value("0")
    expect(page.locator("#source-card")).to_contain_text("upload my_goose.png as class goose")
    expect(page.get_by_label("Export folder")).to_have_value(export_dir)
    with page.expect_download() as download:
        page.get_by_text("Download export (zip)").click()
    assert download.value.suggested_filename == Path(export_dir).name + ".zip"
    # and the restored form runs: the same upload, class and settings make the same images
    page.get_by_role("button", name="Run sweep").click()
    expect(page.locator("#status")).to_contain_text("sweep 2 ran", timeout=600_000)
    assert store.state()["last_sweep"] == [r["id"] for r in records]


def test_calibrate_then_save_names_the_calibration_in_the_bundle_panel(page):
    """Last in this file: it saves a profile (2 steps) that the other tests' sweeps would start from."""
    import re

    from playwright.sync_api import expect

    page.get_by_text("Calibrate the dataset's strength").click()   # open the section
    page.get_by_label("Sources per class (K)").fill("1")
    page.get_by_label("Targets per source (M; 0 = all)").fill("1")
    page.get_by_label("Strength list").fill("0.9")
    page.get_by_label("number input for Calibration steps").fill("2")
    page.get_by_role("button", name=re.compile("Run calibration")).click()
    expect(page.locator("#calibration-text")).to_contain_text("strength", timeout=300_000)
    assert "10 images = 10 sources x 1 targets x 1 strengths x 1 seed(s)" in page.locator(
        "#calibration-text").inner_text()
    expect(page.locator("#calibration-plot img, #calibration-plot canvas, #calibration-plot svg").first).to_be_visible()
    page.get_by_role("button", name="Save as the dataset's profile").click()
    # the save message, then the bundle panel (refreshed after the save) say where the strength came from
    expect(page.get_by_text(re.compile(r"strength 0\.9 from a calibration on .* = 10 images"))).to_have_count(
        2)
