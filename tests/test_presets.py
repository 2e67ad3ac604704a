"""The presets, through `python -m fastcifar.train --preset NAME`: a short run of each (its own net and recipe,
few steps of a small batch on synthetic images) is watched where every setting the preset names lands: the
net built, the whitening of the first layer, the optimizer's groups and lrs over every step, the lookahead,
the flip phases, the whitening bias stopping (also in a second seed, after a resume and at a fractional
epoch), the final TTA. Deleting any value from a preset fails a test here (values equal to the default aside:
changing those to another value does).

    pytest -q tests/test_presets.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from synthetic import write_learnable_dataset

import fastcifar.data
import fastcifar.train
from fastcifar.augment import DeviceLoader, normalize_images
from fastcifar.config import PRESETS, parse_config
from fastcifar.flops import recipe_flops
from fastcifar.model import count_parameters
from fastcifar.runtime import StopRequested

STEPS_PER_EPOCH = 5  # = the lookahead's period: a stopped bias is constant from the next epoch's start
BATCH = 16
EPOCHS = 3.66  # 18.3 steps: 18 rounded, 19 with step_rounding ceil; 4 epochs, the 4th after the bias stops

# What each preset's run must show, written out (not read from PRESETS).
EXPECTED: dict[str, dict[str, Any]] = {
    "speedrun": dict(parameters=2_009_784, prep_bn=False, bn_eps=1e-12, fc_bias=False, dirac=True, steps=19,
                     weight_decay=1.33e-3, whiten_bias_lr_scale=1.0, whiten_bias_stop="grad"),
    "airbench94": dict(parameters=1_972_792, prep_bn=False, bn_eps=1e-12, fc_bias=False, dirac=True, steps=19,
                       weight_decay=0.0153 / 11.5, whiten_bias_lr_scale=1.0, whiten_bias_stop="grad"),
}


@dataclasses.dataclass
class Watched:
    """What the spies saw of one run: per epoch, at its start and its end."""

    data: Any = None
    epochs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    plans: dict[int, Any] = dataclasses.field(default_factory=dict)  # by the loader's epoch
    loaders: list[DeviceLoader] = dataclasses.field(default_factory=list)
    model: Any = None
    lookahead: Any = None
    criterion: Any = None


def snapshot(model, optimizer) -> dict[str, Any]:
    bias = model.whitening_bias()
    return {"bias": bias.detach().clone(), "bias_requires_grad": bias.requires_grad,
            "groups": [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
                       for g in optimizer.param_groups]}


@contextlib.contextmanager
def watching(stop_before: int | None = None) -> Iterator[Watched]:
    """Spies on fastcifar.train's calls while in the block; with `stop_before` N the run is stopped as a signal
    stops it (StopRequested) at the start of its N-th epoch (0-based, counted over the seeds)."""
    seen, patch = Watched(), pytest.MonkeyPatch()
    load, one_epoch, plan_epoch = fastcifar.data.load_cifar10, fastcifar.train.train_one_epoch, DeviceLoader.plan_epoch

    def loading(*args, **kwargs):
        seen.data = load(*args, **kwargs)
        return seen.data

    def training_one_epoch(model, criterion, optimizer, scheduler, scaler, batches, device, dtype, lookahead=None,
                           guard=None):
        if len(seen.epochs) == stop_before:
            raise StopRequested
        seen.model, seen.criterion, seen.lookahead = model, criterion, lookahead
        start = snapshot(model, optimizer)
        start["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        sums, lrs = one_epoch(model, criterion, optimizer, scheduler, scaler, batches, device, dtype, lookahead,
                              guard)
        seen.epochs.append({"start": start, "end": snapshot(model, optimizer), "lrs": lrs})
        return sums, lrs

    def planning(loader):
        epoch = loader.epoch  # the warm-up draws epoch 0's plan, then rewinds the loader: the same plan again
        plan = plan_epoch(loader)
        if loader.train:
            seen.plans[epoch] = plan
            seen.loaders.append(loader)
        return plan

    patch.setattr(fastcifar.data, "load_cifar10", loading)
    patch.setattr(fastcifar.train, "train_one_epoch", training_one_epoch)
    patch.setattr(DeviceLoader, "plan_epoch", planning)
    try:
        yield seen
    finally:
        patch.undo()


def train(name: str, data_dir: Path, out: Path, *flags: str) -> int:
    """The preset NAME through fastcifar.train.main, shrunk: batches of BATCH on the CPU, `flags` added."""
    return fastcifar.train.main(["--preset", name, "--data-dir", str(data_dir), "--out-dir", str(out), "--device",
                                 "cpu", "--batch-size", str(BATCH), "--no-plots", "--no-compile", "--eval-every",
                                 "100", *flags])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """STEPS_PER_EPOCH batches of training images."""
    return write_learnable_dataset(tmp_path_factory.mktemp("data"), train_per_class=STEPS_PER_EPOCH * BATCH // 10,
                                   test_per_class=1)


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def run(request, data_dir, tmp_path_factory) -> tuple[str, Watched, Path]:
    """One short run of the preset through fastcifar.train.main, with spies on the loop's calls."""
    name, out = request.param, tmp_path_factory.mktemp(request.param) / "run"
    with watching() as seen:
        assert train(name, data_dir, out, "--epochs", str(EPOCHS)) == 0
    return name, seen, out


