"""How long a bundle's class-name checks take as the class count grows (issue 25's hostile
adapter.json): the checks `load_bundle` runs on the names (unique names and tokens, one token
per class, distinct embedding files), and the refusal of a file above the class cap.

Prints, side by side for each class count, the seconds the checks take and the seconds per
1,000 classes (flat = linear). Target: 9,000 classes well under a second; above the cap
(DIFFMIX_MAX_CLASSES, 10,000 by default) refused in milliseconds.

    python benchmarks/bundle_checks.py
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffmix_core.bundle import _check_names, load_bundle  # noqa: E402


def main() -> None:
    print(f"{'classes':>8} {'check s':>9} {'s / 1k':>8}")
    for n in (1_000, 2_000, 4_000, 9_000):
        names = [f"class {i}" for i in range(n)]
        tokens = [f"<c{i}>" for i in range(n)]
        start = time.perf_counter()
        _check_names(names, tokens)
        took = time.perf_counter() - start
        print(f"{n:>8,} {took:>9.4f} {took / n * 1000:>8.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"c{i}" for i in range(16_000)]
        (Path(tmp) / "adapter.json").write_text(json.dumps({"format_version": 1, "classes": names, "tokens": names}))
        start = time.perf_counter()
        try:
            load_bundle(tmp)
        except ValueError as err:
            print(f"16,000 classes refused in {time.perf_counter() - start:.4f} s: {str(err)[-90:]}")


if __name__ == "__main__":
    main()
