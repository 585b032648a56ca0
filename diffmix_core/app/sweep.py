"""One sweep of the app, asked for as a :class:`SweepRequest`: planned (every setting read and
checked, nothing run: :func:`plan_sweep`), made on the process's pipeline, scored and stored
in the session (:func:`run_sweep`); and the auto-select of a sweep's images by
``config.Thresholds`` (:func:`passing`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..bundle import Bundle
from ..config import THRESHOLD_TESTS, Thresholds, TranslateConfig, get_strategy
from ..jobs import ALL_OTHER, parse_seeds, parse_strengths, sweep_jobs
from ..scoring import class_prompt, plot_sweep, score_images, summarize
from ..translate import Job, Result, Source, count_jobs, validate_jobs
from .cache import clip_scorer, generate, reference_for
from .store import Limits, Store


@dataclass(frozen=True)
class SweepRequest:
    """One sweep as the user asked for it: the app's controls, or a script's /sweep call."""

    source_class: str                  # the source's class (the user's: an upload's is never guessed)
    target: str                        # a class, several separated by commas, or jobs.ALL_OTHER
    strengths: str = "0.3, 0.5, 0.7, 0.9"   # a list (0.3, 0.5) or from:to:count (0.1:0.9:5)
    seeds: str = "0, 1"                # a list (0, 1, 7), a count (n=4), or -1 for a random seed
    steps: int = TranslateConfig.num_inference_steps     # sampler steps N
    guidance: float = TranslateConfig.guidance_scale     # classifier-free guidance
    strategy: str = "diff-mix"         # a config.STRATEGIES name

    def config(self) -> TranslateConfig:
        """The engine's settings for this sweep."""
        return TranslateConfig(strategy=self.strategy, num_inference_steps=int(self.steps),
                               guidance_scale=float(self.guidance))


@dataclass
class SweepOutcome:
    ids: list[str]
    records: list[dict]
    summary: dict | None       # scoring.summarize, None when scoring is unavailable
    figure: object | None      # matplotlib Figure
    columns: int               # seeds per row
    notes: list[str]


@dataclass(frozen=True)
class SweepPlan:
    jobs: list[Job]           # ordered target, strength, seed
    config: TranslateConfig
    seeds: list[int]          # random seeds (-1) already drawn


def plan_sweep(bundle: Bundle, source: Source | None, request: SweepRequest, limits: Limits = Limits()) -> SweepPlan:
    """Read and check every setting of a sweep without running anything (cheap: the app calls it
    first, so a typo leaves the previous results alone)."""
    s_list = parse_strengths(request.strengths, limits.max_jobs)
    seed_list = parse_seeds(request.seeds, limits.max_jobs)
    config = request.config()
    kind = get_strategy(request.strategy).pairing
    n_targets = len(bundle.classes) - 1 if request.target == ALL_OTHER and kind == "inter" else 1
    factors = {"targets": n_targets, "strengths": 1 if kind == "gen" else len(s_list), "seeds": len(seed_list)}
    count_jobs(factors, limits.max_jobs, "DIFFMIX_MAX_JOBS")   # before the job list is built
    jobs = sweep_jobs(bundle, source, request.source_class, request.target, s_list, seed_list, request.strategy)
    validate_jobs(jobs, config, bundle)
    return SweepPlan(jobs, config, seed_list)


def run_sweep(store: Store, bundle: Bundle, source: Source | None, request: SweepRequest, *,
              limits: Limits = Limits(), generate_fn: Callable = generate,
              callback: Callable[[int, int], None] | None = None, plan: SweepPlan | None = None) -> SweepOutcome:
    """Make, score and store one sweep (``plan``: :func:`plan_sweep`'s, when the caller has it);
    rows = strength, columns = seed."""
    plan = plan or plan_sweep(bundle, source, request, limits)
    results = generate_fn(bundle, plan.jobs, plan.config, callback=callback)
    summary, figure, notes = score_results(results, bundle)
    with store.lock:
        ids = store.add(results)
        state = store.state()
        state.update(last_sweep=ids, sweeps=state["sweeps"] + 1, summary=summary, bundle=str(bundle.path))
        store.save_state(state)
    return SweepOutcome(ids, [r.record for r in results], summary, figure, len(plan.seeds), notes)


def score_results(results: list[Result], bundle: Bundle) -> tuple[dict | None, object | None, list[str]]:
    """Fill each record's ``scores`` (reference classifier, CLIP, distance, SSIM); summary and plot."""
    reference, ref_status = reference_for(bundle)
    clip = clip_scorer(bundle)
    records = [r.record for r in results]
    scores, embeddings = score_images([r.image for r in results], records, reference=reference, clip=clip,
                                      prompt=lambda c: class_prompt(c, bundle))
    for rec, s in zip(records, scores):
        rec["scores"] = s
    summary = summarize(records, embeddings, clip=clip.status, reference=None if reference is None else ref_status)
    figure = plot_sweep(summary)
    notes = [clip.status] + ([] if reference is not None else [ref_status])
    return summary, figure, notes


# --------------------------------------------------------------------------- auto-select
def clean_thresholds(thresholds: dict | Thresholds | None) -> dict:
    """The tests that are on, {field: limit} (config.Thresholds checks names and ranges)."""
    if isinstance(thresholds, Thresholds):
        return thresholds.as_dict()
    return Thresholds.from_dict(thresholds).as_dict()


def passing(records: Sequence[dict], thresholds: dict | Thresholds) -> tuple[list[str], list[str]]:
    """Ids of records meeting every threshold, and notes on thresholds that could not apply
    (no image of the sweep has that score: the test is skipped, and said so)."""
    active, notes = {}, []
    for key, limit in clean_thresholds(thresholds).items():
        score, op, label = THRESHOLD_TESTS[key]
        if all((r.get("scores") or {}).get(score) is None for r in records):
            notes.append(f"{label} {op} {limit} ignored: no image has a {label} score")
        else:
            active[key] = limit
    tests = Thresholds(**active)
    return [r["id"] for r in records if not tests.failures(r.get("scores"), missing_fails=True)], notes
