"""fastcifar.plots: what the training curves and the confusion matrix draw, read off the matplotlib figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastcifar import plots


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plots would save, kept open for the test (closed after)."""
    kept: list = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: kept.append(fig))
    yield kept
    for fig in kept:
        plots.pyplot().close(fig)


def test_confusion_cells_count_true_rows_and_predicted_columns(figures):
    """Cell (row true i, column predicted j) shows the count of class i predicted as j, white on dark cells.
    Sabotage: the cell text transposed (drawn at row j, column i)."""
    labels, preds = np.array([0, 0, 0, 1, 2]), np.array([1, 1, 0, 1, 2])
    plots.save_confusion("unused.png", labels, preds, ["cat", "dog", "ship"])
    ax = figures[0].axes[0]
    cells = {tuple(map(float, t.get_position())): (t.get_text(), t.get_color()) for t in ax.texts}
    counts = [[1, 2, 0], [0, 1, 0], [0, 0, 1]]  # rows: true class
    white = {(0, 1), (1, 1), (2, 2)}  # row fraction above one half
    assert cells == {(float(j), float(i)): (str(counts[i][j]), "white" if (i, j) in white else "black")
                     for i in range(3) for j in range(3)}
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
    assert ax.get_title() == "confusion matrix (accuracy 0.6000)"
    assert [t.get_text() for t in ax.get_xticklabels()] == [t.get_text() for t in ax.get_yticklabels()] == \
        ["cat", "dog", "ship"]


def test_curves_have_titles_epoch_axes_grids_and_the_lr_per_step(figures):
    """Sabotage: a panel's title, x label or grid dropped; the test curve drawing evaluations that did not run."""
    nan = math.nan
    rows = [{"epoch": e, "train_loss": 2.0 / e, "test_loss": t_loss, "train_acc": 0.3 * e, "test_acc": t_acc}
            for e, t_loss, t_acc in [(1, nan, nan), (2, 1.1, 0.5), (3, 0.9, 0.6)]]
    lrs = [0.1, 0.2, 0.3, 0.2, 0.1, 0.05]
    plots.save_curves("unused.png", rows, lrs, steps_per_epoch=2)
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["loss", "accuracy", "learning rate"]
    for ax in axes:
        assert ax.get_xlabel() == "epoch"
        assert all(line.get_visible() for line in ax.xaxis.get_gridlines() + ax.yaxis.get_gridlines()), \
            ax.get_title()
    for ax, key in zip(axes, ("loss", "acc")):
        train, test = ax.get_lines()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "test"]
        assert list(train.get_xdata()) == [1, 2, 3] and list(test.get_xdata()) == [2, 3]
        assert list(test.get_ydata()) == [r[f"test_{key}"] for r in rows[1:]]
    (lr,) = axes[2].get_lines()
    assert list(lr.get_xdata()) == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0]) and list(lr.get_ydata()) == lrs
