"""The clocks of a run stopped mid-epoch and resumed: train_seconds keeps the epochs finished before the stop
and wall_seconds continues from the checkpoint's, so a resumed run reports the same kind of numbers as one
that never stopped.

    pytest -q tests/test_resume_timing.py

Sabotages that fail here: the checkpoint's train_seconds not restored; start_seed's wall-clock origin
ignoring the checkpoint's wall_seconds.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch

import fastcifar.train as train_mod
from fastcifar.checkpoint import load_checkpoint
from synthetic import write_learnable_dataset

NAP = 0.1
FAST = ["--width", "4", "--batch-size", "32", "--device", "cpu", "--no-plots", "--no-tta", "--epochs", "2"]


class SlowLoss(torch.nn.CrossEntropyLoss):
    """Each training step takes at least NAP seconds; the `at`-th call sends SIGINT (mid-epoch)."""

    calls = 0
    at = 0

    def forward(self, logits, labels):
        type(self).calls += 1
        time.sleep(NAP)
        if type(self).calls == self.at:
            signal.raise_signal(signal.SIGINT)
        return super().forward(logits, labels)


def test_a_resumed_run_keeps_the_seconds_before_the_stop(tmp_path, monkeypatch):
    data = write_learnable_dataset(tmp_path / "data", train_per_class=24, test_per_class=2)  # 7 steps/epoch
    out = tmp_path / "run"
    monkeypatch.setattr(train_mod.nn, "CrossEntropyLoss", SlowLoss)
    SlowLoss.calls, SlowLoss.at = 0, 7 + 5  # the 5th step of epoch 2
    with pytest.raises(SystemExit) as stop:
        train_mod.main(["--data-dir", str(data), "--out-dir", str(out), *FAST])
    assert stop.value.code == 130
    assert load_checkpoint(out / "checkpoint.pt")["run"]["epoch"] == 1  # epoch 2 is trained again
    SlowLoss.at = 0
    assert train_mod.main(["--resume", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    steps = 2 * 7
    assert summary["train_seconds"] >= steps * NAP          # epoch 1, trained before the stop, is counted
    assert summary["wall_seconds"] >= summary["run_seconds"] >= steps * NAP
    assert sum(summary["runs"]["train_seconds"]) == summary["train_seconds"]
