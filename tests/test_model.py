"""The custom ResNet-9."""

from __future__ import annotations

import pytest
import torch
from airbench_helpers import airbench_net94

from fastcifar.config import PRESETS, TrainConfig, model_options
from fastcifar.flops import main, recipe_flops
from fastcifar.model import ModelConfig, ResNet9, count_parameters, summary
from fastcifar.recipe import build_model


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


def test_the_flops_command_refuses_width_with_a_preset_that_sets_every_stage(capsys):
    """--width would be ignored beside the speedrun preset's widths: one line, exit 2, as training does."""
    from fastcifar.errors import run_cli

    assert run_cli(main, ["--preset", "speedrun", "--width", "16"], prog="fastcifar.flops") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--width" in err[0] and "speedrun" in err[0]


def test_the_flops_command_shows_a_presets_net(capsys):
    assert main(["--preset", "speedrun"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 2,009,784" in out and "FLOPs per image: 205.7 M forward" in out
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


def test_each_family_option_shapes_the_net_as_it_says():
    """Sabotage caught: any of plain, prep_bn, bn_eps, fc_bias or dirac ignored by ResNet9."""
    base = dict(widths=(6, 8, 12, 16), residual=())
    net = ResNet9(ModelConfig(**base, plain=(2,), prep_bn=False, bn_eps=1e-12, fc_bias=False, dirac=True))
    nn = torch.nn
    assert [type(m) for m in net.layer2[1]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]  # no skip: not a Residual
    assert net.layer2[1][0].weight.shape == (12, 12, 3, 3) and len(net.layer1) == 4  # layer 1: one conv_bn
    assert [type(m) for m in net.prep] == [nn.Conv2d, nn.ReLU] and torch.equal(
        net.prep[0].bias, torch.zeros(6)) and net.whitening_bias() is net.prep[0].bias
    assert all(m.eps == 1e-12 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert net.fc.bias is None
    x = torch.randn(1, 12, 5, 5)  # the plain conv starts as the identity: it passes its input through
    torch.testing.assert_close(net.layer2[1][0](x), x)
    classic = ResNet9(ModelConfig(**base))
    assert classic.whitening_bias() is classic.prep[1].bias and classic.fc.bias is not None
    identity = torch.nn.init.dirac_(torch.empty(8, 8, 3, 3))
    assert not torch.equal(classic.layer1[0].weight[:6], identity[:6, :6])
    assert torch.equal(net.layer1[0].weight[:6], identity[:6, :6])
    assert all(m.eps == 1e-5 for m in classic.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_a_checkpoint_header_without_the_newer_family_fields_loads_with_their_defaults():
    """What export/onnx.py and fastcifar.evaluate read from a model file written before these options existed."""
    import json

    from fastcifar.checkpoint import ModelInfo

    header = json.loads(ModelInfo(ModelConfig(width=4), ["a"] * 10, [0.5] * 3, [0.25] * 3).to_json())
    for name in ("plain", "prep_bn", "bn_eps", "fc_bias", "dirac"):
        del header["model"][name]
    assert ModelInfo.from_json(json.dumps(header)).config == ModelConfig(width=4)


def test_the_airbench94_preset_is_make_net94_parameter_by_parameter():
    """Shapes, which parameters train, BatchNorm eps and momentum, the identity-initialised filters, and the
    same outputs from the same weights (train and eval mode). Sabotage caught: deleting any of widths, residual,
    plain, prep_bn, bn_eps, fc_bias, dirac, prep_kernel, activation, bn_momentum, logit_scale, bn_weight or
    whiten_bias_epochs from the preset; dirac_ applied to the whole weight (the filters past in_channels zero)."""
    reference = airbench_net94()
    ours = build_model(TrainConfig(**PRESETS["airbench94"], channels_last=False), 10, torch.device("cpu"))
    pairs = list(zip(ours.parameters(), reference.parameters(), strict=True))
    assert [(p.shape, p.requires_grad) for p, _ in pairs] == [(r.shape, r.requires_grad) for _, r in pairs]
    norms = [[(m.eps, m.momentum) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
             for net in (ours, reference)]
    assert norms[0] == norms[1] and norms[0][0] == (1e-12, pytest.approx(0.4))
    for (p, r) in pairs:
        if p.dim() == 4:  # airbench's Conv: dirac_ on the first in_channels filters, the rest as PyTorch draws them
            assert torch.equal(p[:p.shape[1]], r[:r.shape[1]])
            if p.shape[0] > p.shape[1]:
                drawn, drawn_reference = p[p.shape[1]:].detach(), r[r.shape[1]:].detach()
                assert 0.8 < float(drawn.std() / drawn_reference.std()) < 1.25, p.shape  # >= 252 draws each
    assert torch.equal(ours.prep[0].bias, reference[0].bias)  # zero
    with torch.no_grad():
        for p, r in pairs:
            p.copy_(r)
    x = torch.randn(4, 3, 32, 32)
    for train in (True, False):
        torch.testing.assert_close(ours.train(train)(x), reference.train(train)(x))


def test_the_airbench94_presets_net_has_airbench94s_forward_count(capsys):
    assert main(["--preset", "airbench94"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 1,972,792" in out and "FLOPs per image: 236.3 M forward" in out
    assert count_parameters(airbench_net94()) == 1_972_792
    assert ModelConfig(**model_options(TrainConfig(**PRESETS["airbench94"]))).plain == (1, 2, 3)
