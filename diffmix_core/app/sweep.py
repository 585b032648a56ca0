"""One sweep of the app, asked for as a :class:`SweepRequest`: planned (every setting read and
checked, nothing run: :func:`plan_sweep`), made on the process's pipeline, scored and stored
in the session (:func:`run_sweep`); and the auto-select of a sweep's images by
``config.Thresholds`` (:func:`passing`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..bundle import Bundle
from ..config import THRESHOLD_TESTS, DiffIIConfig, Thresholds, TranslateConfig, get_strategy
from ..diffii import draw_partner
from ..diffii_jobs import partner_pool
from ..jobs import parse_seeds, parse_strengths, sweep_jobs, sweep_targets
from ..scoring import class_prompt, plot_strategies, plot_sweep, score_images, summarize
from ..translate import Job, Result, Source, count_jobs, validate_jobs
from .cache import clip_scorer, generate, reference_for
from .store import Limits, Store

FAST_PREVIEW = 3   # the app's "fast preview": the whole UNet every 3rd step (TranslateConfig.cache_interval)


def parse_strategies(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Strategy names from a list or a comma-separated text ("diff-mix, diff-ii"), checked, in
    order, without repeats."""
    parts = value.split(",") if isinstance(value, str) else list(value or [])
    names = tuple(dict.fromkeys(str(p).strip() for p in parts if str(p).strip()))
    if not names:
        raise ValueError("choose at least one strategy")
    for name in names:
        get_strategy(name)
    return names


@dataclass(frozen=True)
class SweepRequest:
    """One sweep as the user asked for it: the app's controls, or a script's /sweep call."""

    source_class: str                  # the source's class (the user's: an upload's is never guessed)
    target: str                        # a class, several separated by commas, or jobs.ALL_OTHER
    strengths: str = "0.3, 0.5, 0.7, 0.9"   # a list (0.3, 0.5) or from:to:count (0.1:0.9:5)
    seeds: str = "0, 1"                # a list (0, 1, 7), a count (n=4), or -1 for a random seed
    steps: int = TranslateConfig.num_inference_steps     # sampler steps N
    guidance: float = TranslateConfig.guidance_scale     # classifier-free guidance
    strategies: tuple[str, ...] = ("diff-mix",)   # config.STRATEGIES names, side by side (a text: comma-separated)
    cache_interval: int = TranslateConfig.cache_interval   # feature cache; FAST_PREVIEW for the "fast preview"
    inversion_steps: int = DiffIIConfig.inversion_steps     # diff-ii: DDIM inversion steps of each source

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategies", parse_strategies(self.strategies))
        self.diff_ii()   # checks inversion_steps

    def config(self, strategy: str | None = None) -> TranslateConfig:
        """The engine's settings for one of this sweep's strategies (default: the first)."""
        return TranslateConfig(strategy=strategy or self.strategies[0], num_inference_steps=int(self.steps),
                               guidance_scale=float(self.guidance), cache_interval=int(self.cache_interval))

    def diff_ii(self) -> DiffIIConfig:
        """The diff-ii settings of this sweep."""
        return DiffIIConfig(inversion_steps=int(self.inversion_steps))


@dataclass
class SweepOutcome:
    ids: list[str]
    records: list[dict]
    summary: dict | None       # scoring.summarize of the first strategy, None when scoring is unavailable
    figure: object | None      # matplotlib Figure (one curve per strategy when there are several)
    columns: int               # seeds per row
    notes: list[str]
    summaries: dict[str, dict | None]   # strategy -> its summary


@dataclass(frozen=True)
class SweepPlan:
    blocks: tuple[tuple[str, list[Job]], ...]   # (strategy, its jobs ordered target, strength, seed), as asked
    request: SweepRequest
    seeds: list[int]          # random seeds (-1) already drawn
    partner: Source | None    # diff-ii's second source, None without diff-ii

    @property
    def jobs(self) -> list[Job]:
        return [job for _, jobs in self.blocks for job in jobs]

    @property
    def config(self) -> TranslateConfig:
        return self.request.config()


def pick_partner(bundle: Bundle, source: Source, seed: int, chosen: Source | None = None) -> Source:
    """diff-ii's second source: ``chosen`` (the user's), else one of the bundle's examples of the
    source's class drawn with ``seed`` (diffii.draw_partner); the source itself when there is none."""
    if chosen is not None:
        return chosen
    try:
        pool = partner_pool(source.source_class, bundle=bundle)
    except ValueError:   # no example of this class: denoised from its own inversion
        pool = []
    return draw_partner(source, pool, seed)


