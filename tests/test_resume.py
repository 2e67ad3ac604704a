"""Nothing lost: a stop keeps the last finished epoch's checkpoint, a resume from it equals the run that
never stopped (bit-exact on the CPU), kill -9 leaves a complete checkpoint, a non-finite loss is one line.

    pytest -q tests/test_resume.py
"""

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
def test_a_stop_mid_epoch_then_resume_equals_the_uninterrupted_run(learnable, tmp_path, monkeypatch, capsys,
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
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["run"]["epoch"] == 1  # the epoch finished last
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
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["run"]["epoch"] == 2
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


def test_a_stop_leaves_the_last_finished_epochs_checkpoint_byte_for_byte(learnable, tmp_path, monkeypatch, capsys):
    """Sabotage: the stop path writing checkpoint.pt (with the abandoned epoch's half-trained weights, or after a
    non-finite loss) instead of keeping the one written after the last finished epoch."""
    real = train_mod.train_one_epoch
    epochs, good = [], []
    out = tmp_path / "run"

    def diverge_then_stop(model, criterion, optimizer, *args, **kwargs):
        epochs.append(1)
        if len(epochs) < 2:
            return real(model, criterion, optimizer, *args, **kwargs)
        good.append((out / "checkpoint.pt").read_bytes())
        with torch.no_grad():  # a step of this epoch went non-finite, then a signal arrived
            next(model.parameters()).fill_(float("nan"))
        raise train_mod.StopRequested

    monkeypatch.setattr(train_mod, "train_one_epoch", diverge_then_stop)
    with pytest.raises(SystemExit):
        train_mod.main(["--data-dir", str(learnable), "--out-dir", str(out), *FAST, "--epochs", "3"])
    assert (out / "checkpoint.pt").read_bytes() == good[0]  # the one written after epoch 1, untouched
    assert "checkpoint of the last finished epoch is kept" in capsys.readouterr().err


def test_a_stop_before_the_first_checkpoint_says_there_is_none(learnable, tmp_path, monkeypatch, capsys):
    SignalAtCall.calls, SignalAtCall.signum, SignalAtCall.at = 0, signal.SIGTERM, 3
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stop:
        patch.setattr(train_mod.nn, "CrossEntropyLoss", SignalAtCall)
        train_mod.main(["--data-dir", str(learnable), "--out-dir", str(tmp_path / "run"), *FAST, "--epochs", "2"])
    assert stop.value.code == 143 and not (tmp_path / "run" / "checkpoint.pt").exists()
    assert "no checkpoint was written yet" in capsys.readouterr().err
