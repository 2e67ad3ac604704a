"""What a TrainConfig turns into: loaders, model, optimizer (param groups), loss, scheduler, step counts
and the fresh initialization of each seed.

    python -c "from fastcifar.recipe import *; print(epoch_steps(TrainConfig(epochs=2.5), 97))"  # [97, 97, 48]
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from fastcifar.config import TrainConfig
from fastcifar.distributed import Dist
from fastcifar.errors import UserError
from fastcifar.model import ModelConfig, ResNet9


@runtime_checkable
class ResumableLoader(Protocol):
    """A loader that can resume mid-epoch and be reseeded in place (the device-resident one); the
    albumentations DataLoader is not one, and is rebuilt for each seed and replayed to resume."""

    def __len__(self) -> int: ...
    def reseed(self, seed: int) -> None: ...
    def plan_epoch(self) -> Any: ...
    def batches(self, plan: Any, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def build_loaders(config: TrainConfig, data, device: torch.device, dtype: torch.dtype | None, seed: int,
                  dist: Dist = Dist()):
    """(train, test) loaders for the chosen pipeline. The device pipeline lives on `device` in the AMP dtype;
    under torchrun each rank gets its shard of one shared permutation (same seed on every rank)."""
    aug = dict(translate=config.translate, cutout=config.cutout, flip=config.flip, pad_mode=config.pad_mode)
    if config.pipeline == "albumentations":
        if dist.enabled:
            raise UserError("--pipeline albumentations runs in one process only: use --pipeline gpu with torchrun")
        from fastcifar.reference import reference_loader

        common = dict(mean=data.mean, std=data.std, batch_size=config.batch_size, num_workers=config.workers)
        train = reference_loader(data.train_images, data.train_labels, train=True, drop_last=True, seed=seed,
                                 **common, **aug)
        test = reference_loader(data.test_images, data.test_labels, train=False, **common)
        return train, test
    from fastcifar.augment import DeviceLoader

    common = dict(mean=data.mean, std=data.std, batch_size=config.batch_size, device=device,
                  dtype=dtype or torch.float32, channels_last=config.channels_last, rank=dist.rank,
                  world_size=dist.world_size)
    train = DeviceLoader(data.train_images, data.train_labels, train=True, alt_flip=config.alt_flip,
                         drop_last=True, seed=seed, **common, **aug)
    # one batch shape for the whole test set (the short last batch padded), so evaluation never recompiles
    test = DeviceLoader(data.test_images, data.test_labels, train=False, pad_last=True, **common)
    return train, test


def loader_seconds(*loaders) -> tuple[float, float]:
    """(host-to-device upload, on-device preparation) seconds of the device-resident loaders among
    `loaders`; (0, 0) for the albumentations one, which prepares every batch on the host while training."""
    from fastcifar.augment import DeviceLoader

    resident = [loader for loader in loaders if isinstance(loader, DeviceLoader)]
    return sum(loader.upload_seconds for loader in resident), sum(loader.prep_seconds for loader in resident)


def check_batch_size(config: TrainConfig, num_train: int, dist: Dist) -> None:
    per_process = num_train // dist.world_size
    if config.batch_size > per_process:
        raise UserError(f"invalid --batch-size ({config.batch_size}): larger than the {per_process} training "
                        "images per process, so no full batch exists; lower --batch-size")


def build_model(config: TrainConfig, num_classes: int, device: torch.device) -> ResNet9:
    model = ResNet9(ModelConfig(width=config.width, num_classes=num_classes, logit_scale=config.logit_scale))
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not config.bn_weight:  # scales stay 1: with the next conv free to scale, they are redundant
        for bn in batch_norms(model):
            bn.weight.requires_grad_(False)
    return model


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def param_groups(config: TrainConfig, model: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters; with --bias-lr the BatchNorm biases form a second group whose lr is scaled
    up and whose weight decay coefficient is scaled down, so they decay by the same amount per step.
    Each group's `lr_scale` tells the scheduler (and lr_find) its multiple of the base lr."""
    biases = {id(bn.bias) for bn in batch_norms(model) if bn.bias is not None and bn.bias.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.bias_lr == 1.0 or not biases:
        return [dict(params=trainable, lr_scale=1.0)]
    return [dict(params=[p for p in trainable if id(p) not in biases], lr_scale=1.0),
            dict(params=[p for p in trainable if id(p) in biases], lr_scale=config.bias_lr,
                 lr=config.lr * config.bias_lr, weight_decay=config.weight_decay / config.bias_lr)]


def build_optimizer(config: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = param_groups(config, model)
    fused = {"fused": True} if device.type == "cuda" else {}
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=(config.momentum, 0.999),
                                weight_decay=config.weight_decay, **fused)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay, **fused)


def build_criterion(config: TrainConfig) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of one run: --epochs may be fractional, the last epoch then stops early."""
    return max(1, round(config.epochs * steps_per_epoch))


def epoch_steps(config: TrainConfig, steps_per_epoch: int) -> list[int]:
    """Steps of each epoch: full epochs, then the remainder (if any)."""
    total = total_steps(config, steps_per_epoch)
    return [min(steps_per_epoch, total - start) for start in range(0, total, steps_per_epoch)]


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One Cycle over all steps: lr from lr/div up to lr at pct_start, then down to lr/(div*final_div);
    momentum (or Adam's beta1) cycles the opposite way between momentum and min_momentum."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[config.lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups],
        total_steps=total_steps(config, steps_per_epoch), pct_start=config.pct_start,
        anneal_strategy=config.anneal, div_factor=config.div_factor, final_div_factor=config.final_div_factor,
        cycle_momentum=config.min_momentum < config.momentum, base_momentum=config.min_momentum,
        max_momentum=config.momentum)


def init_weights(model: ResNet9, config: TrainConfig, data, seed: int, whiten_sample: int = 5000) -> None:
    """Fresh initialization for `seed`, in place, so the compiled (and DDP-wrapped) model stays valid; with
    --whiten, then the patch-whitening init of the prep conv from `whiten_sample` training images."""
    torch.manual_seed(seed)
    model.load_state_dict(ResNet9(model.config).state_dict())
    if config.whiten:
        from fastcifar.augment import normalize_images
        from fastcifar.whiten import init_whitening

        # evenly spread over the training set: image-folder data is sorted by class, so a prefix would be
        # one class only
        num_train = len(data.train_images)
        pick = np.linspace(0, num_train - 1, min(whiten_sample, num_train)).round().astype(np.int64)
        device = next(model.parameters()).device
        images = normalize_images(data.train_images[pick], data.mean, data.std, device)
        init_whitening(model.prep[0], images.permute(0, 3, 1, 2))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
