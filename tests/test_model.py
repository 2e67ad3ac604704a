"""The custom ResNet-9."""

from __future__ import annotations

import pytest
import torch

from fastcifar.model import ModelConfig, ResNet9, count_parameters, main, resnet9, summary


def test_default_width_has_the_classic_parameter_count():
    assert count_parameters(resnet9()) == 6_573_130


@pytest.mark.parametrize("width", [4, 16, 64])
def test_width_scales_every_stage(width):
    model = resnet9(width=width)
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [width, 2 * width, 2 * width, 2 * width, 4 * width, 8 * width, 8 * width, 8 * width]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_residual_block_is_the_standard_form():
    model = resnet9(width=4).eval()
    block = model.layer1[1]
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + block.body(x))


def test_no_conv_bias_and_logit_scale_applies():
    model = resnet9(width=4, logit_scale=0.5).eval()
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
    assert "412,954" in summary(resnet9(width=16))
