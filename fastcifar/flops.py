"""The work of a run in floating-point operations, counted with `torch.utils.flop_counter`, not by hand.

    python -m fastcifar.flops --preset speedrun   # the recipe's net: layer table, parameters, FLOPs per image
    python -m fastcifar.flops --width 16

A run's work (`recipe_flops`) is its training images x one image's forward + backward (frozen parameters need
no gradient), plus its final evaluation: test images x its TTA views x one forward, counted on the meta device.
Convolutions and matrix products count, 2 FLOPs per multiply-add (airbench's 0.36 PFLOP convention); BatchNorm,
activations, pooling, the optimizer and the per-epoch evaluations (outside the run's clock too) do not.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastcifar.config import PRESETS, ArgumentParser, TrainConfig
from fastcifar.errors import run_cli
from fastcifar.evaluate import tta_views
from fastcifar.model import ModelConfig, ResNet9, count_parameters, summary
from fastcifar.recipe import build_model, total_steps, whiten_bias_steps

COUNT_BATCH = 2  # BatchNorm in training mode needs more than one value per channel


def per_image_flops(model: nn.Module, train: bool = False, image_shape: tuple[int, int, int] = (3, 32, 32)) -> int:
    """FLOPs of one image through `model` (on the meta device, or any), in the dtype of its first weights:
    the forward pass in eval mode, or with `train` forward + backward in training mode (gradients for the
    parameters that require them; none for the input). The model's mode comes back, the counted gradients go."""
    first = next(model.parameters())
    inputs = torch.zeros((COUNT_BATCH, *image_shape), device=first.device, dtype=first.dtype)
    was_training = model.training
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
        logits = model.train(train)(inputs)
        if train:
            logits.float().sum().backward()
            model.zero_grad(set_to_none=True)
    model.train(was_training)
    return int(counter.get_total_flops()) // COUNT_BATCH


def meta_model(model_config: ModelConfig) -> ResNet9:
    with torch.device("meta"):  # no memory, no random numbers drawn
        return ResNet9(model_config)


def recipe_flops(config: TrainConfig, num_train: int, num_test: int, num_classes: int = 10,
                 world_size: int = 1) -> dict[str, Any]:
    """The work of one run (one seed) of `config` on `num_train` training and `num_test` test images:
    {"train", "eval", "per_run"} in FLOPs, and the per-image counts they come from ("per_image_train" while
    the whitening bias trains, "per_image_train_stopped" after a --whiten-bias-stop grad)."""
    with torch.device("meta"):  # the net as it trains (frozen parameters too), without memory
        model = build_model(config, num_classes, torch.device("meta"))
    per_image_train, per_image_forward = per_image_flops(model, train=True), per_image_flops(model)
    per_image_stopped = per_image_train
    if config.whiten_bias_epochs and config.whiten_bias_stop == "grad":
        model.whitening_bias().requires_grad_(False)
        per_image_stopped = per_image_flops(model, train=True)
    global_batch = config.batch_size * world_size
    steps_per_epoch = num_train // global_batch
    steps, trained = total_steps(config, steps_per_epoch), whiten_bias_steps(config, steps_per_epoch)
    views = len(tta_views(config.tta, config.tta_translate))  # the recipe's own final evaluation
    train = (per_image_train * trained + per_image_stopped * (steps - trained)) * global_batch
    evaluation = per_image_forward * views * num_test
    return {"train": train, "eval": evaluation, "per_run": train + evaluation,
            "per_image_forward": per_image_forward, "per_image_train": per_image_train,
            "per_image_train_stopped": per_image_stopped, "train_images": steps * global_batch,
            "eval_views": views}


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fastcifar.flops",
                            description="Print the model summary, parameters and FLOPs per image.")
    parser.add_argument("--width", type=int, default=None, help="channels of the prep layer (default: the preset's)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="the net of this recipe")
    parser.add_argument("--num-classes", type=int, default=10)
    args = parser.parse_args(argv)
    if (args.width is not None and args.width < 1) or args.num_classes < 1:
        parser.error("--width and --num-classes must be >= 1")
    if args.width and PRESETS[args.preset].get("widths"):
        parser.error(f"--width with --preset {args.preset}, whose widths set every stage: use --preset default")
    recipe = TrainConfig(**PRESETS[args.preset])
    recipe = replace(recipe, width=args.width) if args.width else recipe
    model = build_model(recipe, args.num_classes, torch.device("cpu"))
    print(summary(model))
    print(f"parameters: {count_parameters(model):,}")
    print(f"FLOPs per image: {per_image_flops(model) / 1e6:,.1f} M forward, "
          f"{per_image_flops(model, train=True) / 1e6:,.1f} M forward + backward")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.flops"))
