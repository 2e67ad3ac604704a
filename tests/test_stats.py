"""The shared statistics helpers against hand computations and scipy."""

import math

import numpy as np
import pytest

from fastcifar.stats import describe, paired_comparison


def test_describe_matches_numpy():
    values = [0.91, 0.935, 0.94, 0.92]
    d = describe(values)
    assert d["n"] == 4
    assert d["mean"] == pytest.approx(np.mean(values))
    assert d["std"] == pytest.approx(np.std(values, ddof=1))  # sample std, not population
    assert (d["min"], d["median"], d["max"]) == (0.91, pytest.approx(0.9275), 0.94)


def test_describe_one_and_none():
    assert describe([0.5])["std"] == 0.0
    assert describe([])["mean"] is None
    assert describe([None, 0.5])["n"] == 1


def test_paired_comparison_interval_and_p():
    a = [0.90, 0.91, 0.92, 0.93]
    b = [0.905, 0.92, 0.921, 0.94]
    r = paired_comparison(a, b)
    diff = np.subtract(b, a)
    half = 3.182446305284263 * diff.std(ddof=1) / math.sqrt(4)  # t(0.975, df=3)
    assert r["mean_diff"] == pytest.approx(diff.mean())
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(diff.mean() - half), pytest.approx(diff.mean() + half))
    from scipy import stats
    assert r["p_value"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
    assert 0 < r["p_value"] < 1
    # pairing matters: the unpaired order would give another answer
    assert paired_comparison(a, b[::-1])["p_value"] != pytest.approx(r["p_value"])


def test_paired_comparison_edges():
    assert paired_comparison([0.5], [0.6])["ci_low"] is None
    same = paired_comparison([0.5, 0.6], [0.6, 0.7])
    assert same["ci_low"] == same["ci_high"] == pytest.approx(0.1) and same["p_value"] == 0.0
    with pytest.raises(ValueError):
        paired_comparison([0.5], [0.5, 0.6])
