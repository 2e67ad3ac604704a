"""fastcifar.recipe: every TrainConfig setting reaches what it changes. Each test observes the setting where
it lands (the loaders' draws and served pixels, the model's output, the optimizer's update and the scheduler's
values over real steps, the loss, the first layer's whitening), so a setting that is silently ignored fails
here; each docstring names the one-line sabotages of the library that made it fail.

    pytest -q tests/test_recipe.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcifar.config import TrainConfig
from fastcifar.data import CifarData
from fastcifar.model import ModelConfig, ResNet9
from fastcifar.recipe import (build_criterion, build_loaders, build_model, build_optimizer, build_scheduler,
                              epoch_steps, init_weights, total_steps)
from synthetic import CLASSES


CPU = torch.device("cpu")


SIDE = 32


def flat_data(n: int = 200, value: int = 200) -> CifarData:
    """Images of one constant value, which normalizes to a non-zero number: every zero in a served batch is
    padding or cutout, so counting zeros measures the crop offsets and the cutout square as drawn."""
    images = np.full((n, SIDE, SIDE, 3), value, dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % 10
    return CifarData(images, labels, images[:20], labels[:20], list(CLASSES), (0.5,) * 3, (0.25,) * 3, "flat")


def zero_pixels_per_image(loader) -> np.ndarray:
    """For each served training image, how many pixels are zero in every channel."""
    counts = [(x == 0).all(1).sum((1, 2)).numpy() for x, _ in loader]
    return np.concatenate(counts)


def cropped_zeros(translate: int) -> int:
    """Zero pixels of a crop displaced by `translate` in both directions out of a zero-padded flat image."""
    return SIDE * SIDE - (SIDE - translate) ** 2


@pytest.mark.parametrize("pipeline", ["gpu", "albumentations"])
def test_translate_and_pad_mode_set_the_crop_range(pipeline):
    """Sabotage: translate=4 (a constant) in build_loaders; pad_mode='reflect' (a constant)."""
    if pipeline == "albumentations":
        pytest.importorskip("albumentations")
    config = TrainConfig(pipeline=pipeline, workers=0, translate=3, pad_mode="zeros", cutout=0, flip=False,
                         batch_size=50)
    train, _ = build_loaders(config, flat_data(), CPU, None, seed=0)
    zeros = zero_pixels_per_image(train)
    # the largest displacement, in both directions at once, shows up, and nothing beyond it
    assert zeros.max() == cropped_zeros(3) and zeros.min() == 0
    reflect = TrainConfig(pipeline=pipeline, workers=0, translate=3, pad_mode="reflect", cutout=0, flip=False,
                          batch_size=50)
    train, _ = build_loaders(reflect, flat_data(), CPU, None, seed=0)
    assert zero_pixels_per_image(train).max() == 0  # reflected borders of a flat image are the image


@pytest.mark.parametrize("pipeline", ["gpu", "albumentations"])
def test_cutout_sets_the_size_of_the_square(pipeline):
    """Sabotage: cutout=8 (a constant) in build_loaders."""
    if pipeline == "albumentations":
        pytest.importorskip("albumentations")
    config = TrainConfig(pipeline=pipeline, workers=0, translate=0, cutout=5, flip=False, batch_size=50)
    train, _ = build_loaders(config, flat_data(), CPU, None, seed=0)
    zeros = zero_pixels_per_image(train)
    assert zeros.max() == 5 * 5 and zeros.min() > 0  # squares clipped at the border are smaller
    no_cutout = TrainConfig(pipeline=pipeline, workers=0, translate=0, cutout=0, flip=False, batch_size=50)
    train, _ = build_loaders(no_cutout, flat_data(), CPU, None, seed=0)
    assert zero_pixels_per_image(train).max() == 0


def flips_per_image(train, epochs: int) -> list[torch.Tensor]:
    """Which source images each epoch's plan mirrors, indexed by image."""
    out = []
    for _ in range(epochs):
        plan = train.plan_epoch()
        per_image = torch.empty(train.num_images, dtype=torch.int64)
        per_image[plan.order] = plan.flip
        out.append(per_image)
    return out


