"""Patch-whitening initialization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcifar.model import ModelConfig, ResNet9
from fastcifar.whiten import init_whitening, patch_eigens


def test_whitened_first_layer_outputs_are_decorrelated_with_unit_variance():
    torch.manual_seed(0)
    x = torch.randn(300, 3, 32, 32)
    x[:, 1] = 0.9 * x[:, 0] + 0.1 * x[:, 1]  # strongly correlated channels
    model = ResNet9(ModelConfig(width=64))
    before = model.prep[0].weight[54:].clone()
    init_whitening(model.prep[0], x, eps=0)
    w = model.prep[0].weight
    positive = w[0:54:2]  # +v of each of the 27 directions
    out = F.conv2d(x, positive).permute(1, 0, 2, 3).reshape(27, -1)
    cov = torch.cov(out)
    torch.testing.assert_close(cov, torch.eye(27), atol=2e-3, rtol=0)
    torch.testing.assert_close(w[1:54:2], -positive)  # paired with their negatives
    assert torch.equal(w[54:], before)  # filters beyond 2 x 27 keep their random init


CHANNEL_SCALES = (3.0, 1.0, 0.3)  # independent pixels: each channel's 9 patch entries have variance scale**2


def scaled_noise(n: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, 3, 32, 32) * torch.tensor(CHANNEL_SCALES)[:, None, None]


def test_patch_eigens_are_the_known_spectrum_largest_first():
    """A known covariance; fails if patch_eigens returns the directions in ascending order."""
    values, vectors = patch_eigens(scaled_noise(), kernel=3)
    want = np.repeat(np.square(CHANNEL_SCALES), 9)  # covariance diag(9 x 9, 9 x 1, 9 x 0.09), channel-major
    np.testing.assert_allclose(values.numpy(), want, rtol=0.05)
    # the 9 largest directions live in channel 0's entries, the 9 smallest in channel 2's
    assert vectors[:9, 9:].abs().max() < 0.05 and vectors[18:, :18].abs().max() < 0.05


def test_patch_eigens_are_of_the_covariance_so_an_offset_changes_nothing():
    """Sabotage: the second moment instead of the covariance (patches not centered): a mean offset, as in images
    normalized with another set's statistics, would become the largest direction."""
    images = scaled_noise(16)
    values, _ = patch_eigens(images, kernel=3)
    shifted, _ = patch_eigens(images + torch.tensor([2.0, -1.0, 0.5])[:, None, None], kernel=3)
    torch.testing.assert_close(shifted, values)


def test_narrow_prep_conv_gets_the_largest_directions():
    """A conv with fewer filters than 2 x 27 keeps the largest directions (fails with the smallest first)."""
    model = ResNet9(ModelConfig(width=4))
    init_whitening(model.prep[0], scaled_noise(), eps=0)
    w = model.prep[0].weight.detach().reshape(4, 27)
    assert w[:, 9:].abs().max() < 0.02  # only channel 0, the largest-variance channel
    # unit output variance along a direction of variance 9 needs a filter of norm 1/3; +v then -v
    np.testing.assert_allclose(w.norm(dim=1).numpy(), 1 / 3, rtol=0.05)
    torch.testing.assert_close(w[1], -w[0])
    torch.testing.assert_close(w[3], -w[2])


