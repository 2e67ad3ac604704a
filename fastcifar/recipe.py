"""What a TrainConfig turns into: loaders, model, optimizer (param groups), loss, scheduler, step counts
and the fresh initialization of each seed.

    python -c "from fastcifar.recipe import *; print(epoch_steps(TrainConfig(epochs=2.5), 97))"  # [97, 97, 48]
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from fastcifar import augment
from fastcifar.config import TrainConfig, model_options
from fastcifar.distributed import Dist
from fastcifar.errors import UserError
from fastcifar.model import ModelConfig, ResNet9
from fastcifar.muon import MuonWithSGD, split_for_muon
from fastcifar.whiten import init_whitening


def build_loaders(config: TrainConfig, data, device: torch.device, dtype: torch.dtype | None, seed: int,
                  dist: Dist = Dist()):
    """(train, test) loaders for the chosen pipeline. The device pipeline lives on `device` in the AMP dtype;
    under torchrun each rank gets its shard of one shared permutation (same seed on every rank)."""
    common = dict(mean=data.mean, std=data.std, batch_size=config.batch_size)
    aug = dict(translate=config.translate, cutout=config.cutout, flip=config.flip, pad_mode=config.pad_mode)
    if config.pipeline == "albumentations":
        if dist.enabled:
            raise UserError("--pipeline albumentations runs in one process only: use --pipeline gpu with torchrun")
        from fastcifar.reference import reference_loader

        return (reference_loader(data.train_images, data.train_labels, train=True, drop_last=True, seed=seed,
                                 num_workers=config.workers, **common, **aug),
                reference_loader(data.test_images, data.test_labels, train=False, num_workers=config.workers, **common))
    common.update(device=device, dtype=dtype or torch.float32, channels_last=config.channels_last, rank=dist.rank,
                  world_size=dist.world_size)
    # the test set in one batch shape (the short last batch padded), so evaluation never recompiles
    return (augment.DeviceLoader(data.train_images, data.train_labels, train=True, alt_flip=config.alt_flip,
                                 drop_last=True, seed=seed, **common, **aug),
            augment.DeviceLoader(data.test_images, data.test_labels, train=False, pad_last=True, **common))


def check_batch_size(config: TrainConfig, num_train: int, dist: Dist) -> None:
    per_process = num_train // dist.world_size
    if config.batch_size > per_process:
        raise UserError(f"invalid --batch-size ({config.batch_size}): larger than the {per_process} training "
                        "images per process, so no full batch exists; lower --batch-size")


def build_model(config: TrainConfig, num_classes: int, device: torch.device) -> ResNet9:
    """The recipe's net on `device`, the parameters it never trains frozen: with --no-bn-weight the BatchNorm
    scales stay 1 (the next conv is free to scale, so they are redundant); with --whiten-bias-epochs the
    whitening filters, which are data statistics, not learned."""
    layout = torch.channels_last if config.channels_last else torch.preserve_format
    model = ResNet9(ModelConfig(num_classes=num_classes, **model_options(config))).to(device, memory_format=layout)
    frozen = [] if config.bn_weight else [module.weight for module in model.modules()
                                          if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for parameter in frozen + ([model.prep[0].weight] if config.whiten_bias_epochs else []):
        parameter.requires_grad_(False)
    return model


def param_groups(config: TrainConfig, model: ResNet9) -> list[dict[str, Any]]:
    """Trainable parameters in groups whose `lr_scale` is their multiple of the base lr. With --bias-lr the BatchNorm
    biases form a second group, lr scaled up and weight decay down (the same decay per step); with --whiten-bias-epochs
    the bias after the whitening conv is a group of its own, "whiten_bias", set as the one it would join."""
    scale = config.bias_lr
    prep_bias = model.whitening_bias() if config.whiten_bias_epochs else None
    biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    trainable = [p for p in model.parameters() if p.requires_grad and p is not prep_bias]
    bias_group = dict(lr_scale=scale, lr=config.lr * scale, weight_decay=config.weight_decay / scale)
    if scale == 1.0:
        groups = [dict(params=trainable, lr_scale=1.0)]
    else:
        groups = [dict(params=[p for p in trainable if id(p) not in biases], lr_scale=1.0),
                  dict(params=[p for p in trainable if id(p) in biases], **bias_group)]
    if prep_bias is not None:
        groups.append(dict(params=[prep_bias], name="whiten_bias",
                           **(bias_group if id(prep_bias) in biases else dict(lr_scale=1.0))))
    return groups


def stop_whitening_bias(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: int) -> None:
    """From epoch `config.whiten_bias_epochs` on (0-based `epoch`), the "whiten_bias" group stops as
    --whiten-bias-stop says: its scheduled lr becomes 0 (lr), or its bias stops requiring a gradient (grad)."""
    stopped = epoch >= config.whiten_bias_epochs
    for group in [g for g in optimizer.param_groups if g.get("name") == "whiten_bias"]:  # none without the flag
        if config.whiten_bias_stop == "grad":  # set every epoch: a model shared by several seeds starts trained
            group["params"][0].requires_grad_(not stopped)
        elif stopped:
            group.update({key: 0.0 for key in ("lr", "initial_lr", "max_lr", "min_lr") if key in group})


def build_optimizer(config: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = param_groups(config, model)
    fused = {"fused": True} if device.type == "cuda" else {}
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=(config.momentum, 0.999),
                                weight_decay=config.weight_decay, **fused)
    if config.optimizer == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise UserError(f"--optimizer muon needs torch.optim.Muon (torch >= 2.9; this is {torch.__version__}): "
                            "upgrade torch or use --optimizer sgd")
        matrices, rest = split_for_muon(params)
        return MuonWithSGD(matrices, rest, lr=config.lr, muon_lr=config.muon_lr, momentum=config.momentum,
                           muon_momentum=config.muon_momentum, weight_decay=config.weight_decay,
                           fused=device.type == "cuda")
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay, **fused)


def check_optimizer_dtype(config: TrainConfig, dtype: torch.dtype | None) -> None:
    """Muon's matrices get their gradients inside its step, where a GradScaler cannot unscale them: no fp16."""
    if config.optimizer == "muon" and dtype == torch.float16:
        raise UserError("invalid --optimizer muon with fp16 (a GradScaler cannot unscale Muon's matrices): train "
                        "in bf16 (--amp-dtype bf16) or fp32 (--no-amp)")


