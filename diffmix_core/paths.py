"""Where diffmix's own files are: one name per place, used by every module that needs one.

- ``PROJECT_ROOT``: the checkout (or source tree) holding ``diffmix_core/``, ``assets/`` and
  ``requirements.txt``;
- ``ASSETS_ROOT``: ``assets/`` in it (the demo world, shipped bundles, licences);
- ``DEMO_ASSETS``: the shipped demo world, ``assets/demo`` (its ``bundle/``, ``base/``, data);
- ``DEMO_ASSETS_REL``: the same folder relative to a root, as a world build writes it
  under its output folder.
"""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ASSETS_ROOT = PROJECT_ROOT / "assets"
DEMO_ASSETS_REL = "assets/demo"
DEMO_ASSETS = PROJECT_ROOT / DEMO_ASSETS_REL
DEMO_BUNDLE = DEMO_ASSETS / "bundle"     # the demo world's bundle (the app's and `demo evaluate`'s default)
SHIPPED_BUNDLES = ASSETS_ROOT / "bundles"   # further bundles shipped beside the demo world (the app lists them)
