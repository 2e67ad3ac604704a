"""The suite's own rules: how export_helpers compares classes of a model trained in the run, and how
FASTCIFAR_TEST_SEED reaches the seed of such models (conftest.train_seed).

    pytest -q tests/test_helpers.py
"""

from __future__ import annotations

import numpy as np
import pytest

from export_helpers import DECIDED_SHARE, assert_same_classes_where_decided, decided

MARGIN = 1.0


def logits(gaps: list[float]) -> np.ndarray:
    """One row per gap: class 0 leads class 1 by the gap, the rest lie far below."""
    rows = np.full((len(gaps), 4), -10.0)
    rows[:, 0], rows[:, 1] = np.array(gaps), 0.0
    return rows


def swapped(rows: np.ndarray, row: int) -> np.ndarray:
    """The logits with classes 0 and 1 swapped on one row: another class wins there."""
    out = rows.copy()
    out[row, [0, 1]] = out[row, [1, 0]]
    return out


def test_a_decided_row_must_agree_and_an_undecided_one_may_not():
    """Nine rows decided by 2, one by 0.5 (9/10 = DECIDED_SHARE). Sabotage: the rule comparing every row, or
    none."""
    reference = logits([2.0] * 9 + [0.5])
    assert decided(reference, MARGIN).tolist() == [True] * 9 + [False]
    assert_same_classes_where_decided(swapped(reference, 9), reference, MARGIN, "undecided row")
    with pytest.raises(AssertionError, match="decided row"):
        assert_same_classes_where_decided(swapped(reference, 0), reference, MARGIN, "decided row")


def test_a_reference_that_decides_too_few_rows_fails_by_name():
    """A model that did not learn fails as such, not by an accident of which classes it compares. Sabotage: the
    rule without its share check, or a share below 90%."""
    assert DECIDED_SHARE >= 0.9
    reference = logits([2.0] * 8 + [0.5] * 2)
    with pytest.raises(AssertionError, match="untrained: the reference decides only 8 of 10 images by 1.0"):
        assert_same_classes_where_decided(reference, reference, MARGIN, "untrained")


def test_fastcifar_test_seed_is_the_train_seed(monkeypatch):
    """Sabotage: train_seed ignoring the variable (FASTCIFAR_TEST_SEED=N would check one seed N times)."""
    from conftest import train_seed

    seed = train_seed.__wrapped__  # the fixture's own function
    monkeypatch.delenv("FASTCIFAR_TEST_SEED", raising=False)
    assert seed() == 0
    monkeypatch.setenv("FASTCIFAR_TEST_SEED", "3")
    assert seed() == 3
    for bad in ("x", "-1", "1.5"):
        monkeypatch.setenv("FASTCIFAR_TEST_SEED", bad)
        with pytest.raises(pytest.UsageError, match="FASTCIFAR_TEST_SEED must be a non-negative integer"):
            seed()
