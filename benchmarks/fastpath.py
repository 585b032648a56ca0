"""The feature cache (--cache-interval N, DeepCache) side by side with the plain engine, one run.

Two models, the same jobs with N = 1 (off), 2, 3 and 5:

demo:  the shipped demo world (assets/demo/bundle on its base; diff-mix, guidance 2.5, 25 steps,
       the `demo evaluate` settings) on a fixed subset of held-out test images: each source to the
       next class(es) at two strengths. Images per second, peak memory, target-hit and
       source-keep as `diffmix demo evaluate` computes them (the bundle's reference classifier,
       scoring.score_images, demo.world.strength_table), and the mean absolute pixel difference
       (0-255) to the uncached image of the same job.
sd15:  the Stable Diffusion 1.5 architecture with RANDOM weights (diffmix_core/archs/sd15.json),
       128 px, real-mix, guidance 7.5: images per second and peak memory (its images are noise, so
       no quality figures).

For each model it also measures where the time goes: the FLOPs of one shallow step against one
full UNet call (torch.utils.flop_counter), their wall times, and the share of the uncached run's
time spent outside the UNet (VAE, text encoder, scheduler: hooks on the UNet), which caps the
end-to-end speedup.

Timings are the best of --repeats, interleaved over the settings (a shared CPU drifts); peak
memory is the most the process held during a setting above what it held before (resident set
sampled every 5 ms on a CPU; torch.cuda.max_memory_allocated on a GPU). The last line is

    fastpath: speedup=<demo images/s at N=3 over N=1> hit_loss=<demo target-hit at N=1 minus at N=3>

    python benchmarks/fastpath.py [--quick] [--out fastpath.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sweep  # noqa: E402  (benchmarks/sweep.py: the sweep's source image)
from diffmix_core import feature_cache  # noqa: E402
from diffmix_core.config import TranslateConfig  # noqa: E402
from diffmix_core.translate import Job, Source, translate  # noqa: E402

INTERVALS = (1, 2, 3, 5)


class PeakMemory:
    """Peak memory (MiB) while the block runs: CUDA's max_memory_allocated on a GPU, else the
    process's resident set sampled on a thread (an allocator keeps what an earlier run freed, so
    on a CPU a later setting shows at least the earlier peak: read the differences from
    :class:`CacheBytes`)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mib, self._stop = device, 0.0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self, start: int) -> None:
        peak = start
        while not self._stop.wait(0.005):
            peak = max(peak, self._rss())
        self.peak_mib = peak / 2**20

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()


class CacheBytes:
    """The most memory the kept deep features took at once (MiB): measured when a group of jobs
    finishes (feature_cache.release), when every job of it holds its features."""

    def __enter__(self):
        self.peak_mib, self._release = 0.0, feature_cache.release

        def release(states):
            held = sum(st.deep.numel() * st.deep.element_size() for st in states if st.deep is not None)
            self.peak_mib = max(self.peak_mib, held / 2**20)
            self._release(states)

        feature_cache.release = release
        return self

    def __exit__(self, *exc):
        feature_cache.release = self._release