def one_cycle(total: int, start: float, peak: float, end: float, pct: float) -> np.ndarray:
    """Linear One Cycle written out (PyTorch's phase boundaries: the peak at step pct * total - 1)."""
    up_end, steps = pct * total - 1, np.arange(total)
    return np.where(steps <= up_end, start + (peak - start) * steps / up_end,
                    peak + (end - peak) * (steps - up_end) / (total - 1 - up_end))


def test_every_value_of_every_preset_is_watched_here():
    """A value added to a preset must get its check here (or be this table's to explain)."""
    watched = {"widths", "residual", "plain", "prep_kernel", "activation", "bn_momentum", "prep_bn", "bn_eps",
               "fc_bias", "dirac", "logit_scale", "whiten", "whiten_bias_epochs", "whiten_bias_stop", "bn_weight",
               "bias_lr", "lookahead", "epochs", "step_rounding", "batch_size", "lr", "weight_decay", "momentum",
               "min_momentum", "pct_start", "div_factor", "final_div_factor", "anneal", "label_smoothing",
               "alt_flip", "translate", "cutout", "tta_translate"}
    for name in EXPECTED:
        assert set(PRESETS[name]) <= watched, name


@pytest.mark.slow
def test_the_full_preset_takes_its_steps_of_its_batch(run):
    """epochs, batch_size and step_rounding, which the short run overrides: 9.9 epochs of batch 1024 on 50,000
    images are 475 steps rounded, 476 with ceil (both presets, as airbench94)."""
    name, _, _ = run
    config, _ = parse_config(["--preset", name])
    steps = recipe_flops(config, 50_000, 10_000)["train_images"] / 1024
    assert config.batch_size == 1024 and steps == 476


