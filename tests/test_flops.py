"""fastcifar.flops: the work of a run, counted with torch.utils.flop_counter.

    pytest -q tests/test_flops.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from airbench_helpers import airbench_net94, cuda_is_a_no_op
from torch import nn

from fastcifar.config import PRESETS, TrainConfig
from fastcifar.flops import main, meta_model, per_image_flops, recipe_flops
from fastcifar.model import ModelConfig
from fastcifar.report import run_summary
from fastcifar.runtime import SEED_CLOCKS


def test_a_small_known_network_counts_as_by_hand():
    """conv 3->4 (3x3, padded) on 8x8, then linear 256->5: multiply-adds counted by hand, 2 FLOPs each."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    conv_macs = 8 * 8 * 4 * 3 * 3 * 3
    linear_macs = 256 * 5
    assert per_image_flops(net, image_shape=(3, 8, 8)) == 2 * (conv_macs + linear_macs)
    # backward: the weight gradients of both layers and the linear layer's input gradient; the conv's input
    # (the image) needs none
    train_step = per_image_flops(net, train=True, image_shape=(3, 8, 8))
    assert train_step == 2 * (conv_macs + linear_macs) + 2 * (conv_macs + 2 * linear_macs)


def test_the_classic_net_is_759_mflop_per_image_forward():
    """The ResNet-9 at width 64, by hand: prep 3->64 at 32x32, layer1 64->128 at 32x32, residual 2 x 128->128 at
    16x16, layer2 128->256 at 16x16, layer3 256->512 at 8x8, residual 2 x 512->512 at 4x4, linear 512->10."""
    macs = 9 * (3 * 64 * 32 * 32 + 64 * 128 * 32 * 32 + 2 * 128 * 128 * 16 * 16 + 128 * 256 * 16 * 16
                + 256 * 512 * 8 * 8 + 2 * 512 * 512 * 4 * 4) + 512 * 10
    assert per_image_flops(meta_model(ModelConfig())) == 2 * macs


def test_the_family_options_change_the_count_as_their_shapes_say():
    """A 2x2 unpadded first conv works on 31x31; a residual block after layer 2 adds two convs at 7x7."""
    base = ModelConfig(widths=(24, 64, 256, 256), prep_kernel=2)
    macs = (12 * 24 * 31 * 31 + 9 * (24 * 64 * 31 * 31 + 2 * 64 * 64 * 15 * 15 + 64 * 256 * 15 * 15
                                    + 256 * 256 * 7 * 7 + 2 * 256 * 256 * 3 * 3) + 256 * 10)
    assert per_image_flops(meta_model(base)) == 2 * macs
    deeper = dataclasses.replace(base, residual=(1, 2, 3))
    assert per_image_flops(meta_model(deeper)) == 2 * macs + 2 * 9 * 2 * 256 * 256 * 7 * 7


def test_frozen_parameters_need_no_weight_gradient():
    config = ModelConfig(width=4)
    trained, frozen = meta_model(config), meta_model(config)
    frozen.prep[0].weight.requires_grad_(False)
    prep_weight_grad = 2 * 3 * 4 * 9 * 32 * 32
    assert per_image_flops(trained, train=True) - per_image_flops(frozen, train=True) == prep_weight_grad


@pytest.mark.slow
@pytest.mark.parametrize("change", [dict(epochs=5), dict(width=16), dict(tta_translate=1), dict(tta=False),
                                    dict(batch_size=256)])
def test_a_recipe_change_that_changes_the_work_changes_the_count(change):
    base = TrainConfig(width=8, epochs=4, tta=True, tta_translate=0, batch_size=500)
    before, after = recipe_flops(base, 5000, 1000), recipe_flops(dataclasses.replace(base, **change), 5000, 1000)
    assert after["per_run"] != before["per_run"]
    assert before["per_run"] == before["train"] + before["eval"]


