"""The training engine, end to end on tiny learnable data (CPU)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcifar.checkpoint import load_checkpoint, load_model
from fastcifar.config import TrainConfig
from fastcifar.distributed import Dist
from fastcifar.errors import UserError, run_cli
from fastcifar.model import ResNet9
from fastcifar.train import main, setup
from synthetic import write_learnable_dataset


CPU = torch.device("cpu")
FAST = ["--width", "8", "--batch-size", "32", "--device", "cpu", "--lr", "0.2"]


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("learnable"), train_per_class=40, test_per_class=10)


def train(data: Path, out: Path, *extra: str) -> dict:
    assert main(["--data-dir", str(data), "--out-dir", str(out), *FAST, *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_two_epochs_learn_far_above_chance_and_write_every_artifact(learnable, tmp_path):
    out = tmp_path / "run"
    s = train(learnable, out, "--epochs", "2")
    assert s["test_acc"] >= 0.3  # chance is 0.1 (0.03 std on 100 images); a model that learned is far above
    for key in ("test_acc", "test_acc_tta", "train_seconds", "compile_seconds", "images_per_second", "epochs",
                "params", "device", "torch", "runs"):
        assert key in s
    assert s["epochs"] == 2 and s["params"] > 0 and s["images_per_second"] > 0
    for name in ("config.json", "metrics.csv", "summary.json", "model.safetensors", "checkpoint.pt",
                 "curves.png", "confusion.png", "misclassified.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) >= {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds"}
    assert json.loads((out / "config.json").read_text())["width"] == 8
    assert not list(out.glob(".*tmp"))


def test_shuffled_training_labels_stay_near_chance(tmp_path):
    data = write_learnable_dataset(tmp_path / "shuffled", 40, 10, shuffle_train_labels=True)
    s = train(data, tmp_path / "run", "--epochs", "3", "--no-plots")
    assert s["test_acc"] < 0.3  # a leak of test data into training would show up here


def test_checkpoint_round_trip_gives_identical_logits(learnable, tmp_path):
    out = tmp_path / "run"
    train(learnable, out, "--epochs", "1", "--no-plots", "--no-tta")
    model, info = load_model(out)
    again, _ = load_model(out / "model.safetensors")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert info.config.width == 8 and len(info.classes) == 10 and len(info.mean) == 3
    assert info.test_acc == json.loads((out / "summary.json").read_text())["test_acc"]


def test_multiple_runs_report_mean_and_std(learnable, tmp_path):
    s = train(learnable, tmp_path / "run", "--epochs", "1", "--runs", "2", "--no-plots")
    runs = s["runs"]
    assert runs["seeds"] == [0, 1] and len(runs["test_acc"]) == 2
    assert runs["mean"] == pytest.approx(np.mean(runs["test_acc"]))
    assert runs["std"] == pytest.approx(np.std(runs["test_acc"], ddof=1))


def test_existing_results_are_not_overwritten_without_flag(learnable, tmp_path, capsys):
    out = tmp_path / "run"
    train(learnable, out, "--epochs", "1", "--no-plots")
    before = (out / "summary.json").read_bytes()
    code = run_cli(main, ["--data-dir", str(learnable), "--out-dir", str(out), *FAST, "--epochs", "1"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before
    train(learnable, out, "--epochs", "1", "--no-plots", "--overwrite")


def test_fractional_epochs_train_that_many_steps_and_finish_the_cycle(learnable, tmp_path):
    out = tmp_path / "run"
    s = train(learnable, out, "--epochs", "1.5", "--no-plots", "--no-tta")  # 12 steps per epoch: 12 + 6
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and rows[-1]["test_acc"]
    run = load_checkpoint(out / "checkpoint.pt")["run"]
    assert len(run["lrs"]) == 18 and run["images"] == 18 * 32
    assert run["lrs"][-1] == pytest.approx(0.2 / (20 * 200), rel=0.05)  # the one cycle ends where it should
    assert s["epochs"] == 1.5


def test_shift_translates_exactly_and_tta_averages_views():
    from fastcifar.evaluate import shift, tta_logits

    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    moved = shift(x, 1, 1)
    assert torch.equal(moved[..., 1:, 1:], x[..., :-1, :-1])  # content moves down-right by one pixel
    assert torch.equal(shift(x, -1, -1)[..., :-1, :-1], x[..., 1:, 1:])

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 4))
    views = [x, x.flip(3)]
    want = torch.stack([model(v) for v in views]).mean(0)
    torch.testing.assert_close(tta_logits(model, x), want)
    moved = [shift(v, t, t) for v in views for t in (1, -1)]
    want2 = 0.5 * want + 0.5 * torch.stack([model(v) for v in moved]).mean(0)
    torch.testing.assert_close(tta_logits(model, x, 1), want2)


def test_evaluate_command_reports_three_views(learnable, tmp_path, capsys, monkeypatch):
    """Each printed line is the evaluation of its own view: plain, flip TTA, flip + translate TTA. fp32 at the
    run's batch size, so the plain line repeats the run's own evaluation on every CPU."""
    import fastcifar.evaluate
    from fastcifar.evaluate import main as evaluate_main

    out = tmp_path / "run"
    train(learnable, out, "--epochs", "1", "--no-plots", "--no-amp")
    calls = []
    evaluate = fastcifar.evaluate.evaluate

    def spy(*args, tta=False, tta_translate=0, **kwargs):
        result = evaluate(*args, tta=tta, tta_translate=tta_translate, **kwargs)
        calls.append(((tta, tta_translate), result["acc"]))
        return result

    monkeypatch.setattr(fastcifar.evaluate, "evaluate", spy)
    assert evaluate_main(["--checkpoint", str(out), "--data-dir", str(learnable), "--device", "cpu", "--no-amp",
                          "--batch-size", FAST[FAST.index("--batch-size") + 1], "--tta-translate", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[-3:]
    assert [ln.split()[0] for ln in lines] == ["plain", "flip", "flip"] and "translate 2" in lines[2]
    assert [views for views, _ in calls] == [(False, 0), (True, 0), (True, 2)]
    assert [float(ln.split()[-1].rstrip("%")) / 100 for ln in lines] == [pytest.approx(acc, abs=1e-4)
                                                                        for _, acc in calls]
    plain = float(lines[0].split()[-1].rstrip("%")) / 100  # the console shows percent
    assert plain == pytest.approx(json.loads((out / "summary.json").read_text())["test_acc"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("tiny"), train_per_class=6, test_per_class=2)


def test_label_smoothing_amp_compile_and_download_reach_the_session(tiny_dir, tmp_path, monkeypatch,
                                                                    smoothed_cross_entropy):
    """Sabotage: CrossEntropyLoss() without label_smoothing; amp_dtype(device, False) in setup; the compile
    mode or the compile flag ignored; download=None passed to load_cifar10."""
    import fastcifar.data
    import fastcifar.runtime

    monkeypatch.setattr(fastcifar.runtime, "cpu_native_bf16", lambda: True)  # as on a CPU with AVX-512 BF16
    compiled, downloads = [], []
    monkeypatch.setattr(ResNet9, "compile", lambda self, mode=None, **kw: compiled.append(mode), raising=False)
    load = fastcifar.data.load_cifar10
    monkeypatch.setattr(fastcifar.data, "load_cifar10",
                        lambda path, download=None: downloads.append(download) or load(path, download=download))
    on = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path / "on"), device="cpu", width=4,
                     label_smoothing=0.3, amp=True, compile=True, compile_mode="max-autotune", download=True,
                     batch_size=20)
    s = setup(on, resume=False, dist=Dist(), device=CPU)
    logits, labels = torch.randn(6, 10), torch.arange(6)
    reference = smoothed_cross_entropy(logits.double().numpy(), labels.numpy(), 0.3)
    assert float(s.criterion(logits, labels)) == pytest.approx(reference, rel=1e-5)
    assert s.dtype == torch.bfloat16 and s.clocks["compile_seconds"] is not None and compiled == ["max-autotune"]
    off = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path / "off"), device="cpu", width=4,
                      label_smoothing=0.0, amp=False, compile=None, batch_size=20)
    s = setup(off, resume=False, dist=Dist(), device=CPU)
    reference = smoothed_cross_entropy(logits.double().numpy(), labels.numpy(), 0.0)
    assert float(s.criterion(logits, labels)) == pytest.approx(reference, rel=1e-5)
    assert s.dtype is None and s.clocks["compile_seconds"] is None and compiled == ["max-autotune"]  # CPU: off
    assert downloads == [True, None]  # --no-download means "only when missing and online": None


def test_sync_bn_is_refused_on_the_cpu_under_torchrun(tiny_dir, tmp_path):
    """Sabotage: config.sync_bn ignored in setup (the run would go on with per-rank statistics)."""
    config = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path / "run"), device="cpu", width=4, sync_bn=True,
                         batch_size=8)
    with pytest.raises(UserError, match="--sync-bn"):
        setup(config, resume=False, dist=Dist(rank=0, world_size=2), device=CPU)


def test_seed_runs_eval_every_checkpoint_every_plots_and_tta_shape_the_run(tiny_dir, tmp_path):
    """Sabotage: seed = run_index in start_seed; eval_every ignored (every epoch); checkpoint_every ignored;
    plots written regardless; flip TTA run regardless of --no-tta."""
    out = tmp_path / "run"
    assert main(["--data-dir", str(tiny_dir), "--out-dir", str(out), "--width", "4", "--batch-size", "20",
                 "--device", "cpu", "--epochs", "3", "--seed", "3", "--runs", "2", "--eval-every", "2",
                 "--checkpoint-every", "0", "--no-plots", "--no-tta"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"]["seeds"] == [3, 4] and summary["test_acc_tta"] is None and summary["tta"] is None
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    evaluated = [(r["seed"], r["epoch"]) for r in rows if not math.isnan(float(r["test_acc"]))]
    assert evaluated == [("3", "2"), ("3", "3"), ("4", "2"), ("4", "3")]  # every 2nd epoch and the last
    assert not (out / "checkpoint.pt").exists() and not list(out.glob("*.png"))
    assert (out / "model.safetensors").exists()