@pytest.mark.slow
def test_the_run_builds_the_presets_net(run):
    name, seen, _ = run
    want, model = EXPECTED[name], seen.model
    nn = torch.nn
    assert count_parameters(model) == want["parameters"]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {(m.eps, round(m.momentum, 6)) for m in norms} == {(want["bn_eps"], 0.4)}
    assert any(isinstance(m, nn.GELU) for m in model.modules()) and not any(
        isinstance(m, nn.ReLU) for m in model.modules())
    assert model.prep[0].kernel_size == (2, 2) and (model.fc.bias is not None) == want["fc_bias"]
    assert isinstance(model.prep[1], nn.BatchNorm2d) == want["prep_bn"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = torch.flatten(model.pool(model.layer3(model.layer2(model.layer1(model.prep(x))))), 1)
        torch.testing.assert_close(model.eval()(x), model.fc(features) / 9)  # logit_scale 1/9


@pytest.mark.slow
def test_the_first_layer_starts_as_the_whitening_of_the_training_images_and_the_others_as_the_identity(run):
    """The filters at the first step whiten the 2x2 patches (even filters; odd ones are their negatives); with
    dirac each later conv's first in_channels filters are the identity, else not."""
    name, seen, _ = run
    weights, data = seen.epochs[0]["start"]["weights"], seen.data
    images = normalize_images(data.train_images, data.mean, data.std).permute(0, 3, 1, 2)
    out = F.conv2d(images, weights["prep.0.weight"][0::2].float()).permute(1, 0, 2, 3).reshape(12, -1)
    torch.testing.assert_close(torch.cov(out), torch.eye(12), atol=0.02, rtol=0)
    torch.testing.assert_close(weights["prep.0.weight"][1::2], -weights["prep.0.weight"][0::2])
    convs = [w for key, w in weights.items() if w.dim() == 4 and key != "prep.0.weight"]
    identity = [torch.equal(w[:w.shape[1]], F.pad(torch.eye(w.shape[1])[:, :, None, None], (1, 1, 1, 1)))
                for w in convs]
    assert all(identity) if EXPECTED[name]["dirac"] else not any(identity)


@pytest.mark.slow
def test_the_optimizer_steps_the_presets_lr_curve_momentum_weight_decay_and_bias_lr(run):
    """Every step's lr against the written-out curve (peak 1.5, from 0.2x up at 23% of the steps, down to 0.07x):
    lr, div_factor, final_div_factor, pct_start, anneal; Nesterov momentum 0.85 throughout; the BatchNorm
    biases at 64x the lr with 1/64 the weight decay; the whitening bias group at its scale."""
    name, seen, _ = run
    want = EXPECTED[name]
    lrs = np.concatenate([epoch["lrs"] for epoch in seen.epochs])
    assert len(lrs) == want["steps"] == seen.lookahead.total_steps
    np.testing.assert_allclose(lrs, one_cycle(want["steps"], 0.3, 1.5, 0.105, 0.23), rtol=1e-6)
    for epoch in seen.epochs:
        rest, biases, whiten_bias = epoch["start"]["groups"]
        assert all(g["momentum"] == pytest.approx(0.85) and g["nesterov"] for g in (rest, biases, whiten_bias))
        assert rest["weight_decay"] == pytest.approx(want["weight_decay"])
    rest, biases, whiten_bias = seen.epochs[0]["start"]["groups"]
    norm_biases = {id(m.bias) for m in seen.model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in biases["params"]} | {id(seen.model.whitening_bias())} >= norm_biases
    assert biases["lr"] == pytest.approx(64 * rest["lr"])
    assert biases["weight_decay"] == pytest.approx(want["weight_decay"] / 64)
    assert whiten_bias["lr"] == pytest.approx(want["whiten_bias_lr_scale"] * rest["lr"])


def moved(epoch: dict[str, Any]) -> bool:
    """Whether the whitening bias changed during the epoch."""
    return not torch.equal(epoch["start"]["bias"], epoch["end"]["bias"])


@pytest.mark.slow
def test_the_whitening_bias_trains_three_epochs_then_stops_as_the_preset_says(run):
    name, seen, _ = run
    stop = EXPECTED[name]["whiten_bias_stop"]
    for index, epoch in enumerate(seen.epochs):
        assert moved(epoch) == (index < 3), index
        assert epoch["start"]["bias_requires_grad"] == (index < 3 or stop == "lr"), index
        assert (epoch["start"]["groups"][2]["lr"] == 0) == (index >= 3 and stop == "lr"), index


@pytest.mark.slow
def test_each_seed_trains_its_whitening_bias_for_fractional_epochs_then_stops_it(data_dir, tmp_path):
    """airbench94's stop by requires_grad at --whiten-bias-epochs 1.5, two seeds: each trains its bias in epochs
    0 and 1 and stops it from epoch 2 (the first at or past 1.5); the second seed trains its bias again although
    the first seed's stop left requires_grad off. Sabotage caught: stop_whitening_bias called only at the epoch
    equal to whiten_bias_epochs (1.5: never), or only from it on (the second seed starts stopped)."""
    with watching() as seen:
        assert train("airbench94", data_dir, tmp_path, "--epochs", "3", "--whiten-bias-epochs", "1.5",
                     "--runs", "2") == 0
    assert [moved(epoch) for epoch in seen.epochs] == [True, True, False] * 2
    assert [epoch["start"]["bias_requires_grad"] for epoch in seen.epochs] == [True, True, False] * 2


@pytest.mark.slow
def test_a_run_resumed_after_the_whitening_bias_stopped_keeps_it_stopped(data_dir, tmp_path):
    """airbench94 with the bias stopped at epoch 1, stopped by a signal at the start of epoch 2 and resumed: the
    resumed epoch starts with the bias the checkpoint holds and leaves it there, to the model saved. Sabotage
    caught: stop_whitening_bias called only at the epoch equal to whiten_bias_epochs (the resumed process builds
    a fresh model, whose bias requires a gradient)."""
    with watching(stop_before=2) as stopped, pytest.raises(SystemExit):
        train("airbench94", data_dir, tmp_path, "--epochs", "3", "--whiten-bias-epochs", "1")
    assert [moved(epoch) for epoch in stopped.epochs] == [True, False]
    with watching() as resumed:
        assert fastcifar.train.main(["--resume", str(tmp_path)]) == 0
    bias = stopped.epochs[-1]["end"]["bias"]
    assert len(resumed.epochs) == 1 and not resumed.epochs[0]["start"]["bias_requires_grad"]
    assert torch.equal(resumed.epochs[0]["start"]["bias"], bias) and not moved(resumed.epochs[0])
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["prep.0.bias"], bias)


