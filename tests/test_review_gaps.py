"""Promises that no other test pinned down, each observed directly in a few milliseconds (found by one-line
sabotages of the library that the rest of the suite let through).

    pytest -q tests/test_review_gaps.py

Each test's docstring names the sabotage it catches.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fastcifar import runtime
from fastcifar.config import TrainConfig


CPU = torch.device("cpu")


def test_tta_views_keep_the_input_dtype_and_channels_last_layout_under_cpu_autocast():
    """Sabotage: same_layout returning the view as it is (a shifted view is a strided slice, and fp32 under CPU
    autocast, so a compiled model would recompile for it)."""
    from fastcifar.evaluate import tta_inputs

    x = torch.randn(4, 3, 32, 32).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        views = tta_inputs(x, translate=1)
    assert len(views) == 6
    for view in views:
        assert view.dtype == x.dtype and view.shape == x.shape
        assert view.is_contiguous(memory_format=torch.channels_last)


def test_mps_auto_amp_is_fp16():
    """Sabotage: amp_dtype's last line returning bf16 (auto on MPS and other devices is fp16)."""
    mps = torch.device("mps")
    assert runtime.amp_dtype(mps, True) == torch.float16
    assert runtime.amp_dtype(mps, True, "bf16") == torch.bfloat16
    assert runtime.amp_dtype(mps, False) is None


def test_warm_up_leaves_the_loaders_random_choices_where_they_were():
    """Sabotage: warm_up not restoring the training loader's state (the compiled run's first seed would draw
    other batches than an uncompiled one); warm_up not restoring the weights (BatchNorm statistics)."""
    from fastcifar.augment import DeviceLoader
    from fastcifar.train import warm_up

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), np.arange(64) % 10
    common = dict(mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=16)
    train, test = DeviceLoader(images, labels, seed=3, **common), DeviceLoader(images, labels, train=False, **common)
    fresh = DeviceLoader(images, labels, seed=3, **common)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 32 * 32, 10))  # BN: train steps move it
    session = SimpleNamespace(model_without_ddp=model, model=model, device=CPU, dtype=None, train_loader=train,
                              test_loader=test, config=TrainConfig(tta=True, tta_translate=1),
                              criterion=nn.CrossEntropyLoss())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    warm_up(session)
    assert torch.equal(train.plan_epoch().order, fresh.plan_epoch().order)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_the_guard_finishes_its_vote_in_flight_before_the_process_group_goes(monkeypatch):
    """Sabotage: SignalGuard.__exit__ not waiting for the vote it started (every rank started it; a process
    group destroyed under it can hang or abort)."""
    from fastcifar.distributed import Dist

    read = []

    class Vote:
        def __init__(self, flag, group=None):
            self.flag = flag

        def result(self):
            read.append(self.flag)
            return self.flag

    monkeypatch.setattr(runtime, "FlagVote", Vote)
    monkeypatch.setattr(runtime, "host_group", lambda device: None)
    with runtime.SignalGuard(Dist(rank=0, world_size=2), every=1) as guard:
        assert guard.stop_requested() is False  # starts a vote, reads none
        assert read == []
    assert read == [False]


def test_gathered_predictions_come_back_in_test_set_order(monkeypatch):
    """Sabotage: gather_interleaved concatenating the ranks' shards instead of interleaving them (the confusion
    matrix and misclassified images would pair predictions with the wrong labels)."""
    from fastcifar import distributed
    from fastcifar.distributed import Dist, gather_interleaved

    full = torch.arange(7) * 10
    shards = [full[r::2] for r in range(2)]

    def all_gather_object(parts, obj):
        parts[:] = [s.clone() for s in shards]

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    assert torch.equal(gather_interleaved(shards[0], Dist(rank=0, world_size=2), 7), full)


