"""Nothing lost: exact resume, interrupts, kill -9, non-finite loss."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastcifar.train as train_mod
from fastcifar.checkpoint import load_checkpoint
from fastcifar.errors import run_cli
from synthetic import write_learnable_dataset

REPO = Path(__file__).resolve().parent.parent
FAST = ["--width", "8", "--batch-size", "32", "--device", "cpu", "--lr", "0.2", "--no-plots", "--no-tta"]


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("learnable"), train_per_class=24, test_per_class=4)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def metric_rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in csv.DictReader((run / "metrics.csv").open())]


class SignalAtCall(torch.nn.CrossEntropyLoss):
    """A loss that sends this process `signum` on its n-th call: an interrupt in the middle of an epoch."""

    calls = 0
    at = 10
    signum = signal.SIGINT

    def forward(self, logits, labels):
        type(self).calls += 1
        if type(self).calls == self.at:
            signal.raise_signal(self.signum)
        return super().forward(logits, labels)


@pytest.mark.parametrize("signum, code, extra", [(signal.SIGINT, 130, []), (signal.SIGTERM, 143, []),
                                                 (signal.SIGINT, 130, ["--lookahead"])])
def test_interrupted_mid_epoch_then_resumed_equals_uninterrupted(learnable, tmp_path, monkeypatch, capsys,
                                                                 signum, code, extra):
    args = ["--data-dir", str(learnable), *FAST, "--epochs", "3", *extra]
    assert train_mod.main([*args, "--out-dir", str(tmp_path / "a")]) == 0

    SignalAtCall.calls, SignalAtCall.signum = 0, signum
    SignalAtCall.at = 7 + 4  # 7 steps per epoch: the 4th step of epoch 2
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stop:
        patch.setattr(train_mod.nn, "CrossEntropyLoss", SignalAtCall)
        train_mod.main([*args, "--out-dir", str(tmp_path / "b")])
    assert stop.value.code == code
    assert "--resume" in capsys.readouterr().err
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ckpt["run"]["epoch"] == 1 and ckpt["run"]["step_in_epoch"] == 4
    assert not (tmp_path / "b" / "model.safetensors").exists()

    assert train_mod.main(["--resume", str(tmp_path / "b")]) == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-exact on the CPU
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")


def test_resume_after_a_finished_epoch_is_exact(learnable, tmp_path, monkeypatch):
    args = ["--data-dir", str(learnable), *FAST, "--epochs", "3", "--runs", "2"]
    assert train_mod.main([*args, "--out-dir", str(tmp_path / "a")]) == 0
    SignalAtCall.calls, SignalAtCall.signum, SignalAtCall.at = 0, signal.SIGINT, 3 * 7 + 7 + 1
    with monkeypatch.context() as patch, pytest.raises(SystemExit):  # stops in the second seed's second epoch
        patch.setattr(train_mod.nn, "CrossEntropyLoss", SignalAtCall)
        train_mod.main([*args, "--out-dir", str(tmp_path / "b")])
    assert train_mod.main(["--resume", str(tmp_path / "b")]) == 0
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())["runs"]
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())["runs"]
    assert sa["test_acc"] == sb["test_acc"] and sa["seeds"] == sb["seeds"] == [0, 1]
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_inside_a_fractional_last_epoch(learnable, tmp_path, monkeypatch):
    args = ["--data-dir", str(learnable), *FAST, "--epochs", "2.5"]  # 7 + 7 + 4 steps
    assert train_mod.main([*args, "--out-dir", str(tmp_path / "a")]) == 0
    SignalAtCall.calls, SignalAtCall.signum, SignalAtCall.at = 0, signal.SIGINT, 7 + 7 + 2
    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(train_mod.nn, "CrossEntropyLoss", SignalAtCall)
        train_mod.main([*args, "--out-dir", str(tmp_path / "b")])
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ckpt["run"]["epoch"] == 2 and ckpt["run"]["step_in_epoch"] == 2
    assert train_mod.main(["--resume", str(tmp_path / "b")]) == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b") and len(metric_rows(tmp_path / "a")) == 3


def test_kill_9_leaves_a_resumable_checkpoint(tmp_path):
    data = write_learnable_dataset(tmp_path / "data", train_per_class=30, test_per_class=2)
    out = tmp_path / "run"
    env = {**os.environ, "FASTCIFAR_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "fastcifar.train", "--data-dir", str(data), "--out-dir", str(out), *FAST,
           "--batch-size", "8", "--epochs", "6"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoint.pt").exists():
            time.sleep(0.05)
        time.sleep(0.2)  # somewhere inside a later epoch, possibly while a checkpoint is being written
    finally:
        proc.kill()
        proc.wait()
    ckpt = load_checkpoint(out / "checkpoint.pt")  # complete, never half-written
    done = ckpt["run"]["epoch"]
    assert 1 <= done < 6
    resumed = subprocess.run([sys.executable, "-m", "fastcifar.train", "--resume", str(out), "--epochs", "6"],
                             env=env, capture_output=True, text=True, timeout=300)
    # --epochs that agrees with the checkpoint is accepted (a different value is an error: test_resume_flags)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["epochs"] == 6


def test_non_finite_loss_stops_with_step_and_lr(learnable, tmp_path, capsys):
    out = tmp_path / "run"
    code = run_cli(train_mod.main, ["--data-dir", str(learnable), "--out-dir", str(out), *FAST,
                                    "--epochs", "3", "--lr", "1e6", "--label-smoothing", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "non-finite" in err[0] and "step" in err[0] and "lr" in err[0]
    assert not (out / "model.safetensors").exists()


def test_a_stop_after_a_non_finite_loss_keeps_the_last_good_checkpoint(learnable, tmp_path, monkeypatch, capsys):
    """Sabotage: the signal path saving checkpoint.pt although a step of the epoch went non-finite."""
    real = train_mod.train_one_epoch
    epochs, good = [], []
    out = tmp_path / "run"

    def diverge_then_stop(*args, **kwargs):
        epochs.append(1)
        if len(epochs) < 2:
            return real(*args, **kwargs)
        good.append((out / "checkpoint.pt").read_bytes())
        state = args[8]  # the StepState: step 0 of this epoch went non-finite, then a signal arrived
        state.first_bad_step = torch.zeros_like(state.first_bad_step)
        raise train_mod.StopRequested

    monkeypatch.setattr(train_mod, "train_one_epoch", diverge_then_stop)
    with pytest.raises(SystemExit):
        train_mod.main(["--data-dir", str(learnable), "--out-dir", str(out), *FAST, "--epochs", "3"])
    assert (out / "checkpoint.pt").read_bytes() == good[0]  # the one written after epoch 1, untouched
    assert "last good checkpoint is kept" in capsys.readouterr().err


def test_the_lr_named_for_a_non_finite_step_counts_the_steps_before_a_resume():
    """Sabotage: indexing only the lrs since the resume (step 2 of an epoch resumed at step 50)."""
    from fastcifar.train import lr_of_step

    earlier_epochs, before_stop, after_resume = [0.1] * 10, [0.2 + i / 1000 for i in range(50)], [0.3] * 47
    assert lr_of_step(earlier_epochs + before_stop + after_resume, 97, 2) == before_stop[2]
    assert lr_of_step(earlier_epochs + before_stop + after_resume, 97, 60) == 0.3
