"""The app's Calibrate mode, as a :class:`CalibrationRequest`: checked before the model lane
(:func:`plan_calibration`: every setting read, the sources drawn, the job count bounded by
``Limits.max_calibration_jobs``), run as ONE calibrate.calibrate call on the process's engine
(:func:`run_calibration`), its files written into the session's folder, and read back for
"save as the dataset's profile" (:func:`last_calibration`).

Sources come from the bundle's example images, or from the dataset folder the app was started
with (``DIFFMIX_DATA``): a visitor chooses between the two, never types a server path.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..bundle import Bundle
from ..calibrate import CALIBRATION_FILE, Calibration, calibrate, draw_sources, plan_jobs, write_calibration
from ..config import CALIBRATE_MAX_JOBS_ENV, CalibrateConfig, TranslateConfig, get_strategy
from ..jobs import parse_seeds, parse_strengths
from ..translate import Job, strategy_unavailable
from .cache import clip_scorer, reference_for
from .store import Limits, Store
from .views import md_text

DATA_ENV = "DIFFMIX_DATA"          # a dataset folder (or CSV) the app may draw calibration sources from
EXAMPLES, DATASET = "bundle examples", "dataset"   # where the sources come from
MAX_TEXT = 200                     # characters in a strengths or seeds box
SPLITS = ("train", "val", "test")
INTER = tuple(name for name in ("diff-mix", "ti-mix", "real-mix") if get_strategy(name).pairing == "inter")


def app_dataset() -> str | None:
    """The dataset folder the app was started with (``DIFFMIX_DATA``), None when unset."""
    return os.environ.get(DATA_ENV, "").strip() or None


@dataclass(frozen=True)
class CalibrationRequest:
    """One calibration as the user asked for it: the Calibrate tab, or a script's /calibrate call."""

    origin: str = EXAMPLES                  # EXAMPLES, or DATASET (DIFFMIX_DATA's split)
    per_class: int = CalibrateConfig.per_class   # K: sources per class
    targets: int = CalibrateConfig.targets       # M: target classes per source; 0 = all other classes
    strengths: str = "0.3, 0.5, 0.7, 0.9"   # a list (0.3, 0.5) or from:to:count (0.1:0.9:5)
    seeds: str = "0"                        # a list (0, 1), a count (n=2), or -1 for a random seed
    steps: int = TranslateConfig.num_inference_steps   # sampler steps N
    guidance: float = TranslateConfig.guidance_scale   # classifier-free guidance
    strategy: str = "diff-mix"              # an inter-class strategy (INTER)
    split: str = CalibrateConfig.split      # with DATASET: the split the sources are drawn from


@dataclass(frozen=True)
class CalibrationPlan:
    config: CalibrateConfig
    translate: TranslateConfig
    data: str | None          # the dataset folder, None for the bundle's examples
    jobs: list[Job]           # what calibrate() will run (counted and checked)


def _text(value: object, name: str) -> str:
    """A text box's value, bounded in length before it is parsed."""
    text = "" if value is None else str(value)
    if len(text) > MAX_TEXT:
        raise ValueError(f"the {name} text is {len(text):,} characters; the limit is {MAX_TEXT}")
    return text


