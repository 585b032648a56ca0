"""Regenerate the README's screenshot of the app (docs/app.png) on the shipped demo world.

Starts the app in this process (outputs and sessions in a temp dir, CLIP off), opens it
in Debian's chromium through playwright, picks the first owl example, targets parrot,
sweeps 4 strengths x 2 seeds, curates two tiles and takes a full-page screenshot.
The tests never write this file; run it on purpose:

    .venv/bin/python docs/screenshot.py [--out docs/app.png]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]


def click_tile(page, records: list[dict], row: int, col: int) -> None:
    """Click a grid tile (picture pixels -> screen pixels, as Gradio maps them back)."""
    from diffmix_core.grid import layout, screen_point

    img = page.locator("#grid img")
    img.scroll_into_view_if_needed()
    box = img.bounding_box()
    page.mouse.click(*screen_point(layout(records, records[0]["resolution"]), row, col,
                                   (box["x"], box["y"], box["width"], box["height"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "app.png")
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({"DIFFMIX_OUTPUT": f"{tmp}/out", "DIFFMIX_SESSIONS": f"{tmp}/sessions",
                           "DIFFMIX_CLIP_MODEL": "none", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
        os.environ.pop("DIFFMIX_BUNDLES", None)
        from diffmix_core.app.store import Store
        from diffmix_core.ui import build_demo

        demo = build_demo()
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(demo.local_url)
                expect(page.get_by_text("10 classes")).to_be_visible(timeout=60_000)
                page.locator("#examples button.thumbnail-item").nth(8).click()   # the first owl
                expect(page.get_by_label("Source class")).to_have_value("owl")
                target = page.get_by_label("Target class")
                target.click()
                target.fill("parrot")
                page.get_by_role("option", name="parrot", exact=True).click()
                page.get_by_label("Strengths").fill("0.3, 0.5, 0.7, 0.9")
                page.get_by_label("Seeds").fill("0, 1")
                page.get_by_role("button", name="Run sweep").click()
                expect(page.locator("#status")).to_contain_text("sweep 1 ran", timeout=180_000)
                store = Store("", next(Path(f"{tmp}/sessions").iterdir()))   # read from disk: the folder name does not open a session
                records = [store.records()[i] for i in store.state()["last_sweep"]]
                click_tile(page, records, 2, 1)
                expect(page.get_by_text("Curated batch: 1 image(s)")).to_be_visible(timeout=30_000)
                click_tile(page, records, 3, 2)
                expect(page.get_by_text("Curated batch: 2 image(s)")).to_be_visible(timeout=30_000)
                page.evaluate("window.scrollTo(0, 0)")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            demo.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
