"""The custom ResNet (a ResNet-9) and its config. Nothing else lives here.

    python -m fastcifar.model --width 16           # layer table, output shapes, parameters, FLOPs per image
    python -m fastcifar.model --preset speedrun    # the speedrun recipe's net

    prep    conv3x3(3 -> w)                      BN ReLU           32x32
    layer1  conv3x3(w -> 2w)  maxpool2           BN ReLU  + R      16x16
    layer2  conv3x3(2w -> 4w) maxpool2           BN ReLU            8x8
    layer3  conv3x3(4w -> 8w) maxpool2           BN ReLU  + R       4x4
    head    global maxpool -> flatten -> linear(8w -> classes) * logit_scale

R is two (conv3x3 -> BN -> ReLU) blocks whose output is added to their input: y = x + F(x), the standard form.
Pooling comes before BN (cheaper: BN runs on a quarter of the pixels). Convolutions have no bias (BN follows).
At the default width 64 the net has 6,573,130 parameters. ModelConfig's other options make a family around it
for smaller budgets; every default is the classic net.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    width: int = 64  # channels of the prep layer; the stages get width x (1, 2, 4, 8)
    num_classes: int = 10
    logit_scale: float = 0.125  # 0.125 (David Page) keeps early softmax outputs soft with SGD at high lrs
    widths: tuple[int, int, int, int] | None = None  # (prep, layer1, layer2, layer3) channels instead of width's
    residual: tuple[int, ...] = (1, 3)  # the layers followed by a residual block
    prep_kernel: int = 3  # 3 (padded) or 2 (unpadded 2x2 patches, 31x31 out: airbench's whitening layer)
    activation: str = "relu"  # relu or gelu (airbench)
    bn_momentum: float = 0.1  # PyTorch's BatchNorm momentum: the weight of the newest batch in the running stats

    def __post_init__(self):  # JSON gives lists; the config stays hashable and comparable
        if self.widths is not None:
            object.__setattr__(self, "widths", tuple(int(c) for c in self.widths))
        object.__setattr__(self, "residual", tuple(sorted(int(i) for i in self.residual)))


def conv_bn(c_in: int, c_out: int, config: ModelConfig, pool: bool = False, kernel: int = 3) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel_size=kernel, padding=1 if kernel == 3 else 0, bias=False)
    activation = nn.GELU() if config.activation == "gelu" else nn.ReLU(inplace=True)
    return nn.Sequential(conv, *([nn.MaxPool2d(2)] if pool else []),
                         nn.BatchNorm2d(c_out, momentum=config.bn_momentum), activation)


class Residual(nn.Module):
    """y = x + F(x), F = two conv-BN-activation blocks at constant width."""

    def __init__(self, channels: int, config: ModelConfig):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels, config), conv_bn(channels, channels, config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        w = config.width
        c0, c1, c2, c3 = config.widths or (w, 2 * w, 4 * w, 8 * w)
        self.prep = conv_bn(3, c0, config, kernel=config.prep_kernel)
        self.layer1 = self._layer(c0, c1, 1)
        self.layer2 = self._layer(c1, c2, 2)
        self.layer3 = self._layer(c2, c3, 3)
        self.pool = nn.AdaptiveMaxPool2d(1)  # = maxpool4 on 32x32 inputs, and exports with any size
        self.fc = nn.Linear(c3, config.num_classes)

    def _layer(self, c_in: int, c_out: int, index: int) -> nn.Sequential:
        down = conv_bn(c_in, c_out, self.config, pool=True)
        # without a residual block (the classic layer2) the parameter names stay those of a plain conv_bn
        return nn.Sequential(down, Residual(c_out, self.config)) if index in self.config.residual else down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.config.logit_scale


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summary(model: ResNet9) -> str:
    """A layer table (output shape, parameters): torchinfo's when installed (`pip install fastcifar[summary]`),
    else one row per top-level stage."""
    shape = (1, 3, 32, 32)
    device = next(model.parameters()).device  # torchinfo would otherwise move the model to its own choice
    try:
        import torchinfo
    except ImportError:
        pass
    else:
        return str(torchinfo.summary(model, input_size=shape, depth=3, verbose=0, device=device,
                                     col_names=("output_size", "num_params")))
    rows: list[tuple[str, str, int]] = []
    hooks = [module.register_forward_hook(
        lambda m, i, o, name=name: rows.append((name, str(tuple(o.shape)), count_parameters(m))))
        for name, module in model.named_children()]
    was_training = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(shape, device=device))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    lines = [f"{'layer':<10} {'output shape':<22} {'params':>12}", "-" * 46]
    lines += [f"{name:<10} {out:<22} {n:>12,}" for name, out, n in rows]
    return "\n".join(lines + ["-" * 46, f"{'total':<33} {count_parameters(model):>12,}"])


def main(argv: Sequence[str] | None = None) -> int:
    from fastcifar.config import PRESETS, TrainConfig, model_options
    from fastcifar.flops import forward_flops, meta_model, train_step_flops
    from fastcifar.recipe import frozen_parameter_names

    parser = argparse.ArgumentParser(prog="python -m fastcifar.model",
                                     description="Print the model summary, parameters and FLOPs per image.")
    parser.add_argument("--width", type=int, default=None, help="channels of the prep layer (default: the preset's)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="the net of this recipe")
    parser.add_argument("--num-classes", type=int, default=10)
    args = parser.parse_args(argv)
    if (args.width is not None and args.width < 1) or args.num_classes < 1:
        parser.error("--width and --num-classes must be >= 1")
    recipe = TrainConfig(**{**PRESETS[args.preset], **({"width": args.width} if args.width else {})})
    model = ResNet9(ModelConfig(num_classes=args.num_classes, **model_options(recipe)))
    print(summary(model))
    counted = meta_model(model.config, frozen_parameter_names(recipe))  # as the recipe trains it
    print(f"parameters: {count_parameters(model):,}")
    print(f"FLOPs per image: {forward_flops(counted) / 1e6:,.1f} M forward, "
          f"{train_step_flops(counted) / 1e6:,.1f} M forward + backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