def test_resume_restores_the_grad_scaler(tmp_path):
    """Sabotage: Training.restore skipping the GradScaler (an fp16 run would resume at the initial loss scale,
    not the one it had reached)."""
    from fastcifar.checkpoint import RunState, Training, load_checkpoint

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
    fresh.restore(load_checkpoint(tmp_path / "checkpoint.pt"), CPU)
    assert fresh.scaler.get_scale() == 8.0


def test_evaluate_command_uses_the_amp_dtype_flag(tmp_path, monkeypatch, capsys):
    """Sabotage: fastcifar.evaluate.main calling amp_dtype without --amp-dtype (always auto)."""
    import fastcifar.evaluate as evaluate_mod
    from fastcifar.checkpoint import ModelInfo, save_model
    from fastcifar.model import ModelConfig, ResNet9
    from synthetic import CLASSES, write_learnable_dataset

    data = write_learnable_dataset(tmp_path / "data", train_per_class=1, test_per_class=1)
    save_model(tmp_path / "model.safetensors", ResNet9(ModelConfig(width=4)),
               ModelInfo(ModelConfig(width=4), list(CLASSES), [0.5] * 3, [0.25] * 3))
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda cpuinfo=None: False)  # auto = fp32 on this CPU
    dtypes = []
    monkeypatch.setattr(evaluate_mod, "evaluate",
                        lambda model, loader, device, dtype, **k: dtypes.append(dtype) or {"acc": 0.5, "loss": 1.0})
    assert evaluate_mod.main(["--checkpoint", str(tmp_path / "model.safetensors"), "--data-dir", str(data),
                              "--device", "cpu", "--amp-dtype", "fp16", "--json"]) == 0
    assert dtypes == [torch.float16] * 3
    assert len(json.loads(capsys.readouterr().out)["evaluations"]) == 3


def test_each_seed_of_a_multi_seed_run_trains_as_that_seed_alone(tmp_path):
    """Sabotage: start_seed reseeding the reused device loader with the first seed (or not at all), so seeds
    after the first would not see their own data order and augmentations."""
    from safetensors.torch import load_file

    from fastcifar.train import main
    from synthetic import write_learnable_dataset

    data = write_learnable_dataset(tmp_path / "data", train_per_class=8, test_per_class=1)
    common = ["--data-dir", str(data), "--width", "4", "--batch-size", "16", "--device", "cpu", "--epochs", "1",
              "--no-plots", "--no-tta", "--checkpoint-every", "0"]
    assert main([*common, "--seed", "0", "--runs", "2", "--out-dir", str(tmp_path / "both")]) == 0
    assert main([*common, "--seed", "1", "--out-dir", str(tmp_path / "one")]) == 0
    both, one = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("both", "one"))
    assert all(torch.equal(both[k], one[k]) for k in one)  # the last seed's model, bit-exact on the CPU


def test_images_per_second_is_the_last_seeds_images_over_its_training_seconds():
    """Sabotage: images_per_second not divided by train_seconds in report.run_summary."""
    from fastcifar.report import run_summary

    result = {"seed": 0, "test_acc": 0.5, "test_acc_tta": None, "images": 1000, "train_seconds": 4.0,
              "run_seconds": 5.0}
    summary = run_summary(TrainConfig(tta=False), [result], params=1, world_size=1, environment={"device": "cpu"},
                          compile_seconds=None, data_seconds=0.0)
    assert summary["images_per_second"] == 250.0


def test_the_batch_size_check_counts_the_images_of_one_process():
    """Sabotage: check_batch_size comparing with all training images instead of one rank's share (under torchrun
    a rank would then get no full batch and train zero steps)."""
    from fastcifar.distributed import Dist
    from fastcifar.errors import UserError
    from fastcifar.recipe import check_batch_size

    check_batch_size(TrainConfig(batch_size=50), 100, Dist(world_size=2))
    with pytest.raises(UserError, match="--batch-size"):
        check_batch_size(TrainConfig(batch_size=51), 100, Dist(world_size=2))
