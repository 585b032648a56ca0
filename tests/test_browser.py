"""The app in a real browser (Debian chromium + Python playwright, no browser download),
on the shipped demo world as a newcomer meets it: open the page, pick an example, run a
sweep of 4 strengths x 2 seeds, see the images and the plot, curate one, export; the
screenshot goes to docs/app.png (the README shows it)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "app.png"
DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "assets" / "demo" / "bundle"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium); playwright never downloads a browser here"),
]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from test_ui import ENV

    pytest.importorskip("playwright.sync_api", reason="needs the Python playwright package")
    root = tmp_path_factory.mktemp("browser")
    old = {k: os.environ.get(k) for k in ENV}
    os.environ.pop("DIFFMIX_BUNDLES", None)   # the app's own default: the shipped demo world first
    os.environ.update({"DIFFMIX_OUTPUT": str(root / "out"), "DIFFMIX_SESSIONS": str(root / "sessions"),
                       "DIFFMIX_CLIP_MODEL": "none"})
    from diffmix_core.ui import build_demo

    demo = build_demo()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield demo.local_url, root
    demo.close()
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_sweep_curate_export_in_chromium(app):
    from playwright.sync_api import expect, sync_playwright

    url, root = app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            expect(page.get_by_text("10 classes")).to_be_visible(timeout=60_000)
            expect(page.get_by_text("tf_efficientnet_lite0")).to_be_visible()   # the shipped reference
            expect(page.get_by_label("number input for Steps")).to_have_value("25")   # from the bundle's profile
            expect(page.get_by_label("number input for Guidance")).to_have_value("2.5")
            page.locator("#examples button.thumbnail-item").nth(8).click()   # an example source: the first owl
            owl = DEMO_BUNDLE / "examples" / "owl"
            expect(page.get_by_label("Example chosen")).to_have_value(str(sorted(owl.glob("*.png"))[0]))
            expect(page.get_by_label("Source class")).to_have_value("owl")
            target = page.get_by_label("Target class")
            target.click()
            target.fill("parrot")
            page.get_by_role("option", name="parrot").click()
            expect(target).to_have_value("parrot")
            page.get_by_label("Strengths").fill("0.3, 0.5, 0.7, 0.9")
            page.get_by_label("Seeds").fill("0, 1")
            page.get_by_role("button", name="Run sweep").click()
            results = page.locator("#results button.thumbnail-item")
            expect(results).to_have_count(8, timeout=90_000)
            expect(page.get_by_text("recommended strength:").first).to_be_visible()
            expect(page.locator("#plot img").first).to_be_visible()
            expect(page.get_by_text("P(target)").first).to_be_visible()
            results.nth(1).click()                                # curate: a click toggles selection
            expect(page.get_by_text("Curated batch: 1 image(s)")).to_be_visible(timeout=30_000)
            page.get_by_role("button", name="Export batch").click()
            expect(page.get_by_text("exported 1 image(s)")).to_be_visible(timeout=30_000)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            # a page reload finds the same session: the curated batch is still there
            page.reload()
            expect(page.get_by_text("Curated batch: 1 image(s)")).to_be_visible(timeout=30_000)
        finally:
            browser.close()
    exports = [d for d in (root / "out" / "exports").iterdir() if d.is_dir()]
    assert len(exports) == 1 and (exports[0] / "imagefolder" / "metadata.jsonl").is_file()
    assert shutil.which(str(CHROMIUM))