def test_flip_and_alt_flip_set_the_mirroring():
    """Sabotage: flip=True (a constant) in build_loaders; alt_flip=False (a constant) in build_loaders."""
    def flips(**settings) -> list[torch.Tensor]:
        train, _ = build_loaders(TrainConfig(**settings), flat_data(), CPU, None, seed=0)
        return flips_per_image(train, 3)

    assert all(int(f.sum()) == 0 for f in flips(flip=False))
    random = flips(flip=True)
    assert 0 < int(random[0].sum()) < 200 and not torch.equal(random[1], 1 - random[0])
    alternating = flips(flip=True, alt_flip=True)
    assert torch.equal(alternating[1], 1 - alternating[0]) and torch.equal(alternating[2], alternating[0])


def test_workers_set_the_albumentations_dataloader_processes():
    """Sabotage: num_workers=2 (a constant) in build_loaders; pipeline ignored (always the fast loader)."""
    pytest.importorskip("albumentations")
    train, test = build_loaders(TrainConfig(pipeline="albumentations", workers=1), flat_data(), CPU, None, seed=0)
    assert isinstance(train, torch.utils.data.DataLoader)
    assert train.num_workers == 1 and test.num_workers == 1


def test_batch_size_and_channels_last_set_the_served_batches():
    """Sabotage: channels_last=True (a constant) in build_loaders or build_model."""
    for channels_last in (True, False):
        config = TrainConfig(batch_size=40, channels_last=channels_last, width=4)
        train, _ = build_loaders(config, flat_data(), CPU, None, seed=0)
        x, y = next(iter(train))
        assert x.shape == (40, 3, SIDE, SIDE) and len(train) == 5
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        weight = build_model(config, 10, CPU).prep[0].weight
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_seed_sets_the_initial_weights_and_the_loader_draws():
    """Sabotage: torch.manual_seed(0) in init_weights; the loader's seed ignored."""
    config = TrainConfig(width=4)
    weights = []
    for seed in (3, 3, 4):
        model = ResNet9(ModelConfig(width=4))
        init_weights(model, config, flat_data(), seed)
        weights.append(model.prep[0].weight.detach().clone())
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    orders = [build_loaders(config, flat_data(), CPU, None, seed=s)[0].plan_epoch().order for s in (3, 3, 4)]
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])


def test_width_and_logit_scale_reach_the_model_output():
    """Sabotage: ModelConfig built without logit_scale (the model's default 0.125) in build_model."""
    model = build_model(TrainConfig(width=4, logit_scale=0.25, channels_last=False), 10, CPU).eval()
    assert model.prep[0].out_channels == 4 and model.fc.out_features == 10
    plain = ResNet9(ModelConfig(width=4, logit_scale=1.0)).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), 0.25 * plain(x))


def test_sgd_steps_are_nesterov_with_the_configured_momentum_and_weight_decay():
    """Sabotage: nesterov=False; momentum or weight_decay taken from a constant, in build_optimizer."""
    config = TrainConfig(lr=0.1, momentum=0.7, min_momentum=0.7, weight_decay=0.05)
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer(config, torch.nn.ParameterList([param]), CPU)
    p, buf = param.detach().clone(), None
    for _ in range(3):
        opt.zero_grad()
        (0.5 * param.pow(2).sum()).backward()  # gradient = the parameter
        opt.step()
        g = p + 0.05 * p                        # gradient + weight decay
        buf = g if buf is None else 0.7 * buf + g
        p = p - 0.1 * (g + 0.7 * buf)           # Nesterov: look ahead along the momentum
        torch.testing.assert_close(param.detach(), p)


