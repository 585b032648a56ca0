"""A sweep's jobs: which images to make, from the CLI's options or the app's text fields.

:func:`make_jobs` is the one place that orders jobs (source, target, strength, seed: the
app's grid has strengths as rows and seeds as columns); :func:`sweep_jobs` first reads the
app's target choice (one class, several with commas, or :data:`ALL_OTHER`). The strengths
and seeds texts are read by :func:`parse_strengths` / :func:`parse_seeds`; a seed of
:data:`RANDOM_SEED` becomes a fresh random seed that the record keeps (:func:`resolve_seeds`).
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence

from .bundle import Bundle
from .config import check_seed, get_strategy
from .translate import Job, Source

ALL_OTHER = "all other classes"            # target choice: one row block per other class (a matrix)


def parse_strengths(text: str, max_count: int | None = None, raise_with: str = "DIFFMIX_MAX_JOBS") -> list[float]:
    """'0.3, 0.5 0.7' (a list) or '0.1:0.9:5' (from:to:count, evenly spaced) -> strengths; a
    count above ``max_count`` is refused before any list is built (``raise_with``: the setting
    that raises it)."""
    text = (text or "").strip()
    if ":" in text:
        parts = text.split(":")
        try:
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
        except (ValueError, IndexError):
            raise ValueError(f"strength range {text!r} must read from:to:count, e.g. 0.1:0.9:5") from None
        if len(parts) != 3 or n < 1:
            raise ValueError(f"strength range {text!r} must read from:to:count with count >= 1")
        _check_count(n, max_count, "strengths", raise_with)
        return [round(lo + (hi - lo) * i / (n - 1), 6) for i in range(n)] if n > 1 else [lo]
    values = _numbers(text, float, "strength", max_count, raise_with)
    bad = [s for s in values if not 0.0 <= s <= 1.0]
    if bad:
        raise ValueError(f"strengths must be between 0 and 1, got {bad}")
    return list(dict.fromkeys(values))


RANDOM_SEED = -1   # a seed of -1 asks for a random one (the record keeps the seed drawn)


def parse_seeds(text: str, max_count: int | None = None, raise_with: str = "DIFFMIX_MAX_JOBS") -> list[int]:
    """'0, 1, 7' (a list), 'n=4' (a count: seeds 0..3) or -1 (a random seed) -> seeds; a count
    above ``max_count`` is refused before any list is built."""
    text = (text or "").strip()
    if text.lower().startswith("n="):
        try:
            n = int(text[2:])
        except ValueError:
            raise ValueError(f"seed count {text!r} must read n=<count>, e.g. n=4") from None
        if n < 1:
            raise ValueError(f"seed count must be >= 1, got {n}")
        _check_count(n, max_count, "seeds", raise_with)
        return list(range(n))
    return resolve_seeds(_numbers(text, int, "seed", max_count, raise_with))


def resolve_seeds(seeds: Sequence[int]) -> list[int]:
    """Each -1 becomes a fresh random seed in [0, 2**31); others must be in the generators' range
    (config.check_seed); duplicates dropped."""
    out = [secrets.randbelow(2**31) if s == RANDOM_SEED else s for s in seeds]
    for s in out:
        check_seed(s, "seed")
    return list(dict.fromkeys(int(s) for s in out))


def _check_count(n: int, max_count: int | None, what: str, raise_with: str = "DIFFMIX_MAX_JOBS") -> None:
    if max_count is not None and n > max_count:
        raise ValueError(f"{n:,} {what} exceed the limit of {max_count:,} per request (images; "
                         f"set {raise_with} to raise it)")


def _numbers(text: str, kind, what: str, max_count: int | None = None, raise_with: str = "DIFFMIX_MAX_JOBS") -> list:
    if max_count is not None and len(text) > 32 * max_count:   # a text too long to hold max_count numbers
        raise ValueError(f"the {what}s text is {len(text):,} characters; give at most {max_count} {what}s")
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise ValueError(f"give at least one {what}")
    _check_count(len(parts), max_count, f"{what}s", raise_with)
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise ValueError(f"could not read {what}s from {text!r}: use numbers separated by commas") from None


def make_jobs(sources: Sequence[Source], targets: Sequence[str], strengths: Sequence[float], seeds: Sequence[int],
              pairing: str, source_class: str | None = None) -> list[Job]:
    """Jobs ordered source, target, strength, seed. ``pairing`` is the strategy's
    (config.get_strategy): ``gen`` makes one text-to-image job per target and seed (strength
    1.0, filed under ``source_class``, else under its target), the others every source at
    every strength. ``source_class``, when given, is recorded on every job."""
    if pairing == "gen":
        return [Job(None, t, 1.0, seed, source_class=source_class or t) for t in targets for seed in seeds]
    return [Job(src, t, s, seed, source_class=source_class) for src in sources for t in targets for s in strengths
            for seed in seeds]


def sweep_targets(bundle: Bundle, source_class: str, target: str, pairing: str) -> list[str]:
    """The target classes a sweep runs, as :func:`sweep_jobs` makes them (names not yet checked):
    the source's class for an intra-class strategy, every other class for :data:`ALL_OTHER`, else
    the distinct names of ``target`` separated by commas. Callers count jobs from this list."""
    if pairing == "intra":
        return [source_class]
    if target == ALL_OTHER:
        return [c for c in bundle.classes if c != source_class]
    return list(dict.fromkeys(t.strip() for t in (target or "").split(",") if t.strip()))


def sweep_jobs(bundle: Bundle, source: Source | None, source_class: str, target: str, strengths: Sequence[float],
               seeds: Sequence[int], strategy: str) -> list[Job]:
    """The app's sweep: ``target`` is one class, several separated by commas (side by side in
    the grid) or :data:`ALL_OTHER`; an intra-class strategy keeps the source's class. Jobs
    ordered target, strength, seed: the grid's rows are strengths, its columns seeds."""
    kind = get_strategy(strategy).pairing
    bundle.class_index(source_class)
    targets = sweep_targets(bundle, source_class, target, kind)
    if not targets:
        raise ValueError("choose a target class")
    for t in targets:
        bundle.class_index(t)
    if kind != "gen" and source is None:
        raise ValueError("pick an example image or upload a source image first")
    return make_jobs([source], targets, strengths, seeds, kind, source_class)
