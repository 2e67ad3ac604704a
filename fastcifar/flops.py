"""The work of a run in floating-point operations, counted with `torch.utils.flop_counter`, not by hand.

    python -m fastcifar.model --width 16          # prints FLOPs per image next to the parameters
    python -c "from fastcifar.config import TrainConfig; from fastcifar.flops import recipe_flops; \\
        print(recipe_flops(TrainConfig(), 50000, 10000))"

A run's work is the training images it steps through x one image's forward + backward (frozen parameters
need no weight gradient), plus its final evaluation: test images x the views of its TTA x one image's forward.
Both per-image counts come from the meta device: no memory, no time. Matrix multiplications and convolutions
count, 2 FLOPs per multiply-add (the convention of airbench's 0.36 PFLOP); BatchNorm, activations, pooling,
the optimizer and the per-epoch evaluations (outside the run's clock too) do not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastcifar.model import ModelConfig, ResNet9

COUNT_BATCH = 2  # BatchNorm in training mode needs more than one value per channel


def _per_image_flops(model: nn.Module, image_shape: tuple[int, int, int], train: bool) -> int:
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


def forward_flops(model: nn.Module, image_shape: tuple[int, int, int] = (3, 32, 32)) -> int:
    return _per_image_flops(model, image_shape, train=False)


def train_step_flops(model: nn.Module, image_shape: tuple[int, int, int] = (3, 32, 32)) -> int:
    return _per_image_flops(model, image_shape, train=True)


def meta_model(model_config: ModelConfig, frozen: tuple[str, ...] = ()) -> ResNet9:
    """The model on the meta device (no memory), with the parameters named in `frozen` not trainable."""
    with torch.device("meta"):
        model = ResNet9(model_config)
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    return model


def recipe_flops(config, num_train: int, num_test: int, num_classes: int = 10, world_size: int = 1) -> dict[str, Any]:
    """The work of one run (one seed) of the TrainConfig `config` on `num_train` training and `num_test`
    test images: {"train", "eval", "per_run"} in FLOPs, and the per-image counts they come from."""
    from fastcifar.config import model_options
    from fastcifar.evaluate import tta_views
    from fastcifar.recipe import frozen_parameter_names, total_steps

    model = meta_model(ModelConfig(num_classes=num_classes, **model_options(config)), frozen_parameter_names(config))
    per_image_train, per_image_forward = train_step_flops(model), forward_flops(model)
    global_batch = config.batch_size * world_size
    steps = total_steps(config, num_train // global_batch)
    views = len(tta_views(config.tta, config.tta_translate))  # the recipe's own final evaluation
    train = per_image_train * steps * global_batch
    evaluation = per_image_forward * views * num_test
    return {"train": train, "eval": evaluation, "per_run": train + evaluation,
            "per_image_forward": per_image_forward, "per_image_train": per_image_train,
            "train_images": steps * global_batch, "eval_views": views}
