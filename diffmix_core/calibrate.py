"""Calibration: a dataset's strength from many sources and targets, with intervals.

A sweep of one source says how that image behaves; a dataset's strength needs many.
:func:`calibrate` draws K sources per class (:func:`draw_sources`: a dataset folder's split,
else the bundle's example images), sends each to M other classes (the next M in label
order, so every class is a target equally often) at every strength and seed, runs all
jobs as ONE batched engine run (translate.translate), scores every image like a sweep
(scoring.score_images: reference classifier, CLIP, distance, SSIM), and summarises:

- **curves**: per strength, the mean of each metric with a t-interval across sources.
  Sources are the sampling unit: each source's value at a strength is its mean over its
  targets and seeds, and the interval is mean +/- t((1+c)/2, n-1) * sd / sqrt(n) over the
  n sources (c = ``confidence``), clipped to the metric's range; none for n < 2.
- **recommendation**: scoring.recommend_strength, the sweep's rule, on the per-strength
  means of all images (scoring.summarize). Its interval: the same rule on B bootstrap
  resamples of the sources (drawn with replacement); the (1-c)/2 and (1+c)/2 percentiles
  of the B recommended strengths, with each strength's share.
- **per target class**: per strength the hit rate (the reference's top-1 is the target)
  and the mean of the recommendation's faithfulness measure (P(target), else the CLIP
  win share); the lowest strength where that mean reaches the bar; "hard to reach" when
  none does.

Outputs: ``calibration.json``, a plot of the curves and a sample grid (rows = strengths,
columns = a few sources), written atomically (:func:`write_calibration`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import textwrap
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import __version__
from .apply import load_pipeline_for
from .bundle import bundle_examples
from .config import (CALIBRATE_MAX_JOBS, CALIBRATE_MAX_JOBS_ENV, CalibrateConfig, PipelineConfig, ScoreConfig,
                     TranslateConfig, get_strategy)
from .data import load_image, read_dataset, resolve_splits, split_subset
from .grid import render
from .profiles import load_profile, save_profile
from .records import atomic_path, save_png, write_text_atomic
from .reference import bundle_reference_path, load_reference
from .scoring import class_prompt, default_clip, load_clip, recommend_strength, score_images, summarize
from .stats import t_mean
from .translate import Job, Result, Source, count_jobs, translate, validate_jobs

CALIBRATION_FILE = "calibration.json"
PLOT_FILE = "calibration.png"
GRID_FILE = "calibration_grid.png"
MAX_JOBS_ENV, MAX_JOBS = CALIBRATE_MAX_JOBS_ENV, CALIBRATE_MAX_JOBS   # images per calibration: env, default
# metric -> the range its interval is clipped to
CURVES = {"p_target": (0.0, 1.0), "p_source": (0.0, 1.0), "target_hit": (0.0, 1.0), "source_keep": (0.0, 1.0),
          "clip_target": (-1.0, 1.0), "clip_win": (0.0, 1.0), "distance": (0.0, 2.0), "ssim": (-1.0, 1.0)}
RULE_KEYS = ("p_target", "clip_win", "distance", "ssim")   # what scoring.recommend_strength reads
SCORE_CHUNK = 64   # images per scoring call

# progress(stage, done, total): stage "translate" counts job-steps (UNet rows), "score" images
Progress = Callable[[str, int, int], None]
# generate(bundle, jobs, config, callback=...) -> results in job order (the app passes its engine)
Generate = Callable[..., list[Result]]


def max_jobs() -> int:
    """The images one calibration may make: ``DIFFMIX_MAX_CALIBRATION_JOBS``, else :data:`MAX_JOBS`."""
    value = os.environ.get(MAX_JOBS_ENV, "").strip()
    try:
        return int(value) if value else MAX_JOBS
    except ValueError:
        raise ValueError(f"environment variable {MAX_JOBS_ENV}={value!r} must be an integer") from None


# --------------------------------------------------------------------------- 1. sources and jobs
def draw_sources(bundle, data: str | os.PathLike | None = None, config: CalibrateConfig = CalibrateConfig(),
                 split_file: str | os.PathLike | None = None) -> list[Source]:
    """K = ``config.per_class`` sources of each of the bundle's classes, drawn at random
    (``config.draw_seed``) from ``config.split`` of the dataset ``data`` (data.read_dataset: an
    ImageFolder, a CSV, a Hugging Face imagefolder), else from the bundle's example images. A
    class with fewer images gives all it has; images of classes the bundle lacks are skipped."""
    if data is not None:
        dataset = read_dataset(data, show_progress=False)
        items = split_subset(dataset, resolve_splits(dataset, split_file), config.split).items
        pool = [(str(it.path), it.class_name, it.id) for it in items]
        where = f"the {config.split} split of {data}"
    else:
        pool = [(path, cls, f"{cls}/{Path(path).name}") for path, cls in bundle_examples(bundle)]
        where = f"bundle {bundle.path}'s example images (give --data DATASET to draw from a dataset)"
    by_class: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path, cls, item_id in pool:
        if cls in bundle.classes:
            by_class[cls].append((item_id, path))
    if not by_class:
        raise ValueError(f"{where}: no image of the bundle's classes {list(bundle.classes)[:5]}...")
    rng = np.random.default_rng(config.draw_seed)
    sources = []
    for cls in bundle.classes:
        items = sorted(by_class.get(cls, []))   # the reader's order does not change the draw
        picked = sorted(rng.choice(len(items), size=min(config.per_class, len(items)), replace=False)) if items else []
        sources += [Source(load_image(items[i][1]), cls, items[i][0], items[i][1]) for i in picked]
    return sources


def target_classes(classes: Sequence[str], source_class: str, m: int = 0) -> list[str]:
    """The other classes, starting after the source's in label order (so each class is a target
    equally often); the first ``m`` (0: all)."""
    classes = list(classes)
    i = classes.index(source_class)
    others = classes[i + 1:] + classes[:i]
    return others[:m] if m else others


def plan_jobs(bundle, sources: Sequence[Source], config: CalibrateConfig, translate_config: TranslateConfig,
              limit: int | None = None) -> list[Job]:
    """Jobs ordered source, target, strength, seed; refused (ValueError naming every factor)
    above ``limit`` images (default :func:`max_jobs`) before the list is built."""
    if len(bundle.classes) < 2:
        raise ValueError("calibration translates between classes: the bundle needs at least two")
    strategy = get_strategy(translate_config.strategy)
    if strategy.pairing != "inter":
        raise ValueError(f"calibration sends sources to other classes; strategy {strategy.name!r} does not "
                         "(use diff-mix, ti-mix or real-mix)")
    if not sources:
        raise ValueError("no source images to calibrate with")
    unknown = sorted({s.source_class for s in sources} - set(bundle.classes))
    if unknown:
        raise ValueError(f"source class(es) {unknown[:5]} are not classes of the bundle {list(bundle.classes)[:10]}")
    m = min(config.targets or len(bundle.classes) - 1, len(bundle.classes) - 1)
    count_jobs({"sources": len(sources), "targets": m, "strengths": len(config.strengths),
                "seeds": len(config.seeds)}, max_jobs() if limit is None else limit,
               f"--max-jobs or {MAX_JOBS_ENV}")
    jobs = [Job(src, t, s, seed) for src in sources for t in target_classes(bundle.classes, src.source_class, m)
            for s in config.strengths for seed in config.seeds]
    validate_jobs(jobs, translate_config, bundle)
    return jobs


def translate_config_for(bundle) -> TranslateConfig:
    """The sampler settings of the bundle's profile (the user's saved one first), diff-mix
    unless the profile names another inter-class strategy."""
    settings = {k: v for k, v in load_profile(bundle).settings().items() if k != "strength"}
    if get_strategy(settings.get("strategy", "diff-mix")).pairing != "inter":
        settings.pop("strategy")
    return TranslateConfig(**settings)


# --------------------------------------------------------------------------- 2. run and score
def _engine(bundle, jobs: list[Job], config: TranslateConfig, generate: Generate | None,
            progress: Progress | None, show_progress: bool) -> list[Result]:
    callback = (lambda done, total: progress("translate", done, total)) if progress else None
    if generate is not None:
        return generate(bundle, jobs, config, callback=callback)
    pipe = load_pipeline_for(PipelineConfig(), bundle)
    return translate(pipe, jobs, config, bundle=bundle, show_progress=show_progress, callback=callback)


def _score(results: list[Result], bundle, reference, clip, config: ScoreConfig, progress: Progress | None,
           show_progress: bool) -> list:
    """Fill each record's ``scores`` in chunks (jobs are ordered by source, so a source is
    read and embedded about once); returns one embedding per image."""
    embeddings = []
    bar = tqdm(total=len(results), desc="score", unit="img", disable=not show_progress)
    for i in range(0, len(results), SCORE_CHUNK):
        chunk = results[i:i + SCORE_CHUNK]
        scores, embs = score_images([r.image for r in chunk], [r.record for r in chunk], reference=reference,
                                    clip=clip, config=config, prompt=lambda c: class_prompt(c, bundle))
        for r, s in zip(chunk, scores):
            r.record["scores"] = s
        embeddings += embs
        bar.update(len(chunk))
        if progress:
            progress("score", i + len(chunk), len(results))
    bar.close()
    return embeddings


def _scorers(bundle, reference, clip) -> tuple[object | None, object, str]:
    """(reference classifier or None, CLIP scorer, reference status): the bundle's where not given."""
    if reference is None:
        path = bundle_reference_path(bundle)
        if path is not None:
            reference = load_reference(path)
    status = "none (no reference classifier attached)" if reference is None else \
        f"{reference.model_name} ({reference.path})"
    return reference, clip if clip is not None else load_clip(*default_clip(bundle)), status


