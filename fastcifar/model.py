"""The custom ResNet (a ResNet-9) and its config. Nothing else lives here.

    python -m fastcifar.flops --preset speedrun    # layer table, parameters, FLOPs per image of a recipe's net

    prep    conv3x3(3 -> w)                      BN ReLU           32x32
    layer1  conv3x3(w -> 2w)  maxpool2           BN ReLU  + R      16x16
    layer2  conv3x3(2w -> 4w) maxpool2           BN ReLU            8x8
    layer3  conv3x3(4w -> 8w) maxpool2           BN ReLU  + R       4x4
    head    global maxpool -> flatten -> linear(8w -> classes) * logit_scale

R is two (conv3x3 -> BN -> ReLU) blocks whose output is added to their input: y = x + F(x), the standard form.
Pooling comes before BN (cheaper: BN runs on a quarter of the pixels). Convolutions have no bias (BN follows).
At the default width 64 the net has 6,573,130 parameters. ModelConfig's other options make a family around it
for smaller budgets, airbench94's net among them (a 2x2 first conv with a bias and no BN, a plain second
conv-BN-GELU after each layer); every default is the classic net.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    plain: tuple[int, ...] = ()  # layers followed by one more conv-BN-activation, no skip (airbench's ConvGroup)
    prep_bn: bool = True  # False: the prep conv has a bias (zero at init) and no BatchNorm (airbench)
    bn_eps: float = 1e-5  # BatchNorm's eps (airbench: 1e-12)
    fc_bias: bool = True  # the final linear layer's bias (airbench: none)
    dirac: bool = False  # each conv's first in_channels filters start as the identity (airbench)

    def __post_init__(self):  # JSON gives lists; the config stays hashable and comparable
        if self.widths is not None:
            object.__setattr__(self, "widths", tuple(int(c) for c in self.widths))
        for name in ("residual", "plain"):
            object.__setattr__(self, name, tuple(sorted(int(i) for i in getattr(self, name))))


def conv_bn(c_in: int, c_out: int, config: ModelConfig, pool: bool = False, kernel: int = 3,
            norm: bool = True) -> nn.Sequential:
    """conv (-> maxpool2) -> BN -> activation; without `norm` the conv has a bias, zero at init, and no BN."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=kernel, padding=1 if kernel == 3 else 0, bias=not norm)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    activation = nn.GELU() if config.activation == "gelu" else nn.ReLU(inplace=True)
    bn = [nn.BatchNorm2d(c_out, eps=config.bn_eps, momentum=config.bn_momentum)] if norm else []
    return nn.Sequential(conv, *([nn.MaxPool2d(2)] if pool else []), *bn, activation)


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
        c0, c1, c2, c3 = config.widths or [config.width * k for k in (1, 2, 4, 8)]
        self.prep = conv_bn(3, c0, config, kernel=config.prep_kernel, norm=config.prep_bn)
        self.layer1 = self._layer(c0, c1, 1)
        self.layer2 = self._layer(c1, c2, 2)
        self.layer3 = self._layer(c2, c3, 3)
        self.pool = nn.AdaptiveMaxPool2d(1)  # = maxpool4 on 32x32 inputs, and exports with any size
        self.fc = nn.Linear(c3, config.num_classes, bias=config.fc_bias)
        if config.dirac:
            with torch.no_grad():
                for conv in (m for m in self.modules() if isinstance(m, nn.Conv2d)):
                    nn.init.dirac_(conv.weight[:conv.in_channels])

    def _layer(self, c_in: int, c_out: int, index: int) -> nn.Sequential:
        blocks = [conv_bn(c_in, c_out, self.config, pool=True)]
        blocks += [conv_bn(c_out, c_out, self.config)] if index in self.config.plain else []
        blocks += [Residual(c_out, self.config)] if index in self.config.residual else []
        # a lone conv_bn (the classic layer2) keeps the parameter names of a plain conv_bn
        return nn.Sequential(*blocks) if len(blocks) > 1 else blocks[0]

    def whitening_bias(self) -> nn.Parameter:
        """The bias right after the first conv: its BatchNorm's, or with prep_bn=False the conv's own."""
        return self.prep[1].bias if self.config.prep_bn else self.prep[0].bias

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