def _whole(value: object, name: str, low: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or number < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(number)


def read_request(request: CalibrationRequest, limits: Limits) -> tuple[CalibrateConfig, TranslateConfig, str | None]:
    """The request's settings, each read and checked (no image is read): (calibration settings,
    sampler settings, dataset folder or None)."""
    if request.origin not in (EXAMPLES, DATASET):
        raise ValueError(f"sources must come from {EXAMPLES!r} or {DATASET!r}, got {str(request.origin)[:40]!r}")
    data = app_dataset() if request.origin == DATASET else None
    if request.origin == DATASET and data is None:
        raise ValueError(f"this app was started without a dataset folder: start it with {DATA_ENV}=DIR "
                         f"to calibrate on a dataset, or use {EXAMPLES!r}")
    if request.strategy not in INTER:
        raise ValueError(f"calibration sends sources to other classes: choose one of {', '.join(INTER)}, "
                         f"got {str(request.strategy)[:40]!r}")
    if request.split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {str(request.split)[:20]!r}")
    cap = limits.max_calibration_jobs
    per_class = _whole(request.per_class, "sources per class", 1)
    if per_class > cap:
        raise ValueError(f"{per_class:,} sources per class exceed the limit of {cap:,} images per calibration "
                         f"(set {CALIBRATE_MAX_JOBS_ENV} to raise it)")
    strengths = parse_strengths(_text(request.strengths, "strengths"), cap, CALIBRATE_MAX_JOBS_ENV)
    seeds = parse_seeds(_text(request.seeds, "seeds"), cap, CALIBRATE_MAX_JOBS_ENV)
    config = CalibrateConfig(per_class=per_class, targets=_whole(request.targets, "targets per source", 0),
                             strengths=tuple(strengths), seeds=tuple(seeds), split=request.split)
    translate = TranslateConfig(strategy=request.strategy, num_inference_steps=_whole(request.steps, "steps", 1),
                                guidance_scale=float(request.guidance))
    return config, translate, data


def plan_calibration(bundle: Bundle, request: CalibrationRequest, limits: Limits = Limits()) -> CalibrationPlan:
    """Everything a calibration needs, checked without any model: the settings, the sources drawn
    (the same draw calibrate() makes), the job count under ``limits.max_calibration_jobs``."""
    config, translate, data = read_request(request, limits)
    reason = strategy_unavailable(translate.strategy, bundle)
    if reason:   # refused here, before the model lane (the engine's own check says the same)
        raise ValueError(reason)
    sources = draw_sources(bundle, data, config)
    jobs = plan_jobs(bundle, sources, config, translate, limits.max_calibration_jobs)
    return CalibrationPlan(config, translate, data, jobs)


class ProgressClock:
    """calibrate's ``progress(stage, done, total)`` as (fraction, line) for a progress bar: the
    engine's job-steps with an ETA from the rate since the first report ("estimating…" until
    a rate exists), then the scoring of the images."""

    def __init__(self, n_images: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.n_images, self.clock, self.first = n_images, clock, None

    def __call__(self, stage: str, done: int, total: int) -> tuple[float, str]:
        fraction = done / total if total else 0.0
        if stage != "translate":
            return fraction, f"{self.n_images} image(s): scoring {done}/{total}"
        now = self.clock()
        if self.first is None or done <= self.first[1]:
            self.first = self.first or (now, done)
            eta = "estimating…"
        else:
            rate = (done - self.first[1]) / max(now - self.first[0], 1e-9)
            eta = f"about {(total - done) / rate:.0f} s left"
        return fraction, f"{self.n_images} image(s): step {done}/{total}, {eta}"


def run_calibration(store: Store, bundle: Bundle, request: CalibrationRequest, *, generate: Callable,
                    limits: Limits = Limits(), progress: Callable[[str, int, int], None] | None = None,
                    ) -> tuple[Calibration, list[Path]]:
    """One calibration (calibrate.calibrate: one batched engine run on ``generate``, scored with the
    process's reference classifier and CLIP), its files
    written into a new folder of the session (``calibrations/<n>``) and remembered as the
    session's last; returns the calibration and its files."""
    config, translate, data = read_request(request, limits)
    cal = calibrate(bundle, None, config, data=data, translate_config=translate, reference=reference_for(bundle)[0],
                    clip=clip_scorer(bundle), generate=generate, limit=limits.max_calibration_jobs,
                    progress=progress, show_progress=False)
    with store.lock:
        state = store.state()
        n = state.get("calibrations", 0) + 1
        folder = store.root / "calibrations" / str(n)
        files = write_calibration(cal, folder)   # the files `diffmix calibrate` writes
        state.update(calibrations=n, last_calibration=str(folder.relative_to(store.root)))
        store.save_state(state)
    return cal, files


def last_calibration(store: Store, bundle: Bundle) -> Calibration:
    """The session's last calibration, read back from its calibration.json; ValueError when there
    is none or it was of another bundle (or of this bundle's files before they changed)."""
    where = store.state().get("last_calibration")
    file = store.root / where / CALIBRATION_FILE if where else None
    if file is None or not file.is_file():
        raise ValueError("no calibration in this session yet: run one first")
    data = json.loads(file.read_text(encoding="utf-8"))
    if data["settings"].get("bundle_hash") != bundle.hash:
        raise ValueError(f"the last calibration was of another bundle ({Path(data['settings']['bundle']).name}); "
                         "run one for this bundle first")
    return Calibration(data["settings"], data["curves"], data["by_target"], data["recommendation"], data["clip"])


def calibration_markdown(cal: Calibration) -> str:
    """The recommendation box: the strength and its interval first, then calibrate's paragraph
    (class names from the bundle made inert)."""
    r = cal.recommendation
    if r["strength"] is None:
        head = "**no recommended strength**"
    else:
        span = (f"{r['confidence']:.0%} interval {r['low']:g}–{r['high']:g}" if r["low"] is not None
                else "no interval: one source")
        head = f"**recommended strength for the dataset: {r['strength']:g}** ({span})"
    return f"{head}\n\n{md_text(cal.text())}"
