"""The custom ResNet (a ResNet-9) and its config. Nothing else lives here.

    prep    conv3x3(3 -> w)                      BN ReLU           32x32
    layer1  conv3x3(w -> 2w)  maxpool2           BN ReLU  + R      16x16
    layer2  conv3x3(2w -> 4w) maxpool2           BN ReLU            8x8
    layer3  conv3x3(4w -> 8w) maxpool2           BN ReLU  + R       4x4
    head    global maxpool -> flatten -> linear(8w -> classes) * logit_scale

R is two (conv3x3 -> BN -> ReLU) blocks whose output is added to their input: y = x + F(x). The original
notebook's block computed x + relu(F(x) + x), adding the input twice; we use the standard form. Pooling
comes before BN (cheaper: BN runs on a quarter of the pixels). Convolutions have no bias (BN follows). At
the default width 64 the net has 6,573,130 parameters.

The family around it, for budgets smaller than the classic net's (every default is the classic net):
per-stage widths (`widths`), which layers carry a residual block (`residual`), a 2x2 unpadded first conv
(`prep_kernel=2`: airbench's whitening patch, 31x31 after it), GELU instead of ReLU, BatchNorm momentum.

    python -m fastcifar.model --width 16           # layer table, output shapes, parameters, FLOPs per image
    python -m fastcifar.model --preset speedrun    # the speedrun recipe's net
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn


ACTIVATIONS = ("relu", "gelu")


@dataclass(frozen=True)
class ModelConfig:
    """Args:
        width: channels of the prep layer; stages use width x (1, 2, 4, 8). 64 is the classic net.
        num_classes: size of the output layer.
        logit_scale: multiplies the logits; 0.125 (David Page) keeps early softmax outputs soft with
            SGD at high learning rates. 1.0 is the plain net.
        widths: (prep, layer1, layer2, layer3) channels, replacing `width`'s multiples; None = from width.
        residual: the layers (1, 2, 3) followed by a residual block.
        prep_kernel: 3 (padded, the classic net) or 2 (unpadded 2x2 patches: 31x31 out, airbench's
            whitening layer, 12-dimensional patches).
        activation: relu or gelu (airbench).
        bn_momentum: PyTorch's BatchNorm momentum, the weight of the newest batch in the running stats.
    """

    width: int = 64
    num_classes: int = 10
    logit_scale: float = 0.125
    widths: tuple[int, int, int, int] | None = None
    residual: tuple[int, ...] = (1, 3)
    prep_kernel: int = 3
    activation: str = "relu"
    bn_momentum: float = 0.1

    def __post_init__(self):  # JSON gives lists; the config stays hashable and comparable
        if self.widths is not None:
            object.__setattr__(self, "widths", tuple(int(c) for c in self.widths))
        object.__setattr__(self, "residual", tuple(sorted(int(i) for i in self.residual)))

    def stage_widths(self) -> tuple[int, int, int, int]:
        w = self.width
        return self.widths if self.widths is not None else (w, 2 * w, 4 * w, 8 * w)

    def to_dict(self) -> dict:
        return asdict(self)


def conv_bn(c_in: int, c_out: int, config: ModelConfig, pool: bool = False, kernel: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=kernel, padding=1 if kernel == 3 else 0,
                                         bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out, momentum=config.bn_momentum),
               nn.GELU() if config.activation == "gelu" else nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


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
        c0, c1, c2, c3 = config.stage_widths()
        self.prep = conv_bn(3, c0, config, kernel=config.prep_kernel)
        self.layer1 = self._layer(c0, c1, 1)
        self.layer2 = self._layer(c1, c2, 2)
        self.layer3 = self._layer(c2, c3, 3)
        self.pool = nn.AdaptiveMaxPool2d(1)  # = maxpool4 on 32x32 inputs, and exports with any size
        self.fc = nn.Linear(c3, config.num_classes)

    def _layer(self, c_in: int, c_out: int, index: int) -> nn.Sequential:
        down = conv_bn(c_in, c_out, self.config, pool=True)
        if index not in self.config.residual:
            return down  # the classic layer2: its parameter names stay those of a plain conv_bn
        return nn.Sequential(down, Residual(c_out, self.config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x) * self.config.logit_scale


def resnet9(width: int = 64, num_classes: int = 10, logit_scale: float = 0.125) -> ResNet9:
    """Build the custom ResNet-9. See `ModelConfig` for the arguments."""
    return ResNet9(ModelConfig(width=width, num_classes=num_classes, logit_scale=logit_scale))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summary(model: ResNet9, batch_size: int = 1) -> str:
    """A layer table (output shape, parameters) like the notebook's torchsummary printout.

    Uses torchinfo when installed (`pip install fastcifar[summary]`); otherwise a plain table of the
    top-level stages, built with forward hooks.
    """
    shape = (batch_size, 3, 32, 32)
    try:
        import torchinfo
    except ImportError:
        return _plain_summary(model, shape)
    device = next(model.parameters()).device  # torchinfo would otherwise move the model to its own choice
    stats = torchinfo.summary(model, input_size=shape, depth=3, verbose=0, device=device,
                              col_names=("output_size", "num_params"))
    return str(stats)


def _plain_summary(model: nn.Module, shape: tuple[int, ...]) -> str:
    rows: list[tuple[str, str, int]] = []
    hooks = [module.register_forward_hook(
        lambda m, i, o, name=name: rows.append((name, str(tuple(o.shape)), count_parameters(m))))
        for name, module in model.named_children()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    lines = [f"{'layer':<10} {'output shape':<22} {'params':>12}", "-" * 46]
    lines += [f"{name:<10} {out:<22} {n:>12,}" for name, out, n in rows]
    lines += ["-" * 46, f"{'total':<33} {count_parameters(model):>12,}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from fastcifar.config import PRESETS, TrainConfig, model_options

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
    from fastcifar.flops import forward_flops, meta_model, train_step_flops

    counted = meta_model(model.config)
    print(f"parameters: {count_parameters(model):,}")
    print(f"FLOPs per image: {forward_flops(counted) / 1e6:,.1f} M forward, "
          f"{train_step_flops(counted) / 1e6:,.1f} M forward + backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
