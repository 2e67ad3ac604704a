"""Atomic writes (fastcifar.atomic): a reader sees the old complete file or the new complete one, never a
half-written one; metrics.csv and summary.json go through them.

    pytest -q tests/test_atomic.py

Sabotages that fail here: atomic_path yielding the target path itself (writing in place); write_metrics
writing with Path.write_text instead of the atomic write_text.
"""

from __future__ import annotations

import json

import pytest

from fastcifar import atomic
from fastcifar.atomic import write_json
from fastcifar.report import SUMMARY_FILE, write_metrics


class Boom(Exception):
    pass


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(Boom), atomic.atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent  # same directory: rename is atomic
        tmp.write_text("half")
        raise Boom
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    atomic.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


@pytest.mark.parametrize("write", ["metrics", "summary"])
def test_metrics_and_summary_are_replaced_in_one_rename(tmp_path, monkeypatch, write):
    """A crash before the rename (here: os.replace failing) keeps the previous complete file."""
    path = tmp_path / ("metrics.csv" if write == "metrics" else "summary.json")
    path.write_text("previous complete file\n")

    def failing_replace(src, dst):
        raise Boom

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    row = {"seed": 0, "epoch": 1, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
           "test_acc": 0.5, "epoch_seconds": 1.0}
    with pytest.raises(Boom):
        write_metrics(path, [row]) if write == "metrics" else write_json(tmp_path / SUMMARY_FILE, {"test_acc": 0.5})
    assert path.read_text() == "previous complete file\n"


def test_the_new_file_gets_the_umasks_permissions_and_a_taken_temporary_name_is_never_reused(tmp_path,
                                                                                              monkeypatch):
    """Sabotage: the temporary file created 0600 (results unreadable to the group), or without O_EXCL (a file
    already at the temporary name, say a planted link, would be written through)."""
    import os
    import stat
    import uuid

    old = os.umask(0o022)
    try:
        atomic.write_json(tmp_path / "summary.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644
    fixed = uuid.UUID(int=7)
    monkeypatch.setattr(atomic.uuid, "uuid4", lambda: fixed)
    taken = tmp_path / f".metrics.csv.{fixed.hex}.tmp"
    taken.write_text("someone else's")
    with pytest.raises(FileExistsError):
        atomic.write_text(tmp_path / "metrics.csv", "new")
    assert taken.read_text() == "someone else's" and not (tmp_path / "metrics.csv").exists()