def test_training_init_whitens_on_images_from_every_class(monkeypatch):
    """Image-folder data comes sorted by class: the whitening sample must not be a one-class prefix."""
    from types import SimpleNamespace

    import fastcifar.augment as augment
    from fastcifar.config import TrainConfig
    from fastcifar.recipe import init_weights

    seen = {}
    normalize = augment.normalize_images
    monkeypatch.setattr(augment, "normalize_images",
                        lambda images, *a, **k: (seen.setdefault("images", images), normalize(images, *a, **k))[1])
    images = np.random.default_rng(0).integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(1000) // 100  # the class of each image, 100 per class, in order
    data = SimpleNamespace(train_images=images, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model = ResNet9(ModelConfig(width=4))
    init_weights(model, TrainConfig(width=4, whiten=True), data, seed=0, whiten_sample=50)
    assert len(seen["images"]) == 50 and set(seen["images"][:, 0, 0, 0].tolist()) == set(range(10))


def test_whiten_bias_epochs_freezes_the_whitened_conv_and_stops_its_bias_after_n_epochs():
    """The first BatchNorm's bias moves in epoch 0 and not from epoch 1 on, while the rest trains on; the
    whitened conv never moves. Sabotage caught: stop_whitening_bias a no-op, or the conv left trainable."""
    from fastcifar.config import TrainConfig
    from fastcifar.recipe import build_model, build_optimizer, build_scheduler, stop_whitening_bias

    torch.manual_seed(0)
    config = TrainConfig(width=4, whiten=True, whiten_bias_epochs=1, bias_lr=4.0, lr=0.1, epochs=3,
                         channels_last=False)
    cpu = torch.device("cpu")
    model = build_model(config, 10, cpu)
    assert not model.prep[0].weight.requires_grad
    optimizer = build_optimizer(config, model, cpu)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=2)
    conv, bias, later = model.prep[0].weight, model.prep[1].bias, model.layer1[0][0].weight

    def step():
        optimizer.zero_grad()
        (model(torch.randn(8, 3, 32, 32)) ** 2).mean().backward()
        optimizer.step()
        scheduler.step()

    conv_before = conv.clone()
    for epoch in range(3):
        stop_whitening_bias(optimizer, config, epoch)
        bias_before, later_before = bias.clone(), later.clone()
        step()
        step()
        assert torch.equal(bias, bias_before) == (epoch >= 1), epoch
        assert not torch.equal(later, later_before)
    assert torch.equal(conv, conv_before)


@pytest.mark.slow
def test_the_training_loop_stops_the_whitening_bias(tmp_path):
    """Sabotage caught: the stop_whitening_bias call dropped from the loop in fastcifar.train."""
    from synthetic import write_learnable_dataset

    from fastcifar.checkpoint import load_resume
    from fastcifar.config import TrainConfig
    from fastcifar.train import train

    data = write_learnable_dataset(tmp_path / "data", train_per_class=4, test_per_class=1)
    out = tmp_path / "run"
    biases = []
    config = TrainConfig(data_dir=str(data), out_dir=str(out), width=4, batch_size=10, epochs=3, device="cpu",
                         whiten=True, whiten_bias_epochs=1, bias_lr=8.0, plots=False, tta=False, amp=False)
    train(config, on_epoch=lambda row: biases.append(load_resume(out)[1]["model"]["prep.1.bias"].clone()))
    assert not torch.equal(biases[0], torch.zeros_like(biases[0]))  # trained in epoch 1
    assert torch.equal(biases[0], biases[1]) and torch.equal(biases[1], biases[2])  # then frozen


@pytest.mark.parametrize("prep_bn", [True, False])
def test_whiten_bias_stop_grad_turns_requires_grad_off_after_n_epochs_and_on_again_for_the_next_seed(prep_bn):
    """airbench's way: no gradient at all for the stopped bias (its BatchNorm's or, without one, the conv's), so
    it does not move; epoch 0 of a next seed trains it again. Sabotage caught: whiten_bias_stop ignored (the lr
    zeroed instead), or requires_grad only ever turned off."""
    from fastcifar.config import TrainConfig
    from fastcifar.recipe import build_model, build_optimizer, stop_whitening_bias

    config = TrainConfig(width=4, whiten=True, whiten_bias_epochs=2, whiten_bias_stop="grad", prep_bn=prep_bn,
                         lr=0.1, channels_last=False)
    cpu = torch.device("cpu")
    model = build_model(config, 10, cpu)
    optimizer = build_optimizer(config, model, cpu)
    bias = model.whitening_bias()
    for epoch, trains in [(0, True), (1, True), (2, False), (5, False), (0, True)]:
        stop_whitening_bias(optimizer, config, epoch)
        before = bias.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(8, 3, 32, 32)).square().mean().backward()
        optimizer.step()
        assert bias.requires_grad == trains and (bias.grad is not None) == trains, epoch
        assert torch.equal(bias, before) != trains, epoch
        assert next(g for g in optimizer.param_groups if g.get("name") == "whiten_bias")["lr"] == 0.1  # kept
