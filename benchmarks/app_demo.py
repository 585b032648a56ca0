"""The app on the shipped demo world, as a newcomer meets it (issue 5's targets).

Starts `python app.py` in a fresh process (offline, CPU), measures the seconds until
the page answers, then drives it with gradio_client: a sweep of 4 strengths x 2 seeds
on the first example image of the first bundle (the shipped demo world when it is
there), with the bundle's saved profile (strategy, steps, guidance). Prints both
figures and the targets:

    .venv/bin/python benchmarks/app_demo.py [--repeats 3]

    sweep 4 strengths x 2 seeds: ... s (target <= 15 s)      # the slower of the first and the median
    serving after python app.py: ... s (target <= 20 s)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--repeats", type=int, default=4, help="sweeps timed (the first loads the models)")
    args = parser.parse_args()

    from gradio_client import Client

    from diffmix_core.bundle import bundle_examples, load_bundle
    from diffmix_core.profiles import load_profile
    from diffmix_core.app.cache import app_bundles
    from diffmix_core.ui import wait_until_served

    url = f"http://127.0.0.1:{args.port}/"
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GRADIO_SERVER_PORT=str(args.port), GRADIO_SERVER_NAME="127.0.0.1",
                   HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", DIFFMIX_OUTPUT=f"{tmp}/out",
                   DIFFMIX_SESSIONS=f"{tmp}/sessions")
        env.pop("DIFFMIX_BUNDLES", None)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_until_served(url, proc)
            serving = time.perf_counter() - t0
            path = next(iter(app_bundles().values()))
            bundle = load_bundle(path)
            profile = load_profile(bundle)
            example, cls = bundle_examples(bundle)[0]
            target = next(c for c in bundle.classes if c != cls)
            client = Client(url, verbose=False)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                out = client.predict(path, None, example, cls, target, "0.3, 0.5, 0.7, 0.9", "0, 1",
                                     profile.num_inference_steps or 25, 7.5 if profile.guidance_scale is None else profile.guidance_scale,
                                     profile.strategy or "diff-mix", api_name="/sweep")
                times.append(time.perf_counter() - t)
                if len(out[3]["data"]) != 8:   # the table: one row per image
                    raise SystemExit(f"expected 8 images, got {len(out[3]['data'])}: {out[6]}")
        finally:
            proc.terminate()
            proc.wait(30)
    first, later = times[0], sorted(times[1:]) or times
    print(f"bundle: {path} ({len(bundle.classes)} classes, {bundle.resolution} px); {cls} -> {target}, "
          f"{profile.num_inference_steps or 25} steps, guidance {profile.guidance_scale}; "
          f"{os.cpu_count()} cpus")
    print(f"first sweep 4 strengths x 2 seeds, scored (loads the pipeline and reference): {first:.1f} s")
    print(f"later sweeps: best {later[0]:.1f} s, median {later[len(later) // 2]:.1f} s over {len(later)}")
    print(f"sweep 4 strengths x 2 seeds: {max(first, later[len(later) // 2]):.1f} s (target <= 15 s)")
    print(f"serving after python app.py: {serving:.1f} s (target <= 20 s)")


if __name__ == "__main__":
    main()
