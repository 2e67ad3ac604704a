"""The shared statistics helpers against hand computations and scipy."""

import math

import numpy as np
import pytest

from fastcifar.stats import bonferroni_confidence, describe, holm, multiple_paired_comparisons, paired_comparison


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


@pytest.mark.parametrize("a, b, why", [
    ([0.5], [0.6], "fewer than 3 paired seeds (1)"),
    ([0.5, 0.6], [0.6, 0.7], "fewer than 3 paired seeds (2)"),  # identical differences at n = 2: scipy says p = 0
    ([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], "no spread"),
    ([0.1, 0.2, 0.3, 0.4], [0.113, 0.213, 0.313, 0.413], "no spread"),  # rounding only: scipy's p is 4e-47
])
def test_no_interval_or_p_value_from_too_few_pairs_or_no_spread(a, b, why):
    r = paired_comparison(a, b)
    assert (r["ci_low"], r["ci_high"], r["p_value"]) == (None, None, None)
    assert why in r["untested"] and r["mean_diff"] == pytest.approx(np.mean(np.subtract(b, a)))


def test_paired_comparison_needs_equal_lengths():
    with pytest.raises(ValueError):
        paired_comparison([0.5], [0.5, 0.6])


def test_holm_against_a_hand_computation():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06; capped at 1
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, None, 0.2]) == [pytest.approx(1.0), None, pytest.approx(0.6)]  # None counts in the family
    assert holm([0.04]) == [0.04]


def test_several_comparisons_widen_the_intervals_and_adjust_p():
    base = [0.90, 0.91, 0.92, 0.93]
    others = [[0.905, 0.92, 0.921, 0.94], [0.91, 0.905, 0.93, 0.935]]
    assert bonferroni_confidence(0.95, 2) == pytest.approx(0.975) and bonferroni_confidence(0.95, 1) == 0.95
    results = multiple_paired_comparisons(base, others, 0.95)
    for r, other in zip(results, others):
        single = paired_comparison(base, other, 0.95)
        assert r["confidence"] == pytest.approx(0.975) and r["family_confidence"] == 0.95
        assert r["ci_low"] < single["ci_low"] and r["ci_high"] > single["ci_high"]  # wider
        assert r["p_value"] == pytest.approx(single["p_value"])
    raw = [r["p_value"] for r in results]
    assert [r["p_holm"] for r in results] == pytest.approx(holm(raw))
    assert max(r["p_holm"] for r in results) == pytest.approx(max(min(raw) * 2, max(raw)))
    alone = multiple_paired_comparisons(base, others[:1], 0.95)[0]
    assert alone["p_holm"] == alone["p_value"] and alone["confidence"] == 0.95


def test_the_module_docstring_example_holds():
    """The doctest in fastcifar.stats' docstring, which nothing else runs. Sabotage: describe's mean accumulated in
    float32 (0.9399999976158142: every test above still passes, within their tolerances)."""
    import doctest

    import fastcifar.stats

    result = doctest.testmod(fastcifar.stats)
    assert result.attempted >= 1 and result.failed == 0
