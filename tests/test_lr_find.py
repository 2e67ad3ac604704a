"""LR range test: the ramp, smoothing, early stop, state restoration, suggestions and the command line (CPU)."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

from fastcifar.config import TrainConfig
from fastcifar.lr_find import BETA, get_args_parser, lr_range_test, main, parse_args, suggest
from fastcifar.recipe import build_optimizer
from synthetic import learnable_images, write_learnable_dataset


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def batches(count: int, batch_size: int = 32, seed: int = 0):
    images, labels = learnable_images(20, seed=seed)
    x = (torch.as_tensor(images).permute(0, 3, 1, 2).float() - 128) / 64
    y = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        yield x[idx], y[idx]


def run(model, opt, n_batches=30, **kw):
    kw = dict(start_lr=1e-3, end_lr=1.0, steps=30, diverge=4.0, device="cpu", dtype=None) | kw
    return lr_range_test(model, opt, batches(n_batches), nn.CrossEntropyLoss(), **kw)


def sgd(model, **kw):
    return build_optimizer(TrainConfig(**kw), model, torch.device("cpu"))


def test_curve_is_recorded_with_an_exponential_ramp_and_bias_corrected_ema():
    model = tiny_model()
    r = run(model, sgd(model))
    assert r.stop_reason == "completed" and len(r.lrs) == len(r.losses) == len(r.smoothed) == 30
    assert r.lrs[0] == pytest.approx(1e-3) and r.lrs[-1] == pytest.approx(1.0)
    ratios = np.array(r.lrs[1:]) / np.array(r.lrs[:-1])
    assert ratios == pytest.approx(np.full(29, 1000 ** (1 / 29)), rel=1e-9)
    avg, expected = 0.0, []
    for i, loss in enumerate(r.losses):
        avg = BETA * avg + (1 - BETA) * loss
        expected.append(avg / (1 - BETA ** (i + 1)))
    assert r.smoothed == pytest.approx(expected) and r.smoothed[0] == pytest.approx(r.losses[0])
    assert r.smoothed[-1] < r.smoothed[0]  # it learns on the way up


def test_each_group_ramps_at_its_multiple_of_the_recorded_lr():
    """--bias-lr 4 puts the BatchNorm biases in a group at 4x the lr: the ramp keeps that ratio at every step."""
    model = tiny_model()
    opt = sgd(model, bias_lr=4.0)
    stepped: list[list[float]] = []
    opt.register_step_pre_hook(lambda optimizer, args, kwargs: stepped.append([g["lr"] for g in opt.param_groups]))
    r = run(model, opt, steps=5)
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 4.0]
    assert np.array(stepped) == pytest.approx(np.array([[lr, 4 * lr] for lr in r.lrs]), rel=1e-9)


def test_huge_end_lr_stops_early_on_divergence():
    model = tiny_model()
    r = run(model, sgd(model, weight_decay=0.0), n_batches=200, end_lr=1e8, steps=200)
    assert r.stop_reason in ("diverged", "non-finite") and 3 <= len(r.lrs) < 200
    if r.stop_reason == "diverged":
        assert r.smoothed[-1] > 4.0 * min(r.smoothed)
    assert all(math.isfinite(v) for v in r.losses)


def test_divergence_is_measured_from_the_best_smoothed_loss_so_far(monkeypatch):
    """The smoothed loss falls from 10 to 1, then climbs: it stops at the first value above 4 x 1, long before
    4 x the first value. Sabotage: the base being the first smoothed value, or the latest."""
    import fastcifar.train

    wanted = [10.0, 5.0, 2.0, 1.0, 1.5, 3.0, 4.5, 8.0, 20.0, 50.0]
    raw, avg = [], 0.0
    for i, smooth in enumerate(wanted):  # the raw losses whose bias-corrected EMA is `wanted`
        target = smooth * (1 - BETA ** (i + 1))
        raw.append((target - BETA * avg) / (1 - BETA))
        avg = target
    losses = iter(raw)

    def one_step(model, criterion, optimizer, scheduler, *rest):  # no gradients: the step changes nothing
        optimizer.step()
        scheduler.step()  # the ramp still rises, as the suggestions need
        return torch.tensor([next(losses), 0.0, 1.0, 0.0], dtype=torch.float64), None

    monkeypatch.setattr(fastcifar.train, "train_one_epoch", one_step)
    model = tiny_model()
    r = run(model, sgd(model), steps=len(wanted))
    assert r.stop_reason == "diverged"
    assert r.smoothed == pytest.approx(wanted[:7]) and r.losses == pytest.approx(raw[:7])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_model_and_optimizer_are_left_bit_identical(optimizer):
    model = tiny_model()
    opt = sgd(model, optimizer=optimizer, lr=0.05)
    for x, y in batches(2):  # give the optimizer real state (momentum buffers, Adam moments and step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = [p.grad.clone() for p in model.parameters()]
    opt_before = copy.deepcopy(opt.state_dict())
    assert opt_before["state"]
    r = run(model, opt)
    assert len(r.lrs) > 10
    assert_same(model.state_dict(), model_before)
    assert_same(opt.state_dict(), opt_before)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_before))
    assert not model.training and opt.param_groups[0]["lr"] == 0.05


def test_state_is_restored_when_the_loop_fails():
    model = tiny_model()
    opt = sgd(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def failing():
        yield from batches(5)
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        lr_range_test(model, opt, failing(), nn.CrossEntropyLoss(), start_lr=1e-3, end_lr=1.0, steps=30,
                      diverge=4.0, device="cpu", dtype=None)
    assert_same(model.state_dict(), before)
    assert opt.state_dict()["state"] == {} and opt.param_groups[0]["lr"] == TrainConfig().lr


def test_short_data_is_reported_and_suggestions_lie_within_the_ramp():
    model = tiny_model()
    r = run(model, sgd(model), n_batches=20)
    assert r.stop_reason == "data exhausted" and len(r.lrs) == 20
    r = run(model, sgd(model))
    assert r.suggestion_steepest in r.lrs and 1e-3 <= r.suggestion_steepest <= 1.0
    assert r.suggestion_min_over_10 == pytest.approx(r.lrs[int(np.argmin(r.smoothed))] / 10)
    assert 1e-4 <= r.suggestion_min_over_10 <= 0.1


def test_suggestions_on_an_analytic_curve():
    lrs = list(np.logspace(-4, 1, 101))  # 20 points per decade
    smoothed = list(2 - np.tanh(2 * (np.log10(lrs) + 2)) + 0.5 * np.maximum(np.log10(lrs), 0) ** 2)
    steepest, min_over_10 = suggest(lrs, smoothed)
    assert steepest == pytest.approx(1e-2)  # the inflection of the tanh
    best = lrs[int(np.argmin(smoothed))]
    assert min_over_10 == pytest.approx(best / 10) and 0.5 <= best <= 1.5
    assert all(map(math.isnan, suggest([], [])))
    assert math.isnan(suggest([1e-3, 1e-2], [2.0, 1.0])[0])


def assert_same(a, b):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_writes_plot_and_csv_and_prints_both_suggestions(tmp_path, capsys):
    data = write_learnable_dataset(tmp_path / "data", train_per_class=16, test_per_class=1)
    out = tmp_path / "plots" / "lr.png"
    argv = ["--data-dir", str(data), "--width", "4", "--batch-size", "32", "--device", "cpu", "--no-amp",
            "--steps", "12", "--start-lr", "1e-3", "--end-lr", "1", "--out", str(out)]
    assert main(argv) == 0  # 5 batches per epoch: the ramp cycles through three epochs
    text = capsys.readouterr().out
    assert "steepest descent" in text and "minimum smoothed loss / 10" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "plots" / "lr.csv").open()))
    assert len(rows) == 12 and f"wrote {out} and {tmp_path / 'plots' / 'lr.csv'}" in text
    assert list(rows[0]) == ["step", "lr", "loss", "smoothed"]
    assert float(rows[0]["lr"]) == pytest.approx(1e-3) and float(rows[-1]["lr"]) == pytest.approx(1.0)
    assert not list(out.parent.glob(".*tmp"))


def test_training_flags_and_presets_apply():
    config, args = parse_args(["--width", "16", "--optimizer", "adam", "--momentum", "0.8", "--label-smoothing",
                               "0.1", "--steps", "50", "--start-lr", "1e-5"])
    assert (config.width, config.optimizer, config.momentum, config.label_smoothing) == (16, "adam", 0.8, 0.1)
    assert (args.steps, args.start_lr, args.end_lr, args.diverge, args.out) == (50, 1e-5, 10.0, 4.0, "lr_find.png")
    config, _ = parse_args(["--preset", "seed"])
    assert config.optimizer == "adam" and config.weight_decay == 1e-4
    assert "--start-lr" in get_args_parser().format_help() and "--weight-decay" in get_args_parser().format_help()