def group_momentum(opt: torch.optim.Optimizer) -> float:
    group = opt.param_groups[0]
    return group["betas"][0] if "betas" in group else group["momentum"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_momentum_or_beta1_cycles_over_real_scheduler_steps(optimizer):
    """SGD's momentum and Adam's beta1 at the start, the peak lr and the end. Sabotage: cycle_momentum=False, or
    base/max momentum constants, in build_scheduler; the optimizer setting ignored (always SGD)."""
    config = TrainConfig(optimizer=optimizer, epochs=1, lr=0.01, pct_start=0.25, momentum=0.95, min_momentum=0.8)
    param = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer(config, torch.nn.ParameterList([param]), CPU)
    assert type(opt) is {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    sched = build_scheduler(config, opt, steps_per_epoch=20)
    values, lrs = [], []
    for _ in range(20):
        values.append(group_momentum(opt))
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        param.sum().backward()
        opt.step()
        sched.step()
    peak = int(np.argmax(lrs))
    assert values[0] == pytest.approx(0.95) and values[peak] == pytest.approx(0.8)
    assert values[-1] == pytest.approx(0.95, abs=1e-3)
    assert all(a >= b for a, b in zip(values[:peak], values[1:peak + 1]))  # down while the lr goes up


def one_cycle(total: int, start: float, peak: float, end: float, pct: float, anneal: str) -> list[float]:
    """The lr of each step, written out from the One Cycle definition (PyTorch's phase boundaries)."""
    def interpolate(a: float, b: float, t: float) -> float:
        return a + (b - a) * t if anneal == "linear" else b + (a - b) / 2 * (math.cos(math.pi * t) + 1)

    up_end, down_end = pct * total - 1, total - 1
    return [interpolate(start, peak, s / up_end) if s <= up_end else
            interpolate(peak, end, (s - up_end) / (down_end - up_end)) for s in range(total)]


@pytest.mark.parametrize("anneal", ["linear", "cos"])
def test_anneal_sets_the_shape_of_the_lr_curve(anneal):
    """Sabotage: anneal_strategy='linear' (a constant) in build_scheduler."""
    config = TrainConfig(epochs=1, lr=0.3, pct_start=0.3, div_factor=10, final_div_factor=100, anneal=anneal)
    opt = build_optimizer(config, torch.nn.Linear(2, 2), CPU)
    sched = build_scheduler(config, opt, steps_per_epoch=40)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = one_cycle(40, 0.03, 0.3, 0.03 / 100, 0.3, anneal)
    other = one_cycle(40, 0.03, 0.3, 0.03 / 100, 0.3, "cos" if anneal == "linear" else "linear")
    np.testing.assert_allclose(lrs, want, rtol=1e-6)
    assert max(abs(a - b) for a, b in zip(want, other)) > 0.02  # the two shapes are far apart


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


@pytest.mark.parametrize("epochs, rounded, ceiled", [(9.9, 475, 476), (0.1 * 3, 14, 15), (2.0, 96, 96)])
def test_step_rounding_ceil_takes_airbench94s_476_steps(epochs, rounded, ceiled):
    """ceil(48 x 9.9) = 476, as airbench94; float noise (1.1 x 100 = 110.00000000000001) does not add a step.
    Sabotage: step_rounding ignored in total_steps; ceil without the rounding to 6 places."""
    assert total_steps(TrainConfig(epochs=epochs), 48) == rounded
    assert total_steps(TrainConfig(epochs=epochs, step_rounding="ceil"), 48) == ceiled
    assert total_steps(TrainConfig(epochs=1.1, step_rounding="ceil"), 100) == 110
    assert sum(epoch_steps(TrainConfig(epochs=9.9, step_rounding="ceil"), 48)) == 476


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


@pytest.mark.parametrize("prep_bn, scale", [(True, 64.0), (False, 1.0)])
def test_the_whitening_bias_group_takes_the_settings_of_the_group_it_would_join(prep_bn, scale):
    """A BatchNorm bias after the whitening conv trains like the other BatchNorm biases (64x); airbench's conv
    bias like the weights (1x, the plain weight decay). Sabotage: the whiten_bias group always bias_lr's."""
    config = TrainConfig(width=4, whiten=True, whiten_bias_epochs=1, bias_lr=64.0, prep_bn=prep_bn, lr=0.5,
                         weight_decay=0.01)
    model = build_model(config, 10, CPU)
    group = next(g for g in build_optimizer(config, model, CPU).param_groups if g.get("name") == "whiten_bias")
    assert group["params"] == [model.whitening_bias()]
    assert (group["lr"], group["weight_decay"]) == (pytest.approx(0.5 * scale), pytest.approx(0.01 / scale))


def test_no_bias_lr_means_one_group():
    model = build_model(TrainConfig(width=4), 10, torch.device("cpu"))
    opt = build_optimizer(TrainConfig(width=4), model, torch.device("cpu"))
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


def test_adam_applies_the_configured_weight_decay():
    """Sabotage: Adam's weight_decay a constant in build_optimizer (SGD's: test_sgd_steps_are_nesterov_...)."""

    moved = {}
    for wd in (0.0, 0.05):
        param = nn.Parameter(torch.ones(3))
        opt = build_optimizer(TrainConfig(optimizer="adam", lr=0.1, weight_decay=wd), nn.ParameterList([param]), CPU)
        assert opt.param_groups[0]["weight_decay"] == wd
        opt.zero_grad()
        (0 * param.sum()).backward()  # a zero gradient: only weight decay moves the weights
        opt.step()
        moved[wd] = float((param.detach() - 1).abs().max())
    assert moved[0.0] == 0 and moved[0.05] > 0.05  # Adam's first step is ~lr


def test_init_weights_with_whiten_leaves_a_whitening_first_layer():
    """Sabotage caught: the init_whitening call in recipe.init_weights replaced by `pass`."""
    from fastcifar.augment import normalize_images
    from fastcifar.data import CLASSES

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    images[..., 1] = (0.8 * images[..., 0] + 0.2 * images[..., 1]).astype(np.uint8)  # correlated channels
    data = CifarData(images, np.arange(200) % 10, images[:20], np.arange(20) % 10, list(CLASSES),
                     (0.5,) * 3, (0.25,) * 3, "synthetic")
    for prep_kernel in (3, 2):
        config = TrainConfig(widths="64,8,8,8", whiten=True, prep_kernel=prep_kernel, channels_last=False)
        model = build_model(config, 10, torch.device("cpu"))
        init_weights(model, config, data, seed=0, whiten_sample=200)
        x = normalize_images(images, data.mean, data.std, torch.device("cpu")).permute(0, 3, 1, 2)
        dims = 3 * prep_kernel ** 2
        out = F.conv2d(x, model.prep[0].weight[0:2 * dims:2].float()).permute(1, 0, 2, 3).reshape(dims, -1)
        torch.testing.assert_close(torch.cov(out), torch.eye(dims), atol=0.02, rtol=0)


# --- the loss ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_label_smoothing_sets_the_loss_to_the_hand_computed_smoothed_cross_entropy(smoothing,
                                                                                 smoothed_cross_entropy):
    """Sabotage: CrossEntropyLoss() without label_smoothing in build_criterion; a constant smoothing."""
    logits = np.array([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.0, -1.0, -1.0, 4.0]])
    labels = np.array([0, 3, 1])
    loss = build_criterion(TrainConfig(label_smoothing=smoothing))(torch.tensor(logits, dtype=torch.float64),
                                                                   torch.tensor(labels))
    assert float(loss) == pytest.approx(smoothed_cross_entropy(logits, labels, smoothing), rel=1e-12)
    other = smoothed_cross_entropy(logits, labels, 0.3 - smoothing)
    assert abs(other - smoothed_cross_entropy(logits, labels, smoothing)) > 0.1  # the two settings are far apart