def build_criterion(config: TrainConfig) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of one run: --epochs may be fractional, the last epoch then stops early."""
    steps = config.epochs * steps_per_epoch
    return max(1, math.ceil(round(steps, 6)) if config.step_rounding == "ceil" else round(steps))  # 6: float noise


def whiten_bias_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Steps that train the whitening bias (all of them unless --whiten-bias-epochs stops it)."""
    total = total_steps(config, steps_per_epoch)
    return min(total, math.ceil(config.whiten_bias_epochs) * steps_per_epoch) if config.whiten_bias_epochs else total


def epoch_steps(config: TrainConfig, steps_per_epoch: int) -> list[int]:
    """Steps of each epoch: full epochs, then the remainder (if any)."""
    total = total_steps(config, steps_per_epoch)
    return [min(steps_per_epoch, total - start) for start in range(0, total, steps_per_epoch)]


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One Cycle (torch's OneCycleLR) over all steps, each group at its `lr_scale`; momentum (Adam: beta1) cycles
    between --momentum and --min-momentum except in groups with a `fixed_momentum` (Muon's)."""
    groups = optimizer.param_groups
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[config.lr * g.get("lr_scale", 1.0) for g in groups],
        total_steps=total_steps(config, steps_per_epoch), pct_start=config.pct_start,
        anneal_strategy=config.anneal, div_factor=config.div_factor, final_div_factor=config.final_div_factor,
        cycle_momentum=config.min_momentum < config.momentum,
        base_momentum=[g.get("fixed_momentum", config.min_momentum) for g in groups],
        max_momentum=[g.get("fixed_momentum", config.momentum) for g in groups])


def init_weights(model: ResNet9, config: TrainConfig, data, seed: int, whiten_sample: int = 5000) -> None:
    """Fresh initialization for `seed`, in place, so the compiled (and DDP-wrapped) model stays valid; with
    --whiten, then the patch-whitening init of the prep conv from `whiten_sample` training images spread
    evenly over the set (image-folder data is sorted by class, so a prefix would be one class only)."""
    torch.manual_seed(seed)
    model.load_state_dict(ResNet9(model.config).state_dict())
    if config.whiten:
        num_train = len(data.train_images)
        pick = np.linspace(0, num_train - 1, min(whiten_sample, num_train)).round().astype(np.int64)
        images = augment.normalize_images(data.train_images[pick], data.mean, data.std, next(model.parameters()).device)
        init_whitening(model.prep[0], images.permute(0, 3, 1, 2))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
