"""benchmarks/gpu.py --smoke: the prepared GPU run's code, on the CPU at a tiny size."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow   # the whole benchmark script in subprocesses (up to 900 s each)


def run_gpu(tmp_path: Path, *extra: str) -> tuple[str, dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_gpu_benchmark_smoke_runs_every_part(tmp_path):
    stdout, result = run_gpu(tmp_path, "--batch-sizes", "2", "4")
    last = stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"gpu: sweep_speedup=([\d.]+) synth_img_per_gpu_hour=(\d+) peak_gib=n/a", last)
    assert m, last
    assert float(m.group(1)) == result["sweep"]["speedup"] > 0
    assert 0 < result["sweep"]["efficiency"] and result["sweep"]["unet_rows"] == 2 * 4 * (1 + 2 + 2 + 3)
    names = [r["name"] for r in result["synthesis"]]
    assert names == ["batch 2", "batch 4", "cache N=2", "cache N=3", "cache N=5", "SDPA off", "channels_last",
                     "torch.compile", "compile + channels_last"]
    for row in result["synthesis"]:
        assert "error" not in row and row["images"] == row["batch"], row
        assert abs(row["img_per_gpu_hour"] - 3600 * row["images"] / row["seconds"]) <= 0.01 * row["img_per_gpu_hour"]
    assert int(m.group(2)) == max(r["img_per_gpu_hour"] for r in result["synthesis"] if "cache_interval" not in r)
    assert re.fullmatch(r"cache: N=2 x[\d.]+, N=3 x[\d.]+, N=5 x[\d.]+", stdout.strip().splitlines()[-2])
    assert "img/GPU-h" in stdout   # the table


def test_gpu_benchmark_time_guard_still_prints_the_summary(tmp_path):
    stdout, result = run_gpu(tmp_path, "--batch-sizes", "2", "--max-seconds", "1")
    assert result["sweep"] == {"skipped": "time guard"}
    assert all("time guard" in r["skipped"] for r in result["synthesis"])
    assert "SDPA off" in stdout   # the table still lists every setting
    assert stdout.strip().splitlines()[-1] == "gpu: sweep_speedup=n/a synth_img_per_gpu_hour=n/a peak_gib=n/a"