@pytest.mark.slow
def test_the_whitening_filters_stay_frozen_from_the_first_step_to_the_saved_model(run):
    """whiten_bias_epochs freezes prep.0.weight (data statistics, not learned). Sabotage caught: the filters
    left trainable (build_model without freezing prep.0.weight)."""
    _, seen, out = run
    saved = load_file(str(out / "model.safetensors"))
    assert not seen.model.prep[0].weight.requires_grad
    assert torch.equal(saved["prep.0.weight"], seen.epochs[0]["start"]["weights"]["prep.0.weight"])


@pytest.mark.slow
def test_the_batchnorm_scales_stay_one_and_the_run_ends_on_the_lookahead_average(run):
    """bn_weight=False and lookahead=True: every step counted, the weights averaged every 5 steps (airbench's
    period), the weights saved are the slow ones."""
    name, seen, out = run
    saved = load_file(str(out / "model.safetensors"))
    scales = [v for k, v in saved.items() if k.endswith(".weight") and v.dim() == 1]
    assert scales and all(torch.equal(v, torch.ones_like(v)) for v in scales)
    assert seen.lookahead.steps == EXPECTED[name]["steps"] and seen.lookahead.every == 5
    assert all(torch.equal(saved[k], v) for k, v in seen.lookahead.slow.items())


@pytest.mark.slow
def test_the_loader_alternates_flips_crops_by_two_without_cutout_and_the_loss_smooths(run):
    _, seen, _ = run
    flips = []
    plans = [seen.plans[epoch] for epoch in sorted(seen.plans)]
    assert len(plans) == len(seen.epochs) == 4
    for plan in plans[:3]:
        per_image = torch.empty_like(plan.flip)
        per_image[plan.order] = plan.flip
        flips.append(per_image)
    assert torch.equal(flips[1], 1 - flips[0]) and torch.equal(flips[2], flips[0])  # alt_flip
    offsets = torch.cat([torch.cat([plan.dy, plan.dx]) for plan in plans])
    assert int(offsets.max()) == 4 and int(offsets.min()) == 0  # translate 2: offsets 0..4 into the padding
    assert all(loader.cutout == 0 for loader in seen.loaders)
    assert seen.criterion.label_smoothing == pytest.approx(0.2)


@pytest.mark.slow
def test_the_final_evaluation_is_flip_and_translate_by_one(run):
    _, _, out = run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations"][-1]["views"] == ["identity", "flip", "shift+1", "flip+shift+1", "shift-1",
                                                   "flip+shift-1"]