def test_the_run_count_is_steps_times_the_batch_and_test_images_times_the_views():
    config = TrainConfig(width=8, epochs=2.5, batch_size=100, tta=True, tta_translate=1)
    work = recipe_flops(config, 1050, 200)
    assert work["train_images"] == round(2.5 * (1050 // 100)) * 100  # full batches only, as the loader
    assert work["train"] == work["per_image_train"] * work["train_images"]
    assert work["eval"] == work["per_image_forward"] * 6 * 200
    assert recipe_flops(dataclasses.replace(config, tta_translate=0), 1050, 200)["eval_views"] == 2
    assert recipe_flops(dataclasses.replace(config, tta=False), 1050, 200)["eval_views"] == 1


def test_the_speedrun_preset_fits_airbench94s_budget():
    work = recipe_flops(TrainConfig(**PRESETS["speedrun"]), 50000, 10000)
    assert work["per_run"] <= 0.305e15  # below airbench94's 0.359 (0.350 with its bias stop)
    assert recipe_flops(TrainConfig(), 50000, 10000)["per_run"] > 2.5e15  # the 24-epoch classic net


def test_counting_leaves_no_memory_behind():
    model = meta_model(ModelConfig(width=64))
    assert all(p.device.type == "meta" for p in model.parameters())
    per_image_flops(model, train=True)
    assert all(p.grad is None for p in model.parameters())
    assert torch.tensor(0).device.type == "cpu"  # the meta device context did not leak


@pytest.mark.parametrize("training", [False, True])
def test_counting_gives_the_model_its_mode_back(training):
    """Sabotage: per_image_flops leaving the model in the mode it counted in (eval after a forward count, train
    after a training count)."""
    model = meta_model(ModelConfig(width=4)).train(training)
    per_image_flops(model)
    assert model.training is training
    per_image_flops(model, train=True)
    assert model.training is training


def _seed(seed: int) -> dict:
    return {"seed": seed, "test_acc": 0.5 + seed / 100, "test_acc_tta": None, "images": 1000,
            **{key: 1.0 + seed for key in SEED_CLOCKS}}


def test_the_summarys_flops_total_is_per_run_times_the_seeds_so_far():
    flops = {"train": 30, "eval": 12, "per_run": 42, "per_image_forward": 2, "per_image_train": 6,
             "train_images": 5, "eval_views": 1}
    results = [_seed(s) for s in range(3)]
    summary = run_summary(TrainConfig(runs=3, tta=False), results, params=1, world_size=1, environment={},
                          clocks={}, flops=flops)
    assert summary["flops"]["per_run"] == 42
    assert summary["flops"]["total"] == 3 * 42
    partial = run_summary(TrainConfig(runs=3, tta=False), results[:2], params=1, world_size=1, environment={},
                          clocks={}, flops=flops)
    assert partial["flops"]["total"] == 2 * 42


def test_the_flops_command_prints_the_training_count_next_to_the_forward_count(capsys):
    assert main(["--width", "16"]) == 0
    out = capsys.readouterr().out
    counted = meta_model(ModelConfig(width=16))
    fwd, train = per_image_flops(counted), per_image_flops(counted, train=True)
    assert train > 2 * fwd  # the backward pass adds roughly twice the forward's work
    assert f"{fwd / 1e6:,.1f} M forward, {train / 1e6:,.1f} M forward + backward" in out


def test_under_torchrun_the_run_counts_the_global_batch():
    """World size 2, batch 100 per rank: 1050 images give 5 steps of 200 per epoch (drop_last), 12 steps in
    2.5 epochs (as total_steps rounds), not 25 steps of 100."""
    config = TrainConfig(width=8, epochs=2.5, batch_size=100, tta=False)
    work = recipe_flops(config, 1050, 200, world_size=2)
    assert work["train_images"] == 12 * 200
    assert work["train_images"] != recipe_flops(config, 1050, 200)["train_images"]
    assert work["train"] == work["per_image_train"] * work["train_images"]


def test_the_airbench94_preset_counts_as_airbench94_and_its_stopped_whitening_bias_saves_layer1s_input_gradient():
    """Per image as make_net94() counts (0.359 PFLOP per run when the whitening bias trains all 476 steps, as
    bench/airbench_runner.py's airbench_flops counts airbench94: 48 x 9.9 = 475.2 steps, ceiled); stopping the
    bias with requires_grad after 3 epochs of 48 steps spares layer1's input gradient, by hand 24 x 64 x 9
    multiply-adds at 31x31, in the remaining 332 steps.
    Sabotage caught: step_rounding or whiten_bias_stop deleted from the preset; recipe_flops ignoring the stop;
    stop_whitening_bias leaving requires_grad on; airbench_flops truncating 475.2 steps to 475."""
    from bench.airbench_runner import airbench_flops

    reference = airbench_net94()
    preset = TrainConfig(**PRESETS["airbench94"])
    trained_all_run = recipe_flops(dataclasses.replace(preset, whiten_bias_stop="lr"), 50_000, 10_000)
    assert trained_all_run["per_image_train"] == per_image_flops(reference, train=True)
    assert trained_all_run["per_image_forward"] == per_image_flops(reference)
    airbench_count = per_image_flops(reference, train=True) * 476 * 1024 + per_image_flops(reference) * 6 * 10_000
    assert trained_all_run["per_run"] == airbench_count and round(airbench_count / 1e15, 3) == 0.359
    with cuda_is_a_no_op():
        assert airbench_flops(pytest.importorskip("airbench"), 50_000, 10_000) == airbench_count
    work = recipe_flops(preset, 50_000, 10_000)
    layer1_input_gradient = 2 * 24 * 64 * 9 * 31 * 31
    assert work["per_image_train"] - work["per_image_train_stopped"] == layer1_input_gradient
    assert airbench_count - work["per_run"] == layer1_input_gradient * (476 - 3 * 48) * 1024  # ~0.009 PFLOP
    assert work["train_images"] == 476 * 1024
