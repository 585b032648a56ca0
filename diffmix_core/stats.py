"""The one Student-t interval of diffmix: calibration's per-strength means across sources and the
experiment's paired differences across seeds both come from :func:`t_mean`."""
from __future__ import annotations

import typing

import numpy as np


def t_mean(values: typing.Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict | None:
    """The mean of ``values`` (NaNs dropped) with its Student-t interval and the two-sided p-value
    of H0: mean = 0.

    Returns None for no values, else {"mean", "half" (half-width: t((1 + confidence) / 2, n - 1)
    · sd / sqrt(n)), "p", "n"}; half and p are None for one value; a zero spread gives half 0 and
    p 1 (mean 0) or 0.
    """
    from scipy import stats

    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return None
    n, mean = int(v.size), float(v.mean())
    if n < 2:
        return {"mean": mean, "half": None, "p": None, "n": n}
    se = float(v.std(ddof=1)) / np.sqrt(n)
    if se == 0:
        return {"mean": mean, "half": 0.0, "p": 1.0 if mean == 0 else 0.0, "n": n}
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * se
    return {"mean": mean, "half": half, "p": float(2 * stats.t.sf(abs(mean) / se, n - 1)), "n": n}
