"""Statistics over seeds: one description of a sample, one paired comparison and the corrections for several
comparisons against one baseline, shared by every report.

    >>> describe([0.92, 0.94, 0.96])["mean"]
    0.94

`describe` needs numpy only; `paired_comparison` imports scipy (the `tune` extra) when called.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fastcifar.errors import require

# A t interval from two pairs has one degree of freedom (t = 12.7 at 95%) and a standard deviation that is
# one number's distance from another: too little to decide anything on.
MIN_PAIRS = 3
# Differences of floats carry rounding error near 1e-16 of the values; a spread below this fraction of
# them is rounding, not seed-to-seed variation, and a t statistic divided by it is meaningless (p ~ 1e-32).
MIN_RELATIVE_SPREAD = 1e-9


def describe(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample std (ddof=1; 0.0 for one value), min, median, max; all None for no values."""
    sample = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if sample.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "median": None, "max": None}
    return {"n": int(sample.size), "mean": float(sample.mean()),
            "std": float(sample.std(ddof=1)) if sample.size > 1 else 0.0,
            "min": float(sample.min()), "median": float(np.median(sample)), "max": float(sample.max())}


def paired_comparison(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Difference b - a over paired samples (same seeds): n, mean, std, a `confidence` t interval and the
    paired t-test's two-sided p-value (scipy.stats.ttest_rel). Interval and p are None, and `untested` says
    why, for fewer than MIN_PAIRS pairs or differences without spread."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    first, second = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = second - first
    n = int(diff.size)
    result: dict[str, Any] = {"n": n, "mean_diff": float(diff.mean()) if n else None,
                              "std_diff": float(diff.std(ddof=1)) if n > 1 else None, "ci_low": None,
                              "ci_high": None, "p_value": None, "confidence": confidence, "untested": None}
    if n < MIN_PAIRS:
        result["untested"] = f"fewer than {MIN_PAIRS} paired seeds ({n})"
    elif result["std_diff"] <= MIN_RELATIVE_SPREAD * np.abs(np.concatenate([first, second])).max():
        result["untested"] = "no spread: the paired differences are identical (std 0 or rounding error only)"
    else:
        scipy_stats = require("scipy.stats", "tune", "the confidence interval of a paired comparison")
        test = scipy_stats.ttest_rel(second, first)
        interval = test.confidence_interval(confidence)
        result.update(ci_low=float(interval.low), ci_high=float(interval.high), p_value=float(test.pvalue))
    return result


def bonferroni_confidence(confidence: float, comparisons: int) -> float:
    """Each of `comparisons` intervals' confidence for all to hold together at `confidence` (Bonferroni)."""
    return 1 - (1 - confidence) / comparisons


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (statsmodels' `multipletests(method="holm")`), in the input order.
    A comparison without a p-value (None, kept) still counts in the family: the correction stays conservative."""
    adjusted: list[float | None] = list(p_values)
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(p_values) - rank) * p))
        adjusted[i] = running
    return adjusted


def multiple_paired_comparisons(baseline: Sequence[float], others: Sequence[Sequence[float]],
                                confidence: float = 0.95) -> list[dict[str, Any]]:
    """`paired_comparison` of each sample in `others` against `baseline`, corrected for their number: intervals
    at the Bonferroni confidence (all hold together at `confidence`), `p_holm` Holm's adjustment of `p_value`."""
    results = [paired_comparison(baseline, other, bonferroni_confidence(confidence, len(others))) for other in others]
    for result, adjusted in zip(results, holm([r["p_value"] for r in results])):
        result.update(p_holm=adjusted, family_confidence=confidence)
    return results
