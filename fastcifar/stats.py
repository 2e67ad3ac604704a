"""Statistics over seeds: one description of a sample and one paired comparison, shared by every report.

    >>> describe([0.93, 0.94, 0.95])["mean"]
    0.94

`describe` needs numpy only; `paired_comparison` imports scipy (the `tune` extra) when called.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def describe(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample std (ddof=1; 0.0 for one value), min, median, max; all None for no values."""
    sample = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if sample.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "median": None, "max": None}
    return {"n": int(sample.size), "mean": float(sample.mean()),
            "std": float(sample.std(ddof=1)) if sample.size > 1 else 0.0,
            "min": float(sample.min()), "median": float(np.median(sample)), "max": float(sample.max())}


def paired_comparison(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Difference b - a over paired samples (same seeds): mean, a `confidence` t interval and the paired
    t-test's two-sided p-value. Fewer than 2 pairs: interval and p are None. Identical differences (no
    spread): the degenerate interval [d, d], p = 1 when d = 0 and 0 otherwise (scipy would return NaN)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = int(diff.size)
    result: dict[str, Any] = {"n": n, "mean_diff": float(diff.mean()) if n else None, "ci_low": None,
                              "ci_high": None, "p_value": None, "confidence": confidence}
    if n < 2:
        return result
    from scipy import stats as scipy_stats

    sd = float(diff.std(ddof=1))
    if sd == 0.0:
        d = float(diff.mean())
        result.update(ci_low=d, ci_high=d, p_value=1.0 if d == 0.0 else 0.0)
        return result
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * sd / math.sqrt(n)
    p = float(scipy_stats.ttest_rel(b, a).pvalue)
    result.update(ci_low=float(diff.mean()) - half, ci_high=float(diff.mean()) + half, p_value=p)
    return result
