"""The training engine, end to end on tiny learnable data (CPU)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcifar.checkpoint import load_model
from fastcifar.config import TrainConfig, get_args_parser, parse_config
from fastcifar.errors import UserError, run_cli
from fastcifar.checkpoint import load_checkpoint
from fastcifar.recipe import build_model, build_optimizer, build_scheduler, epoch_steps
from fastcifar.train import main
from synthetic import write_learnable_dataset

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


@pytest.mark.parametrize("anneal", ["linear", "cos"])
def test_one_cycle_peaks_at_pct_start_and_ends_at_lr_over_both_divs(anneal):
    config = TrainConfig(epochs=10, lr=0.4, pct_start=0.25, div_factor=20, final_div_factor=200, anneal=anneal)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(config, model, torch.device("cpu"))
    sched = build_scheduler(config, opt, steps_per_epoch=10)
    lrs, moms = [], []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    peak = int(np.argmax(lrs))
    assert abs(peak - 0.25 * 100) <= 1 and lrs[peak] == pytest.approx(0.4)
    assert lrs[0] == pytest.approx(0.4 / 20)
    assert lrs[-1] == pytest.approx(0.4 / (20 * 200))
    assert moms[0] == pytest.approx(0.9) and moms[peak] == pytest.approx(0.85)  # momentum cycles inversely


@pytest.mark.parametrize("epochs, expected", [(3, [10, 10, 10]), (2.5, [10, 10, 5]), (0.01, [1]), (1.04, [10]),
                                              (1.06, [10, 1])])
def test_epoch_steps_end_a_fractional_last_epoch_early(epochs, expected):
    assert epoch_steps(TrainConfig(epochs=epochs), steps_per_epoch=10) == expected


def test_fractional_epochs_train_that_many_steps_and_finish_the_cycle(learnable, tmp_path):
    out = tmp_path / "run"
    s = train(learnable, out, "--epochs", "1.5", "--no-plots", "--no-tta")  # 12 steps per epoch: 12 + 6
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and rows[-1]["test_acc"]
    run = load_checkpoint(out / "checkpoint.pt")["run"]
    assert len(run["lrs"]) == 18 and run["images"] == 18 * 32
    assert run["lrs"][-1] == pytest.approx(0.2 / (20 * 200), rel=0.05)  # the one cycle ends where it should
    assert s["epochs"] == 1.5


def test_frozen_bn_scales_and_bias_lr_group():
    config = TrainConfig(width=4, epochs=1, lr=0.4, weight_decay=5e-4, bn_weight=False, bias_lr=64.0)
    model = build_model(config, 10, torch.device("cpu"))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not bn.weight.requires_grad and bool((bn.weight == 1).all()) for bn in bns)
    opt = build_optimizer(config, model, torch.device("cpu"))
    rest, biases = opt.param_groups
    assert {id(p) for p in biases["params"]} == {id(bn.bias) for bn in bns}
    assert all(p.requires_grad for p in rest["params"]) and len(rest["params"]) + len(biases["params"]) == len(
        [p for p in model.parameters() if p.requires_grad])
    sched = build_scheduler(config, opt, steps_per_epoch=20)
    lrs = []
    for _ in range(20):
        lrs.append((rest["lr"], biases["lr"]))
        opt.step()
        sched.step()
    assert max(b for _, b in lrs) == pytest.approx(64 * max(r for r, _ in lrs))
    # the same weight decay per step: lr * weight_decay is equal in both groups
    assert biases["weight_decay"] * 64 == pytest.approx(rest["weight_decay"])


def test_no_bias_lr_means_one_group():
    model = build_model(TrainConfig(width=4), 10, torch.device("cpu"))
    opt = build_optimizer(TrainConfig(width=4), model, torch.device("cpu"))
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


def test_adam_cycles_beta1():
    config = TrainConfig(optimizer="adam", epochs=1, lr=0.01, momentum=0.95, min_momentum=0.85)
    opt = build_optimizer(config, torch.nn.Linear(2, 2), torch.device("cpu"))
    build_scheduler(config, opt, steps_per_epoch=10)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["betas"][0] == pytest.approx(0.95)


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