class UnetClock:
    """Seconds spent inside full UNet calls (forward hooks on the UNet) while the block runs."""

    def __init__(self, unet, device: torch.device):
        self.unet, self.device, self.seconds = unet, device, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _pre(self, module, args):
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self._sync()
        self.seconds += time.perf_counter() - self._start

    def __enter__(self):
        self._handles = [self.unet.register_forward_pre_hook(self._pre), self.unet.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def timed_runs(pipe, jobs: list[Job], config: TranslateConfig, repeats: int, **kwargs) -> dict[int, dict]:
    """{N: {'seconds' (best), 'img_per_s', 'peak_mib', 'cache_mib', 'outside_unet', 'results'}} for every cache
    interval; ``outside_unet``: the share of the run's time not in full UNet calls (at N = 1 the part
    the cache cannot shorten: VAE, text encoder, scheduler, shallow steps at N > 1)."""
    translate(pipe, jobs[:2], config, show_progress=False, **kwargs)   # warm-up
    runs: dict[int, dict] = {}
    for _ in range(repeats):
        for n in INTERVALS:
            cfg = dataclasses.replace(config, cache_interval=n)
            with PeakMemory(pipe.device) as memory, CacheBytes() as cache, UnetClock(pipe.unet, pipe.device) as clock:
                start = time.perf_counter()
                results = translate(pipe, jobs, cfg, show_progress=False, **kwargs)
                if pipe.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            row = runs.setdefault(n, {"seconds": float("inf"), "peak_mib": 0.0})
            if seconds < row["seconds"]:
                row.update(seconds=seconds, outside_unet=1 - clock.seconds / seconds)
            row["peak_mib"] = max(row["peak_mib"], memory.peak_mib)
            row["cache_mib"] = cache.peak_mib
            row["results"] = results
    for row in runs.values():
        row["img_per_s"] = len(jobs) / row["seconds"]
    return runs


def unet_costs(pipe, resolution: int, rows: int = 2) -> dict:
    """FLOPs and best wall time of one full UNet call and one shallow step (``rows`` batch rows:
    one job with guidance), and the shallow step's share of each."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, f = pipe.unet, pipe.vae_scale_factor
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, unet.config.in_channels, resolution // f, resolution // f, generator=gen).to(pipe.device, unet.dtype)
    text = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=gen).to(pipe.device, unet.dtype)
    t = torch.tensor(500, device=pipe.device)
    out = {}
    with torch.inference_mode():
        _, deep = feature_cache.full_with_features(unet, x, t, text)
        calls = {"full": lambda: unet(x, t, encoder_hidden_states=text, return_dict=False),
                 "shallow": lambda: feature_cache.shallow(unet, x, t, text, deep)}
        for name, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            out[f"{name}_gflop"] = counter.get_total_flops() / 1e9
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                call()
                if pipe.device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            out[f"{name}_ms"] = best * 1e3
    out["flop_share"] = out["shallow_gflop"] / out["full_gflop"]
    out["time_share"] = out["shallow_ms"] / out["full_ms"]
    return out


def quality(runs: dict, bundle) -> None:
    """Adds to each run: target-hit and source-keep over the subset and per strength (as `demo
    evaluate`), and the mean absolute pixel difference to the uncached image."""
    from diffmix_core.reference import bundle_reference_path
    from diffmix_core.demo.world import strength_table
    from diffmix_core.reference import load_reference
    from diffmix_core.scoring import score_images

    reference = load_reference(bundle_reference_path(bundle), device="cpu")
    plain = runs[1]["results"]
    for row in runs.values():
        records = [dict(r.record) for r in row["results"]]
        scores, _ = score_images([r.image for r in row["results"]], records, reference=reference)
        for rec, s in zip(records, scores):
            rec["scores"] = s
        row["target_hit"] = float(np.mean([r["scores"]["top1"] == r["target_class"] for r in records]))
        row["source_keep"] = float(np.mean([r["scores"]["top1"] == r["source_class"] for r in records]))
        row["by_strength"] = [{k: r[k] for k in ("strength", "n", "target_hit", "source_keep")}
                              for r in strength_table(records)]
        row["hits"] = [r["scores"]["top1"] == r["target_class"] for r in records]
        row["pixel_diff"] = float(np.mean([np.abs(np.asarray(a.image, np.float64) - np.asarray(b.image, np.float64)).mean()
                                           for a, b in zip(plain, row["results"])]))
    for row in runs.values():   # paired: jobs whose target-hit the cache changed
        row["hit_lost"] = sum(a and not b for a, b in zip(runs[1]["hits"], row["hits"]))
        row["hit_gained"] = sum(b and not a for a, b in zip(runs[1]["hits"], row["hits"]))


def demo_part(args) -> dict:
    from diffmix_core.bundle import load_bundle
    from diffmix_core.config import PipelineConfig
    from diffmix_core.paths import DEMO_ASSETS
    from diffmix_core.demo.world import SHIPPED_BIRDS, sources_of
    from diffmix_core.apply import load_pipeline_for

    bundle = load_bundle(DEMO_ASSETS / "bundle")
    pipe = load_pipeline_for(PipelineConfig(device=args.device, dtype="fp32"), bundle)
    sources = sources_of(DEMO_ASSETS / SHIPPED_BIRDS, "test", args.per_class)
    classes = list(bundle.classes)
    jobs = [Job(src, classes[(classes.index(src.source_class) + 1 + j) % len(classes)], s, 0)
            for src in sources for j in range(args.targets) for s in args.strengths]
    config = TranslateConfig(strategy="diff-mix", num_inference_steps=25, guidance_scale=2.5,
                             resolution=bundle.resolution, batch_size=args.batch_size)
    runs = timed_runs(pipe, jobs, config, args.repeats, bundle=bundle)
    quality(runs, bundle)
    costs = unet_costs(pipe, bundle.resolution)
    return {"what": f"demo world, {len(jobs)} jobs ({len(sources)} test images x {args.targets} target(s) x "
                    f"strengths {list(args.strengths)}), {bundle.resolution} px, 25 steps, guidance 2.5",
            "runs": runs, "costs": costs}


def sd15_part(args) -> dict:
    from diffmix_core.models import build_random_pipeline, set_scheduler

    pipe = build_random_pipeline("sd15", seed=0, dtype="fp32", device=args.device)
    set_scheduler(pipe, "dpm++")
    pipe = pipe.to(args.device)
    image = sweep.source_image(128)
    jobs = [Job(Source(image, "duck", "bench"), "owl", s, seed) for s in args.sd15_strengths for seed in (0, 1)]
    config = TranslateConfig(strategy="real-mix", num_inference_steps=args.sd15_steps, guidance_scale=7.5,
                             resolution=128, batch_size=len(jobs))
    runs = timed_runs(pipe, jobs, config, args.sd15_repeats, superclass="bird")
    plain = runs[1]["results"]
    for row in runs.values():
        row["pixel_diff"] = float(np.mean([np.abs(np.asarray(a.image, np.float64) - np.asarray(b.image, np.float64)).mean()
                                           for a, b in zip(plain, row["results"])]))
    costs = unet_costs(pipe, 128)
    return {"what": f"RANDOM-weight SD 1.5 architecture, {len(jobs)} jobs (strengths {list(args.sd15_strengths)} "
                    f"x 2 seeds), 128 px, {args.sd15_steps} steps, guidance 7.5",
            "runs": runs, "costs": costs}


def bound(outside: float, shallow_share: float, n: int) -> float:
    """End-to-end speedup when a share ``outside`` of the time is not UNet and the UNet part
    shrinks to (1 + (n - 1) * shallow_share) / n of itself (Amdahl's law)."""
    return 1 / (outside + (1 - outside) * (1 + (n - 1) * shallow_share) / n)


def report(name: str, part: dict) -> None:
    runs, costs = part["runs"], part["costs"]
    print(f"\n[{name}] {part['what']}")
    print(f"  shallow step / full UNet: {costs['shallow_gflop']:.3f} / {costs['full_gflop']:.3f} GFLOP "
          f"({100 * costs['flop_share']:.1f} %), {costs['shallow_ms']:.2f} / {costs['full_ms']:.2f} ms "
          f"({100 * costs['time_share']:.1f} %); outside the UNet: {100 * runs[1]['outside_unet']:.1f} % of the N=1 run")
    print(f"  the most N can give with these shares (every UNet call of a job's steps but the first of each N "
          f"shallow): " + ", ".join(f"N={n}: {bound(runs[1]['outside_unet'], costs['time_share'], n):.2f}x"
                                    for n in INTERVALS[1:]))
    head = f"  {'N':>3}{'img/s':>9}{'speedup':>9}{'peak MiB':>10}{'cache MiB':>11}{'pixel diff':>12}"
    demo = "target_hit" in runs[1]
    print(head + (f"{'target-hit':>12}{'lost/gained':>13}{'source-keep':>13}" if demo else ""))
    for n, row in runs.items():
        line = (f"  {n:>3}{row['img_per_s']:>9.3f}{row['img_per_s'] / runs[1]['img_per_s']:>9.2f}"
                f"{row['peak_mib']:>10.0f}{row['cache_mib']:>11.2f}{row['pixel_diff']:>12.2f}")
        if demo:
            line += f"{row['target_hit']:>12.3f}{row['hit_lost']:>6}/{row['hit_gained']:<6}{row['source_keep']:>13.3f}"
        print(line)
    for n, row in runs.items() if demo else ():
        print(f"  N={n} by strength: " + ", ".join(f"s={r['strength']:g} hit {r['target_hit']:.3f} keep "
                                                  f"{r['source_keep']:.3f}" for r in row["by_strength"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller subset, one timing repeat")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("--per-class", type=int, default=None, help="demo test images per class (default 2; 1 quick)")
    parser.add_argument("--targets", type=int, default=1, help="demo targets per source image (the next classes)")
    parser.add_argument("--strengths", type=float, nargs="+", default=(0.5, 0.9), help="demo strengths")
    parser.add_argument("--batch-size", type=int, default=8, help="demo jobs per UNet call")
    parser.add_argument("--repeats", type=int, default=None, help="demo timing repeats (default 2; 1 quick)")
    parser.add_argument("--sd15-steps", type=int, default=None, help="SD 1.5 sampler steps (default 10; 4 quick: "
                        "one full UNet call takes seconds on a CPU)")
    parser.add_argument("--sd15-strengths", type=float, nargs="+", default=(0.5, 0.9))
    parser.add_argument("--sd15-repeats", type=int, default=1)
    parser.add_argument("--skip-sd15", action="store_true", help="the demo world only")
    args = parser.parse_args(argv)
    args.per_class = args.per_class or (1 if args.quick else 2)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.sd15_steps = args.sd15_steps or (4 if args.quick else 10)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, load average "
          f"{os.getloadavg()[0]:.1f} on {args.device}")
    parts = {"demo": demo_part(args)}
    report("demo", parts["demo"])
    if not args.skip_sd15:
        parts["sd15"] = sd15_part(args)
        report("sd15", parts["sd15"])
    if args.out:
        from diffmix_core.records import write_text_atomic

        clean = {k: {**p, "runs": {n: {key: v for key, v in r.items() if key not in ("results", "hits")}
                                   for n, r in p["runs"].items()}}
                 for k, p in parts.items()}
        write_text_atomic(args.out, json.dumps(clean, indent=1) + "\n")
    runs = parts["demo"]["runs"]
    print(f"fastpath: speedup={runs[3]['img_per_s'] / runs[1]['img_per_s']:.2f} "
          f"hit_loss={runs[1]['target_hit'] - runs[3]['target_hit']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
