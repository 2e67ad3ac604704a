"""The custom ResNet-9."""

from __future__ import annotations

import pytest
import torch

from fastcifar.config import PRESETS, TrainConfig
from fastcifar.flops import recipe_flops
from fastcifar.model import ModelConfig, ResNet9, count_parameters, main, summary


def test_default_width_has_the_classic_parameter_count():
    assert count_parameters(ResNet9(ModelConfig())) == 6_573_130


@pytest.mark.parametrize("width", [4, 16, 64])
def test_width_scales_every_stage(width):
    model = ResNet9(ModelConfig(width=width))
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [width, 2 * width, 2 * width, 2 * width, 4 * width, 8 * width, 8 * width, 8 * width]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_residual_block_is_the_standard_form():
    model = ResNet9(ModelConfig(width=4)).eval()
    block = model.layer1[1]
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + block.body(x))


def test_no_conv_bias_and_logit_scale_applies():
    model = ResNet9(ModelConfig(width=4, logit_scale=0.5)).eval()
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    plain = ResNet9(ModelConfig(width=4, logit_scale=1.0)).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), 0.5 * plain(x))


def test_summary_lists_layers_and_total(capsys):
    assert main(["--width", "16"]) == 0
    out = capsys.readouterr().out
    assert "412,954" in out and ("Linear" in out or "fc" in out)
    assert "412,954" in summary(ResNet9(ModelConfig(width=16)))
    assert "FLOPs per image: 48.1 M forward" in out  # 2 x the multiply-adds, see tests/test_flops.py


def test_the_plain_summary_without_torchinfo_leaves_the_model_training(monkeypatch):
    """Sabotage: the fallback table (no torchinfo installed) leaving the model in eval mode after its forward."""
    import sys

    monkeypatch.setitem(sys.modules, "torchinfo", None)  # import torchinfo raises ImportError
    model = ResNet9(ModelConfig(width=4)).train()
    table = summary(model)
    assert "layer1" in table and f"{count_parameters(model):,}" in table and model.training


def test_the_model_command_shows_a_presets_net(capsys):
    assert main(["--preset", "speedrun"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 2,009,818" in out and "FLOPs per image: 205.7 M forward" in out
    # the frozen whitening filters need no weight gradient, as in the run's own count
    per_image_train = recipe_flops(TrainConfig(**PRESETS["speedrun"]), 50_000, 10_000)["per_image_train"]
    assert f"{per_image_train / 1e6:,.1f} M forward + backward" in out and "616.0 M" in out


def test_the_default_family_options_are_the_classic_net_with_its_parameter_names():
    """Sabotage caught: a residual block added after layer 2 by default, or layer 2 wrapped in a Sequential
    (its weights would load under other names from every existing checkpoint)."""
    names = list(ResNet9(ModelConfig(width=4)).state_dict())
    assert "layer2.0.weight" in names and not any(n.startswith("layer2.1.body") for n in names)
    assert "layer1.1.body.0.0.weight" in names and "layer3.1.body.1.0.weight" in names


@pytest.mark.parametrize("prep_kernel, side", [(3, 32), (2, 31)])
def test_stage_widths_residual_placement_and_the_first_conv_shape_the_net(prep_kernel, side):
    model = ResNet9(ModelConfig(widths=(6, 8, 12, 16), residual=(2,), prep_kernel=prep_kernel,
                                activation="gelu", bn_momentum=0.4)).eval()
    assert model.prep[0].weight.shape == (6, 3, prep_kernel, prep_kernel)
    assert model.prep(torch.zeros(2, 3, 32, 32)).shape[-1] == side
    assert model.layer2[1].body[0][0].weight.shape == (12, 12, 3, 3)  # the residual block after layer 2
    assert isinstance(model.layer1[-1], torch.nn.GELU) and isinstance(model.layer3[-1], torch.nn.GELU)
    assert all(m.momentum == 0.4 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10) and model.fc.in_features == 16


def test_a_family_config_survives_the_json_header_that_export_reads():
    from fastcifar.checkpoint import ModelInfo

    config = ModelConfig(widths=(24, 64, 256, 256), residual=(3, 1), prep_kernel=2, activation="gelu",
                         bn_momentum=0.4)
    info = ModelInfo.from_json(ModelInfo(config, ["a"] * 10, [0.5] * 3, [0.25] * 3).to_json())
    assert info.config == config and info.config.residual == (1, 3)