def count_sweep(bundle: Bundle, request: SweepRequest, n_strengths: int, n_seeds: int, limit: int) -> int:
    """Images the sweep makes, every strategy's counted, refused above ``limit`` before any job is built."""
    counts = {}
    for name in request.strategies:
        kind = get_strategy(name).pairing
        targets = sweep_targets(bundle, request.source_class, request.target, kind)   # what sweep_jobs will run
        factors = {"targets": len(targets), "strengths": 1 if kind == "gen" else n_strengths, "seeds": n_seeds}
        counts[name] = count_jobs(factors, limit, "DIFFMIX_MAX_JOBS")
    if len(counts) == 1:
        return next(iter(counts.values()))
    shown = " + ".join(f"{n} {name}" for name, n in counts.items())
    return count_jobs({f"images ({shown})": sum(counts.values())}, limit, "DIFFMIX_MAX_JOBS")


def plan_sweep(bundle: Bundle, source: Source | None, request: SweepRequest, limits: Limits = Limits(),
               partner: Source | None = None) -> SweepPlan:
    """Read and check every setting of a sweep without running anything (cheap: the app calls it
    first, so a typo leaves the previous results alone). ``partner``: diff-ii's second source when
    the user chose one (else :func:`pick_partner` draws it with the first seed)."""
    s_list = parse_strengths(request.strengths, limits.max_jobs)
    seed_list = parse_seeds(request.seeds, limits.max_jobs)
    count_sweep(bundle, request, len(s_list), len(seed_list), limits.max_jobs)
    blocks, second = [], None
    for name in request.strategies:
        jobs = sweep_jobs(bundle, source, request.source_class, request.target, s_list, seed_list, name)
        if get_strategy(name).start == "inversion":
            second = pick_partner(bundle, source, seed_list[0], partner)
            jobs = [Job(j.source, j.target_class, j.strength, j.seed, j.source_class, partner=second) for j in jobs]
        validate_jobs(jobs, request.config(name), bundle)
        blocks.append((name, jobs))
    return SweepPlan(tuple(blocks), request, seed_list, second)


def run_sweep(store: Store, bundle: Bundle, source: Source | None, request: SweepRequest, *,
              limits: Limits = Limits(), generate_fn: Callable = generate,
              callback: Callable[[int, int], None] | None = None, plan: SweepPlan | None = None,
              partner: Source | None = None) -> SweepOutcome:
    """Make, score and store one sweep (``plan``: :func:`plan_sweep`'s, when the caller has it):
    each strategy in turn (diff-ii's inversions come from the cached stage), scored on its own;
    rows = strength, columns = seed, one block of columns per strategy."""
    plan = plan or plan_sweep(bundle, source, request, limits, partner)
    results, summaries, notes, offset = [], {}, [], [0]
    report = None if callback is None else lambda done, total: callback(offset[0] + done, offset[0] + total)
    for name, jobs in plan.blocks:   # progress counts on across the blocks
        extra = {"diff_ii": request.diff_ii()} if get_strategy(name).start == "inversion" else {}
        made = generate_fn(bundle, jobs, request.config(name), callback=report, **extra)
        offset[0] += sum(r.record.get("steps_run") or 0 for r in made)
        summaries[name], _, block_notes = score_results(made, bundle, plot=False)
        notes += [n for n in block_notes if n not in notes]
        results += made
    first = summaries[plan.blocks[0][0]]
    figure = (plot_sweep(first) if len(summaries) == 1 and first
              else plot_strategies(summaries) if any(summaries.values()) else None)
    with store.lock:
        ids = store.add(results)
        state = store.state()
        state.update(last_sweep=ids, sweeps=state["sweeps"] + 1, summary=first, summaries=summaries,
                     bundle=str(bundle.path),
                     request=dataclasses.asdict(request))   # a reload shows the form as this sweep had it
        store.save_state(state)
    return SweepOutcome(ids, [r.record for r in results], first, figure, len(plan.seeds), notes, summaries)


def class_guesses(bundle: Bundle, image, k: int = 3) -> list[tuple[str, float]]:
    """The reference classifier's ``k`` most likely classes for an image, [(class, probability)],
    best first; [] when the bundle has none. A hint for the user choosing an upload's class,
    never a class set for them."""
    reference, _ = reference_for(bundle)
    if reference is None:
        return []
    probs = reference.predict([image])[0][0]
    top = probs.topk(min(k, probs.numel()))
    return [(reference.classes[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]


def score_results(results: list[Result], bundle: Bundle, plot: bool = True
                  ) -> tuple[dict | None, object | None, list[str]]:
    """Fill each record's ``scores`` (reference classifier, CLIP, distance, SSIM); summary and plot."""
    reference, ref_status = reference_for(bundle)
    clip = clip_scorer(bundle)
    records = [r.record for r in results]
    scores, embeddings = score_images([r.image for r in results], records, reference=reference, clip=clip,
                                      prompt=lambda c: class_prompt(c, bundle))
    for rec, s in zip(records, scores):
        rec["scores"] = s
    summary = summarize(records, embeddings, clip=clip.status, reference=None if reference is None else ref_status)
    figure = plot_sweep(summary) if plot and summary else None
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