# --------------------------------------------------------------------------- 3. statistics
def image_value(record: dict, metric: str) -> float | None:
    """One image's value of a curve metric: a score, or target_hit / source_keep (the reference's
    top-1 is the target / the source), clip_win (closer to the target prompt than the source's)."""
    sc = record.get("scores") or {}
    if metric in ("target_hit", "source_keep"):
        cls = record["target_class" if metric == "target_hit" else "source_class"]
        return None if sc.get("top1") is None else float(sc["top1"] == cls)
    if metric == "clip_win":
        t, s = sc.get("clip_target"), sc.get("clip_source")
        return None if t is None or s is None else float(t > s)
    v = sc.get(metric)
    return None if v is None else float(v)


def source_means(records: Sequence[dict], source_index: Sequence[int], strengths: Sequence[float],
                 metric: str) -> np.ndarray:
    """(n_sources, n_strengths): each source's mean over its targets and seeds; NaN where none."""
    n, col = max(source_index) + 1, {float(s): j for j, s in enumerate(strengths)}
    total, count = np.zeros((n, len(strengths))), np.zeros((n, len(strengths)))
    for rec, i in zip(records, source_index):
        v = image_value(rec, metric)
        if v is not None:
            total[i, col[float(rec["strength"])]] += v
            count[i, col[float(rec["strength"])]] += 1
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def t_interval(values: np.ndarray, confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> dict | None:
    """{mean, low, high, n} of the non-NaN ``values``: a Student-t interval of the mean, clipped
    to ``bounds``; low/high None for fewer than 2 values; None for none."""
    t = t_mean(values, confidence)
    if t is None:
        return None
    mean, low, high = t["mean"], None, None
    if t["half"] is not None:
        lo, hi = bounds or (-np.inf, np.inf)
        low, high = max(lo, mean - t["half"]), min(hi, mean + t["half"])
    return {"mean": round(mean, 6), "low": None if low is None else round(low, 6),
            "high": None if high is None else round(high, 6), "n": t["n"]}


def curves(matrices: dict[str, np.ndarray], strengths: Sequence[float], counts: Sequence[int],
           confidence: float) -> list[dict]:
    """One row per strength: images, sources, and {metric: t_interval or None}."""
    n_sources = next(iter(matrices.values())).shape[0]
    return [{"strength": float(s), "n_images": int(counts[j]), "n_sources": n_sources,
             **{m: t_interval(mat[:, j], confidence, CURVES[m]) for m, mat in matrices.items()}}
            for j, s in enumerate(strengths)]


def bootstrap_recommendation(matrices: dict[str, np.ndarray], strengths: Sequence[float], bar: float,
                             resamples: int, confidence: float, seed: int = 0) -> dict:
    """The sweep's rule (scoring.recommend_strength) on ``resamples`` resamples of the sources:
    {low, high, shares: {strength: share}, resamples}; low/high None with fewer than 2 sources."""
    n = next(iter(matrices.values())).shape[0]
    if n < 2 or resamples < 1:
        return {"low": None, "high": None, "shares": {}, "resamples": 0}
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # "Mean of empty slice": a metric no source has
        means = {k: np.nanmean(matrices[k][idx], axis=1) for k in RULE_KEYS}   # (B, n_strengths) each
    picks = []
    for b in range(resamples):
        rows = [{"strength": float(s), **{k: None if np.isnan(means[k][b, j]) else float(means[k][b, j])
                                          for k in RULE_KEYS}} for j, s in enumerate(strengths)]
        picks.append(recommend_strength(rows, bar)[0])
    picks = np.array([p for p in picks if p is not None], dtype=float)
    if picks.size == 0:
        return {"low": None, "high": None, "shares": {}, "resamples": resamples}
    low, high = np.quantile(picks, [(1 - confidence) / 2, (1 + confidence) / 2], method="inverted_cdf")
    shares = {str(float(s)): round(float(np.mean(picks == s)), 4) for s in strengths}
    return {"low": float(low), "high": float(high), "shares": shares, "resamples": resamples}


def faithfulness_key(records: Sequence[dict]) -> str | None:
    """The recommendation's faithfulness measure (scoring.recommend_strength): mean P(target)
    when the reference classifier scored the images, else the CLIP win share."""
    return next((k for k in ("p_target", "clip_win") if any(image_value(r, k) is not None for r in records)), None)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return round(float(np.mean(vals)), 6) if vals else None


def target_table(records: Sequence[dict], classes: Sequence[str], strengths: Sequence[float],
                 bar: float) -> list[dict]:
    """Per target class: per strength the images, the hit rate and the mean faithfulness
    (:func:`faithfulness_key`); the lowest strength whose mean faithfulness reaches
    ``bar`` (``reaches_at``) and ``hard_to_reach`` when none does."""
    f_key = faithfulness_key(records)
    rows = []
    for target in classes:
        recs = [r for r in records if r["target_class"] == target]
        if not recs:
            continue
        per = []
        for s in strengths:
            at = [r for r in recs if float(r["strength"]) == float(s)]
            per.append({"strength": float(s), "n": len(at),
                        "hit": _mean(image_value(r, "target_hit") for r in at),
                        "faithfulness": _mean(image_value(r, f_key) for r in at) if f_key else None})
        reach = next((p["strength"] for p in per if p["faithfulness"] is not None
                      and p["faithfulness"] >= bar), None)
        rows.append({"target": target, "n": len(recs), "faithfulness_measure": f_key, "by_strength": per,
                     "reaches_at": reach, "hard_to_reach": f_key is not None and reach is None})
    return rows


# --------------------------------------------------------------------------- 4. the result
RULE = ("the sweep's rule (scoring.recommend_strength) on the per-strength means: among strengths whose mean "
        "faithfulness (P(target), else the CLIP win share) reaches the bar, the one with the largest mean distance "
        "to the source (else 1 - SSIM); none reaching it: the most faithful strength")
INTERVAL = ("the same rule on bootstrap resamples of the sources; the {lo:g} and {hi:g} percentiles of the "
            "recommended strengths")


@dataclass
class Calibration:
    """What :func:`calibrate` found; :meth:`to_json` is ``calibration.json``."""

    settings: dict            # what ran: bundle, classes, sources, targets per source, strengths, seeds, sampler, date
    curves: list[dict]        # per strength: n_images, n_sources, {metric: {mean, low, high, n} or None}
    by_target: list[dict]     # per target class (target_table)
    recommendation: dict      # strength, reason, rule, low, high, confidence, shares, recommend_min_p_target
    clip: str                 # the CLIP scorer's status (why CLIP-target is absent, when it is)
    records: list[dict] = field(default_factory=list, repr=False)       # every image's record, with scores
    images: list[Image.Image] = field(default_factory=list, repr=False)  # in record order
    sources: list[Source] = field(default_factory=list, repr=False)
    source_index: list[int] = field(default_factory=list, repr=False)   # per record: its source in ``sources``

    def to_json(self) -> dict:
        return {"settings": self.settings, "recommendation": self.recommendation, "curves": self.curves,
                "by_target": self.by_target, "clip": self.clip}

    def text(self) -> str:
        """The recommendation in one paragraph (the app's recommendation box, the CLI's last lines)."""
        r = self.recommendation
        if r["strength"] is None:
            return f"no recommendation: {r['reason']}"
        span = (f"{r['confidence']:.0%} interval {r['low']:g}-{r['high']:g} (bootstrap over "
                f"{self.settings['n_sources']} sources)" if r["low"] is not None else "no interval (one source)")
        hard = [row["target"] for row in self.by_target if row["hard_to_reach"]]
        return (f"recommended strength {r['strength']:g}, {span}: {r['reason']}. "
                f"{self.settings['images']} images = {self.settings['n_sources']} sources x "
                f"{self.settings['targets_per_source']} targets x {len(self.settings['strengths'])} strengths x "
                f"{len(self.settings['seeds'])} seed(s)."
                + (f" Hard to reach (never at mean {r['measure']} >= {r['recommend_min_p_target']:g}): "
                   f"{', '.join(hard)}." if hard else ""))

    def table(self) -> tuple[list[str], list[list]]:
        """(header, rows) of the per-target-class table: hit rate per strength, the lowest strength
        reaching the bar, hard to reach."""
        strengths = self.settings["strengths"]
        header = ["target", "images"] + [f"hit @ {s:g}" for s in strengths] + ["reaches bar at", "hard to reach"]
        rows = [[row["target"], row["n"]] + [p["hit"] for p in row["by_strength"]]
                + [row["reaches_at"], "yes" if row["hard_to_reach"] else ""] for row in self.by_target]
        return header, rows

    def profile_summary(self) -> dict:
        """What a saved profile keeps (bundle.Profile.calibration): sources, classes, strengths,
        seeds, date, the recommendation's interval and the curves' means and intervals."""
        s, r = self.settings, self.recommendation
        keep = ("p_target", "p_source", "target_hit", "clip_target", "distance")
        return {"date": s["date"], "sources": s["n_sources"], "source_origin": s["source_origin"],
                "classes": s["classes"], "targets_per_source": s["targets_per_source"], "strengths": s["strengths"],
                "seeds": s["seeds"], "images": s["images"], "recommended": r["strength"],
                "interval": [r["low"], r["high"]], "confidence": r["confidence"], "reason": r["reason"],
                "curves": [{"strength": c["strength"], **{k: c[k] for k in keep if c.get(k)}} for c in self.curves]}

    def figure(self):
        """The curves with their intervals (matplotlib Figure); see :func:`plot_calibration`."""
        return plot_calibration(self)

    def grid(self) -> Image.Image:
        """The sample grid; see :func:`sample_grid`."""
        return sample_grid(self)


# --------------------------------------------------------------------------- 5. pictures
PANELS = (("faithfulness", (("p_target", "P(target)"), ("target_hit", "target hit (top-1)"),
                            ("p_source", "P(source)"))),
          ("CLIP", (("clip_target", "CLIP similarity to the target prompt"),)),
          ("diversity", (("distance", "distance to the source (1 - cos)"),)))


def plot_calibration(cal: Calibration):
    """Three panels against strength: faithfulness (P(target), hit rate, P(source), the bar),
    CLIP-target (or why it is absent) and distance; each mean with its interval across sources
    as a band, the recommended strength as a line and its interval as a shaded span."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4), layout="constrained")
    rec = cal.recommendation
    for ax, (title, series) in zip(fig.subplots(1, 3), PANELS):
        for key, label in series:
            pts = [(c["strength"], c[key]) for c in cal.curves if c.get(key)]
            if not pts:
                continue
            x, mean = [p[0] for p in pts], [p[1]["mean"] for p in pts]
            low = [p[1]["mean"] if p[1]["low"] is None else p[1]["low"] for p in pts]
            high = [p[1]["mean"] if p[1]["high"] is None else p[1]["high"] for p in pts]
            line = ax.plot(x, mean, marker="o", label=label)[0]
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, lw=0)
        if title == "CLIP" and not ax.lines:
            ax.text(0.5, 0.5, "\n".join(_wrap(cal.clip, 40)), ha="center", va="center", transform=ax.transAxes,
                    fontsize=8, color="gray")
        if title == "faithfulness":
            ax.axhline(rec["recommend_min_p_target"], color="red", lw=0.8, ls=":",
                       label=f"bar {rec['recommend_min_p_target']:g}")
            ax.set_ylim(-0.02, 1.02)
        if rec["strength"] is not None:
            ax.axvline(rec["strength"], color="green", lw=1, ls="-.")
            if rec["low"] is not None:
                ax.axvspan(rec["low"], rec["high"], color="green", alpha=0.08)
        ax.set_xlabel("strength s")
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    s = cal.settings
    fig.suptitle(f"{s['n_sources']} sources x {s['targets_per_source']} targets x {len(s['seeds'])} seed(s); "
                 f"means with {rec['confidence']:.0%} t-intervals across sources; recommended "
                 f"{rec['strength']} (shaded: its bootstrap interval)", fontsize=9)
    return fig


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width) or [""]


def sample_grid(cal: Calibration) -> Image.Image:
    """Rows = strengths (the source itself first, as s = 0), columns = up to ``grid_sources``
    sources spread over the classes, each to its first target at the first seed (grid.render)."""
    n = len(cal.sources)
    picked = dict.fromkeys(int(round(i)) for i in np.linspace(0, n - 1, min(n, cal.settings["grid_sources"])))
    first: dict[int, dict] = {}   # source -> the record of its first job
    for rec, i in zip(cal.records, cal.source_index):
        if i in picked:
            first.setdefault(i, rec)
    label = {i: f"{i + 1}. {cal.sources[i].source_class} -> {rec['target_class']}" for i, rec in first.items()}
    shown, images, column = [], {}, {}
    for rec, im, i in zip(cal.records, cal.images, cal.source_index):
        if i in first and (rec["target_class"], rec["seed"]) == (first[i]["target_class"], first[i]["seed"]):
            shown.append(rec)
            images[rec["id"]], column[rec["id"]] = im, label[i]
    for i, rec in first.items():   # the sources as the s = 0 row (translate's s = 0 is the unchanged source)
        rid = f"source-{i}"
        shown.append({**rec, "id": rid, "strength": 0.0, "steps_run": 0, "scores": None})
        images[rid], column[rid] = cal.sources[i].image, label[i]
    picture, _ = render(shown, lambda r: images[r["id"]], None, int(shown[0].get("resolution") or 64),
                        title="", min_p_target=cal.recommendation["recommend_min_p_target"],
                        column=lambda r: column[r["id"]])
    return picture


# --------------------------------------------------------------------------- 6. the whole run
def calibrate(bundle, sources: Sequence[Source] | None = None, config: CalibrateConfig = CalibrateConfig(), *,
              data: str | os.PathLike | None = None, split_file: str | os.PathLike | None = None,
              translate_config: TranslateConfig | None = None, score_config: ScoreConfig = ScoreConfig(),
              reference=None, clip=None, generate: Generate | None = None, limit: int | None = None,
              progress: Progress | None = None, show_progress: bool = True) -> Calibration:
    """Calibrate the strength of ``bundle`` over many sources and targets (module docstring).

    Args:
        bundle: a bundle.Bundle.
        sources: the source images; default :func:`draw_sources` (``data``'s split, else the
            bundle's examples), K per class.
        config: K, M, strengths, seeds, interval level, bootstrap resamples, grid columns.
        translate_config: sampler settings; default the bundle's profile's (translate_config_for).
        score_config: ``recommend_min_p_target``, the recommendation's bar (CLIP is ``clip``, not its fields).
        reference: a reference classifier; default the bundle's (none: P(target) is absent).
        clip: a scoring.ClipScorer; default scoring.default_clip (an unavailable one says why).
        generate: ``generate(bundle, jobs, config, callback=...)`` -> results (the app's engine on
            its cached pipeline); default translate.translate on the bundle's base pipeline.
        limit: most images (default :func:`max_jobs`); above it, ValueError before any work.
        progress: ``progress(stage, done, total)``: "translate" job-steps, then "score" images.
    """
    # 1. what to run, checked before any model is loaded
    translate_config = translate_config or translate_config_for(bundle)
    origin = "given" if sources is not None else (f"{data} ({config.split} split)" if data is not None
                                                   else "the bundle's example images")
    sources = list(sources) if sources is not None else draw_sources(bundle, data, config, split_file)
    jobs = plan_jobs(bundle, sources, config, translate_config, limit)
    # 2. one batched engine run, 3. scores
    reference, clip, ref_status = _scorers(bundle, reference, clip)
    results = _engine(bundle, jobs, translate_config, generate, progress, show_progress)
    embeddings = _score(results, bundle, reference, clip, score_config, progress, show_progress)
    records = [r.record for r in results]
    # 4. across sources
    index = {id(s): i for i, s in enumerate(sources)}
    source_index = [index[id(job.source)] for job in jobs]
    strengths = [float(s) for s in sorted(config.strengths)]
    matrices = {m: source_means(records, source_index, strengths, m) for m in CURVES}
    counts = [sum(float(r["strength"]) == s for r in records) for s in strengths]
    summary = summarize(records, embeddings, score_config)
    boot = bootstrap_recommendation(matrices, strengths, score_config.recommend_min_p_target, config.bootstrap,
                                    config.confidence, seed=config.draw_seed)
    recommendation = {"strength": summary["recommended_strength"], "reason": summary["recommendation"],
                      "measure": faithfulness_key(records),
                      "recommend_min_p_target": score_config.recommend_min_p_target,
                      "rule": RULE, "interval_method": INTERVAL.format(lo=50 * (1 - config.confidence),
                                                                       hi=50 * (1 + config.confidence)),
                      "confidence": config.confidence, **boot}
    settings = _settings(bundle, sources, origin, jobs, config, translate_config, ref_status, clip.status)
    return Calibration(settings, curves(matrices, strengths, counts, config.confidence),
                       target_table(records, bundle.classes, strengths, score_config.recommend_min_p_target),
                       recommendation, clip.status, records, [r.image for r in results], sources, source_index)


def _settings(bundle, sources: list[Source], origin: str, jobs: list[Job], config: CalibrateConfig,
              translate_config: TranslateConfig, reference: str, clip: str) -> dict:
    targets = {(id(j.source), j.target_class) for j in jobs}
    return {"bundle": str(bundle.path), "bundle_hash": bundle.hash, "classes": list(bundle.classes),
            "source_origin": origin, "n_sources": len(sources), "targets_per_source": len(targets) // len(sources),
            "strengths": [float(s) for s in sorted(config.strengths)], "seeds": list(config.seeds),
            "images": len(jobs), "sources": [{"id": s.id, "class": s.source_class, "path": s.path} for s in sources],
            "translate": dataclasses.asdict(translate_config), "reference": reference, "clip": clip,
            "confidence": config.confidence, "bootstrap": config.bootstrap, "draw_seed": config.draw_seed,
            "per_class": config.per_class, "grid_sources": config.grid_sources,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "diffmix_version": __version__}


# --------------------------------------------------------------------------- 7. files and the profile
def write_calibration(cal: Calibration, out: str | os.PathLike) -> list[Path]:
    """``calibration.json``, ``calibration.png`` (the curves) and ``calibration_grid.png`` in
    ``out``, each written atomically; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [write_text_atomic(out / CALIBRATION_FILE, json.dumps(cal.to_json(), indent=1, ensure_ascii=False) + "\n")]
    with atomic_path(out / PLOT_FILE) as tmp:
        cal.figure().savefig(tmp, format="png", dpi=110)
    files.append(out / PLOT_FILE)
    files.append(save_png(cal.grid(), out / GRID_FILE))
    return files


def save_to_profile(bundle, cal: Calibration, root: str | os.PathLike | None = None) -> Path:
    """Store the recommended strength, the sampler settings it was found with and the calibration
    summary in the user's saved profile of ``bundle`` (profiles.save_profile; thresholds kept)."""
    if cal.recommendation["strength"] is None:
        raise ValueError(f"the calibration recommends no strength ({cal.recommendation['reason']}); nothing to save")
    t = cal.settings["translate"]
    settings = {"strategy": t["strategy"], "num_inference_steps": t["num_inference_steps"],
                "guidance_scale": t["guidance_scale"]}
    return save_profile(bundle, cal.recommendation["strength"], load_profile(bundle, root).thresholds, settings,
                        root=root, calibration=cal.profile_summary())
