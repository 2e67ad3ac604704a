"""Every TrainConfig setting reaches what it changes: each test observes the setting where it lands (the
loaders' draws and served pixels, the model's output, the optimizer's update and the scheduler's values
over real steps, the loss, the autocast dtype, the run directory), so a setting that is silently ignored
fails here.

    pytest -q tests/test_settings.py

Each test's docstring names the one-line sabotages of the library (the setting ignored, or replaced by a
constant) that were applied and made it fail.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcifar.config import TrainConfig
from fastcifar.data import CifarData
from fastcifar.distributed import Dist
from fastcifar.errors import UserError
from fastcifar.model import ModelConfig, ResNet9
from fastcifar.recipe import build_loaders, build_model, build_optimizer, build_scheduler, init_weights
from fastcifar.train import main, setup
from synthetic import CLASSES, write_learnable_dataset

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


# --- data and augmentation: the loaders' draws -------------------------------------------------------------

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


# --- the model -------------------------------------------------------------------------------------------------

def test_width_and_logit_scale_reach_the_model_output():
    """Sabotage: ModelConfig built without logit_scale (the model's default 0.125) in build_model."""
    model = build_model(TrainConfig(width=4, logit_scale=0.25, channels_last=False), 10, CPU).eval()
    assert model.prep[0].out_channels == 4 and model.fc.out_features == 10
    plain = ResNet9(ModelConfig(width=4, logit_scale=1.0)).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), 0.25 * plain(x))


# --- optimizer and schedule over real steps ----------------------------------------------------------------------

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
    """Sabotage: cycle_momentum=False, or base/max momentum constants, in build_scheduler; the optimizer
    setting ignored (always SGD)."""
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


# --- the session: loss, precision, compilation, data source ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("tiny"), train_per_class=6, test_per_class=2)


def test_label_smoothing_amp_compile_and_download_reach_the_session(tiny_dir, tmp_path, monkeypatch):
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
    torch.testing.assert_close(s.criterion(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.3))
    assert s.dtype == torch.bfloat16 and s.clocks["compile_seconds"] is not None and compiled == ["max-autotune"]
    off = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path / "off"), device="cpu", width=4,
                      label_smoothing=0.0, amp=False, compile=None, batch_size=20)
    s = setup(off, resume=False, dist=Dist(), device=CPU)
    torch.testing.assert_close(s.criterion(logits, labels), F.cross_entropy(logits, labels))
    assert s.dtype is None and s.clocks["compile_seconds"] is None and compiled == ["max-autotune"]  # CPU: off
    assert downloads == [True, None]  # --no-download means "only when missing and online": None


def test_sync_bn_is_refused_on_the_cpu_under_torchrun(tiny_dir, tmp_path):
    """Sabotage: config.sync_bn ignored in setup (the run would go on with per-rank statistics)."""
    config = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path / "run"), device="cpu", width=4, sync_bn=True,
                         batch_size=8)
    with pytest.raises(UserError, match="--sync-bn"):
        setup(config, resume=False, dist=Dist(rank=0, world_size=2), device=CPU)


# --- the run directory ----------------------------------------------------------------------------------------------

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
