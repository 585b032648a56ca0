"""One prepared GPU run (at most 8 minutes): the random-weight SD 1.5 architecture, 512 px, fp16.

(a) sweep: 4 strengths x 4 seeds through the engine vs one diffusers img2img call per strength
    (benchmarks/sweep.py's two paths), and the engine's efficiency (UNet rows x best per-row time
    / engine time);
(b) bulk synthesis throughput, images per GPU-hour, at s = 0.7, 25 DPM-Solver++ steps, guidance 7.5
    (17 steps run), one source image per job, through the engine (diffmix synthesize's batches;
    PNG writing runs on other threads there and is not timed here): several batch sizes with the
    defaults (SDPA on, channels_last off, no compile), then at the best batch size the feature
    cache (--cache-interval N = 2, 3, 5: benchmarks/fastpath.py's rows; images differ a little,
    so these rows never count as "best"), then each of SDPA off, channels_last on, torch.compile
    on, and compile + channels_last;
(c) peak GPU memory (torch.cuda.max_memory_allocated) of every setting.

A time guard stops before --max-seconds (default 450 s, leaving room for start-up inside 8 min)
and still prints the summary; a setting that fails (e.g. compile) is recorded, not fatal.
Writes one JSON (--out), prints a table, and the last line is

    gpu: sweep_speedup=X synth_img_per_gpu_hour=Y peak_gib=Z

The moment a CUDA machine is there (weights are random: nothing to download):

    python benchmarks/gpu.py --out gpu.json

`--smoke` runs the same code on the CPU with the tiny offline pipeline (32 px, 4 steps);
the test suite runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import sweep  # noqa: E402  (benchmarks/sweep.py: the same sweep, both paths)
from diffmix_core.config import TranslateConfig  # noqa: E402
from diffmix_core.models import build_random_pipeline, load_pipeline, set_scheduler, tiny_pipeline_dir  # noqa: E402
from diffmix_core.translate import Job, Source, translate  # noqa: E402

STRENGTH, GUIDANCE = 0.7, 7.5   # the paper's sampler (docs/method.md §2), with --steps 25


class TimeGuard(Exception):
    """Raised by the alarm when a setting runs past the time left."""


def _alarm(signum, frame):
    raise TimeGuard("time guard")


class Clock:
    def __init__(self, max_seconds: float):
        self.start = time.perf_counter()
        self.max_seconds = max_seconds

    def left(self) -> float:
        return self.max_seconds - (time.perf_counter() - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def source_images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
            for _ in range(n)]


# --------------------------------------------------------------------------- settings
def set_attention(pipe, sdpa: bool) -> None:
    """PyTorch SDPA (diffusers' default) or the classic attention (softmax(QK^T)V in full)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for module in (pipe.unet, pipe.vae):
        module.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


def set_channels_last(pipe, on: bool) -> None:
    fmt = torch.channels_last if on else torch.contiguous_format
    pipe.unet.to(memory_format=fmt)
    pipe.vae.to(memory_format=fmt)


def set_compile(pipe, on: bool, backend: str) -> None:
    """torch.compile the UNet in place (nn.Module.compile); off drops the compiled call."""
    if on:
        pipe.unet.compile(backend=backend, dynamic=False)
    else:
        pipe.unet._compiled_call_impl = None


def synthesis_rate(pipe, images: list[Image.Image], batch: int, reps: int, steps: int,
                   cache_interval: int = 1) -> dict:
    """Images per second of the engine at ``batch`` jobs per call (after one warm-up call)."""
    config = TranslateConfig(strategy="real-mix", num_inference_steps=steps, guidance_scale=GUIDANCE,
                             batch_size=batch, cache_interval=cache_interval)

    def jobs(offset: int) -> list[Job]:
        return [Job(Source(images[(offset + i) % len(images)], "duck", f"s{offset + i}"), "owl", STRENGTH, offset + i)
                for i in range(batch)]

    translate(pipe, jobs(0), config, superclass="bird", show_progress=False)   # warm-up (and compile)
    reset_peak(pipe.device)
    start = time.perf_counter()
    for r in range(reps):
        translate(pipe, jobs((r + 1) * batch), config, superclass="bird", show_progress=False)
    sync(pipe.device)
    seconds = time.perf_counter() - start
    return {"images": batch * reps, "seconds": round(seconds, 3), "img_per_s": round(batch * reps / seconds, 3),
            "img_per_gpu_hour": round(3600 * batch * reps / seconds), "peak_gib": peak_gib(pipe.device)}


def run_setting(pipe, images, setting: dict, reps: int, steps: int, clock: Clock, reserve: float,
                backend: str) -> dict:
    """One row of (b): apply the setting, measure, restore the defaults; errors and the time guard
    are recorded in the row."""
    row = dict(setting)
    budget = clock.left() - reserve
    if budget < setting.get("min_seconds", 5):
        row["skipped"] = f"time guard ({max(0, budget):.0f} s left)"
        return row
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        set_attention(pipe, setting["sdpa"])
        set_channels_last(pipe, setting["channels_last"])
        set_compile(pipe, setting["compile"], backend)
        row.update(synthesis_rate(pipe, images, setting["batch"], reps, steps, setting.get("cache_interval", 1)))
    except TimeGuard:
        row["skipped"] = "time guard (stopped mid-setting)"
    except Exception as err:  # a failing setting (compile without a compiler, OOM at batch 1) is a result
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        traceback.print_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            set_compile(pipe, False, backend)
            set_channels_last(pipe, False)
            set_attention(pipe, True)
        except Exception:   # restoring must not hide the row
            traceback.print_exc()
    return row


# --------------------------------------------------------------------------- parts
def load_model(args) -> tuple[object, str]:
    if args.smoke:
        pipe = load_pipeline(tiny_pipeline_dir(), device=args.device or "cpu", dtype=args.dtype or "fp32")
        return pipe, "tiny offline pipeline (random weights, 32 px)"
    device = args.device or "cuda"
    pipe = build_random_pipeline("sd15", seed=0, dtype=args.dtype or "fp16", device=device)
    set_scheduler(pipe, "dpm++")
    pipe = pipe.to(device)
    pipe.diffmix_random = {"arch": "sd15", "random_weights": True}
    return pipe, "RANDOM-weight Stable Diffusion 1.5 architecture (diffmix_core/archs/sd15.json)"


def part_sweep(pipe, resolution: int, repeats: int, steps: int) -> dict:
    config = TranslateConfig(strategy="real-mix", num_inference_steps=steps, guidance_scale=GUIDANCE, batch_size=16)
    image = sweep.source_image(resolution)
    prompt = translate(pipe, [Job(Source(image, "duck", "w"), "owl", 0.0, 0)], config, superclass="bird",
                       show_progress=False)[0].record["prompt"]
    sweep.run_engine(pipe, image, config)   # warm-up both paths
    sweep.run_loop(pipe, image, config, prompt)
    reset_peak(pipe.device)
    engine = min(sweep.run_engine(pipe, image, config) for _ in range(repeats))
    engine_peak = peak_gib(pipe.device)
    reset_peak(pipe.device)
    loop = min(sweep.run_loop(pipe, image, config, prompt) for _ in range(repeats))
    loop_peak = peak_gib(pipe.device)
    rows = sweep.sweep_unet_rows(steps, GUIDANCE)
    row_time, per_row = sweep.best_row_time(pipe, resolution, repeats=repeats)
    return {"engine_s": round(engine, 3), "loop_s": round(loop, 3), "speedup": round(loop / engine, 3),
            "unet_rows": rows, "best_row_ms": round(row_time * 1e3, 3),
            "row_ms_by_batch": {b: round(t * 1e3, 3) for b, t in per_row.items()},
            "efficiency": round(rows * row_time / engine, 3), "engine_peak_gib": engine_peak,
            "loop_peak_gib": loop_peak}


def settings(batch_sizes: list[int]) -> list[dict]:
    """The batch-size rows; the toggles are filled in at the best batch once it is known."""
    return [{"name": f"batch {b}", "batch": b, "sdpa": True, "channels_last": False, "compile": False}
            for b in batch_sizes]


def cache_rows(batch: int) -> list[dict]:
    """The feature cache at the best batch size (benchmarks/fastpath.py measures its quality cost)."""
    return [{"name": f"cache N={n}", "batch": batch, "sdpa": True, "channels_last": False, "compile": False,
             "cache_interval": n} for n in (2, 3, 5)]


def cache_summary(rows: list[dict]) -> str:
    """'cache: N=2 x1.71, ...': each cache row's images/s over the best uncached row's."""
    plain = [r for r in rows if "img_per_s" in r and r.get("cache_interval", 1) == 1]
    cached = [r for r in rows if "img_per_s" in r and r.get("cache_interval", 1) > 1]
    if not plain or not cached:
        return "cache: n/a"
    base = max(plain, key=lambda r: r["img_per_s"])
    return "cache: " + ", ".join(f"N={r['cache_interval']} x{r['img_per_s'] / base['img_per_s']:.2f}" for r in cached)


def toggles(batch: int) -> list[dict]:
    return [
        {"name": "SDPA off", "batch": batch, "sdpa": False, "channels_last": False, "compile": False},
        {"name": "channels_last", "batch": batch, "sdpa": True, "channels_last": True, "compile": False},
        {"name": "torch.compile", "batch": batch, "sdpa": True, "channels_last": False, "compile": True,
         "min_seconds": 60},
        {"name": "compile + channels_last", "batch": batch, "sdpa": True, "channels_last": True, "compile": True,
         "min_seconds": 60},
    ]


def print_table(rows: list[dict]) -> None:
    print(f"{'setting':<26}{'batch':>6}{'img/s':>9}{'img/GPU-h':>11}{'peak GiB':>10}  note")
    for r in rows:
        note = r.get("error") or r.get("skipped") or ""
        rate = f"{r['img_per_s']:.2f}" if "img_per_s" in r else "-"
        hour = f"{r['img_per_gpu_hour']:,}" if "img_per_gpu_hour" in r else "-"
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        print(f"{r['name']:<26}{r['batch']:>6}{rate:>9}{hour:>11}{peak:>10}  {note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny offline pipeline, 32 px (for tests)")
    parser.add_argument("--out", type=Path, default=Path("gpu-benchmark.json"), help="the JSON written")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--dtype", default=None, help="default: fp16 (fp32 with --smoke)")
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 (32 with --smoke)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="jobs per engine call "
                        "(default: 8 16 32 64; 2 4 with --smoke)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps N (default 25, the paper's; 4 smoke)")
    parser.add_argument("--reps", type=int, default=None, help="timed engine calls per setting (default 2; 1 smoke)")
    parser.add_argument("--repeats", type=int, default=None, help="sweep timing repeats (default 2; 1 smoke)")
    parser.add_argument("--max-seconds", type=float, default=450.0, help="time guard for the whole run")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                        "eager with --smoke: no C++ compile on a shared CPU)")
    args = parser.parse_args(argv)
    clock = Clock(args.max_seconds)
    resolution = args.resolution or (32 if args.smoke else 512)
    batch_sizes = args.batch_sizes or ([2, 4] if args.smoke else [8, 16, 32, 64])
    reps = args.reps or (1 if args.smoke else 2)
    steps = args.steps or (4 if args.smoke else 25)
    repeats = args.repeats or (1 if args.smoke else 2)
    backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    if not args.smoke and not torch.cuda.is_available() and (args.device or "cuda").startswith("cuda"):
        print("no CUDA device; use --smoke for the CPU check, or --device cpu", file=sys.stderr)
        return 2

    result: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "smoke": args.smoke,
                    "resolution": resolution, "steps": steps, "strength": STRENGTH, "guidance": GUIDANCE,
                    "torch": torch.__version__, "python": platform.python_version(), "compile_backend": backend}
    pipe, what = load_model(args)
    device = pipe.device
    result.update(model=what, device=str(device), dtype=str(pipe.unet.dtype).removeprefix("torch."),
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                  load_s=round(clock.max_seconds - clock.left(), 1))
    print(f"model: {what} on {result['device_name'] or device}, {result['dtype']}, {resolution} px; "
          f"loaded in {result['load_s']} s")

    # (a) the sweep
    try:
        result["sweep"] = part_sweep(pipe, resolution, repeats, steps) \
            if clock.left() > (5 if args.smoke else 60) else {"skipped": "time guard"}
    except Exception as err:
        traceback.print_exc()
        result["sweep"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    sw = result["sweep"]
    if "speedup" in sw:
        print(f"(a) sweep 4x4: engine {sw['engine_s']} s vs per-strength img2img {sw['loop_s']} s, speedup "
              f"{sw['speedup']}; efficiency {sw['efficiency']} ({sw['unet_rows']} rows x {sw['best_row_ms']} ms)")

    # (b) + (c) synthesis settings
    images = source_images(max(batch_sizes) * (reps + 1), resolution)
    rows = []
    reserve = 5.0 if args.smoke else 20.0
    for setting in settings(batch_sizes):
        rows.append(run_setting(pipe, images, setting, reps, steps, clock, reserve, backend))
    measured = [r for r in rows if "img_per_s" in r]
    best_batch = max(measured, key=lambda r: r["img_per_s"])["batch"] if measured else batch_sizes[0]
    for setting in cache_rows(best_batch) + toggles(best_batch):
        rows.append(run_setting(pipe, images, setting, reps, steps, clock, reserve, backend))
    result["synthesis"] = rows
    result["seconds"] = round(clock.max_seconds - clock.left(), 1)
    print_table(rows)

    measured = [r for r in rows if "img_per_s" in r and r.get("cache_interval", 1) == 1]
    best = max(measured, key=lambda r: r["img_per_s"]) if measured else None
    result["best"] = best
    result["cache"] = cache_summary(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out} ({result['seconds']} s)")
    print(result["cache"])
    speed = sw.get("speedup", "n/a")
    print(f"gpu: sweep_speedup={speed} synth_img_per_gpu_hour={best['img_per_gpu_hour'] if best else 'n/a'} "
          f"peak_gib={best['peak_gib'] if best and best['peak_gib'] is not None else 'n/a'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
