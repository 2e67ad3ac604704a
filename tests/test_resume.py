"""Nothing lost: a stop keeps the last finished epoch's checkpoint, a resume from it equals the run that
never stopped (bit-exact on the CPU), kill -9 leaves a complete checkpoint, a non-finite loss is one line;
--resume refuses recipe flags that disagree with the checkpoint, keeps the seconds before the stop and restores
the grad scaler.

    pytest -q tests/test_resume.py
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastcifar.train as train_mod
from fastcifar.checkpoint import load_checkpoint
from fastcifar.errors import run_cli
from fastcifar.train import main
from synthetic import write_learnable_dataset


REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    # --epochs that agrees with the checkpoint is accepted (a different value is an error:
    # test_a_recipe_flag_that_disagrees_with_the_checkpoint_is_a_one_line_error)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["epochs"] == 6


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_lr(learnable, tmp_path, capsys):
    out = tmp_path / "run"
    code = run_cli(train_mod.main, ["--data-dir", str(learnable), "--out-dir", str(out), *FAST,
                                    "--epochs", "3", "--lr", "1e6", "--label-smoothing", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "non-finite" in err[0] and "step" in err[0] and "lr" in err[0]
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
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
    assert "the last checkpoint written (every --checkpoint-every epochs) is kept" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stop_before_the_first_checkpoint_says_there_is_none(learnable, tmp_path, monkeypatch, capsys):
    SignalAtCall.calls, SignalAtCall.signum, SignalAtCall.at = 0, signal.SIGTERM, 3
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stop:
        patch.setattr(train_mod.nn, "CrossEntropyLoss", SignalAtCall)
        train_mod.main(["--data-dir", str(learnable), "--out-dir", str(tmp_path / "run"), *FAST, "--epochs", "2"])
    assert stop.value.code == 143 and not (tmp_path / "run" / "checkpoint.pt").exists()
    assert "no checkpoint was written yet" in capsys.readouterr().err


def test_resume_restores_the_grad_scaler(tmp_path):
    """Sabotage: Training.restore skipping the GradScaler (an fp16 run would resume at the initial loss scale,
    not the one it had reached)."""
    from fastcifar.checkpoint import RunState, Training

    def training(scale: float, enabled: bool = True) -> Training:
        model = nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=enabled)
        return Training(model, opt, sched, scaler, None, [], RunState())

    training(8.0).save(tmp_path / "checkpoint.pt", {}, CPU)
    fresh = training(65536.0)
    fresh.restore(load_checkpoint(tmp_path / "checkpoint.pt"), CPU)
    assert fresh.scaler.get_scale() == 8.0
    # --amp-dtype auto resumed on a GPU without native bf16: the bf16 run saved a disabled scaler's empty state,
    # which an enabled scaler cannot load (torch raises); the fp16 run starts its scale afresh instead
    training(8.0, enabled=False).save(tmp_path / "checkpoint.pt", {}, CPU)
    afresh = training(65536.0)
    afresh.restore(load_checkpoint(tmp_path / "checkpoint.pt"), CPU)
    assert afresh.scaler.get_scale() == 65536.0


RESUME_FAST = ["--width", "8", "--batch-size", "32", "--device", "cpu", "--lr", "0.2", "--no-tta"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A one-epoch run without plots: its checkpoint is the state after the last epoch."""
    root = tmp_path_factory.mktemp("resume")
    data = write_learnable_dataset(root / "data", train_per_class=24, test_per_class=4)
    out = root / "run"
    assert main(["--data-dir", str(data), "--out-dir", str(out), *RESUME_FAST, "--epochs", "1", "--no-plots"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("flags, named", [(["--lr", "0.5"], "--lr"), (["--epochs", "3"], "--epochs"),
                                          (["--width", "16"], "--width"), (["-b", "16"], "--batch-size"),
                                          (["--preset", "speedrun"], "--")])
def test_a_recipe_flag_that_disagrees_with_the_checkpoint_is_a_one_line_error(finished_run, capsys, flags, named,
                                                                              one_line_error):
    before = (finished_run / "summary.json").read_bytes()
    assert run_cli(main, ["--resume", str(finished_run), *flags]) == 2
    line = one_line_error()
    assert named in line and "checkpoint" in line
    assert (finished_run / "summary.json").read_bytes() == before  # nothing ran


@pytest.mark.slow
def test_agreeing_recipe_flags_and_environment_flags_are_accepted(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    assert not (run / "curves.png").exists()
    # given checkpoint.pt, not the directory; --plots (environment) is honoured, --width 8 agrees
    assert main(["--resume", str(run / "checkpoint.pt"), "--plots", "--width", "8", "--eval-every", "3"]) == 0
    assert (run / "curves.png").exists() and (run / "confusion.png").exists()
    saved = load_checkpoint(run / "checkpoint.pt")["config"]
    assert saved["width"] == 8 and saved["lr"] == 0.2


@pytest.mark.slow
def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(finished_run, tmp_path, capsys, one_line_error):
    """A checkpoint written while mid-epoch stops were saved (format 1: step_in_epoch, partial) names its
    format instead of failing inside RunState."""

    run = tmp_path / "old"
    shutil.copytree(finished_run, run)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    ckpt["format"], ckpt["run"]["step_in_epoch"], ckpt["run"]["partial"] = 1, 0, {}
    torch.save(ckpt, run / "checkpoint.pt")
    assert run_cli(main, ["--resume", str(run)]) == 2
    assert "format 1" in one_line_error()


def test_resume_of_a_missing_directory_names_both_forms(tmp_path, capsys, one_line_error):
    assert run_cli(main, ["--resume", str(tmp_path / "nope")]) == 2
    assert "checkpoint.pt" in one_line_error()


NAP = 0.1


TIMED_FAST = ["--width", "4", "--batch-size", "32", "--device", "cpu", "--no-plots", "--no-tta", "--epochs", "2"]


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


@pytest.mark.slow
def test_a_resumed_run_keeps_the_seconds_before_the_stop(tmp_path, monkeypatch):
    data = write_learnable_dataset(tmp_path / "data", train_per_class=24, test_per_class=2)  # 7 steps/epoch
    out = tmp_path / "run"
    monkeypatch.setattr(train_mod.nn, "CrossEntropyLoss", SlowLoss)
    SlowLoss.calls, SlowLoss.at = 0, 7 + 5  # the 5th step of epoch 2
    with pytest.raises(SystemExit) as stop:
        train_mod.main(["--data-dir", str(data), "--out-dir", str(out), *TIMED_FAST])
    assert stop.value.code == 130
    assert load_checkpoint(out / "checkpoint.pt")["run"]["epoch"] == 1  # epoch 2 is trained again
    SlowLoss.at = 0
    assert train_mod.main(["--resume", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    steps = 2 * 7
    assert summary["train_seconds"] >= steps * NAP          # epoch 1, trained before the stop, is counted
    assert summary["wall_seconds"] >= summary["run_seconds"] >= steps * NAP
    assert sum(summary["runs"]["train_seconds"]) == summary["train_seconds"]
