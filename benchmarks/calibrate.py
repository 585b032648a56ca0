"""The cost of a calibration on the demo world: 10 classes x 2 sources x 4 strengths x 1 seed.

Each of the bundle's classes gives 2 example images; each goes to 1 target (the next class)
at s = 0.3, 0.5, 0.7, 0.9 with seed 0: 80 images in one batched engine run, then scored
(reference classifier + the demo CLIP) and summarised (curves with t-intervals, per-class
table, bootstrap interval of the recommendation). Sampler settings: the bundle's profile
(25 steps, guidance 2.5). Prints the seconds of each part and, last, the calibration's
seconds and images per second. Goal: <= 60 s on 2 CPU cores.

    python benchmarks/calibrate.py [--threads 2] [--repeats 1] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from diffmix_core.bundle import load_bundle
from diffmix_core.calibrate import calibrate, translate_config_for, write_calibration
from diffmix_core.config import CalibrateConfig, PipelineConfig
from diffmix_core.apply import load_pipeline_for
from diffmix_core.translate import translate

BUNDLE = Path(__file__).resolve().parents[1] / "assets" / "demo" / "bundle"
CONFIG = CalibrateConfig(per_class=2, targets=1, strengths=(0.3, 0.5, 0.7, 0.9), seeds=(0,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2, the goal's cores)")
    parser.add_argument("--repeats", type=int, default=1, help="calibrations timed; the best is reported")
    parser.add_argument("--out", type=Path, default=None, help="also write calibration.json and the two PNGs here "
                        "(docs/calibrate.md's figures)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, os.cpu_count() {os.cpu_count()}, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    t = time.perf_counter()
    bundle = load_bundle(BUNDLE)
    pipe = load_pipeline_for(PipelineConfig(device="cpu", dtype="fp32"), bundle)
    print(f"load bundle + pipeline: {time.perf_counter() - t:.1f} s (not counted)")
    engine = []

    def generate(bundle, jobs, config, callback=None):
        start = time.perf_counter()
        out = translate(pipe, jobs, config, bundle=bundle, show_progress=False, callback=callback)
        engine.append(time.perf_counter() - start)
        return out

    best = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        cal = calibrate(bundle, None, CONFIG, translate_config=translate_config_for(bundle), generate=generate,
                        show_progress=False)
        total = time.perf_counter() - t
        best = total if best is None else min(best, total)
        n = cal.settings["images"]
        print(f"{n} images ({cal.settings['n_sources']} sources x {cal.settings['targets_per_source']} target x "
              f"{len(cal.settings['strengths'])} strengths x {len(cal.settings['seeds'])} seed): engine "
              f"{engine[-1]:.1f} s, scoring + summary (incl. loading the reference and CLIP) "
              f"{total - engine[-1]:.1f} s, total {total:.1f} s")
    print(cal.text())
    if args.out is not None:
        print("wrote " + ", ".join(str(f) for f in write_calibration(cal, args.out)))
    print(f"calibration: {best:.1f} s, {n / best:.2f} images/s (goal: <= 60 s on 2 cores)")


if __name__ == "__main__":
    main()
