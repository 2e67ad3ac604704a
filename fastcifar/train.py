"""Train the custom ResNet-9 on CIFAR-10: One Cycle, AMP, channels_last, torch.compile, multi-seed runs.

    python -m fastcifar.train --data-dir ../shared/data/cifar10-png.tar.gz --out-dir runs/default
    python -m fastcifar.train --data-dir ../shared/data/cifar10-png.tar.gz --width 16 --epochs 10 --device cpu
    python -m fastcifar.train --preset seed --data-dir ... --out-dir runs/seed     # the original notebook
    python -m fastcifar.train --preset speedrun --data-dir ... --runs 5            # the fast recipe, 5 seeds
    python -m fastcifar.train --resume runs/default                                # continue after a stop

A run directory gets config.json, metrics.csv, summary.json, model.safetensors (+ everything needed to
rebuild the model), checkpoint.pt (resumable state) and, with --plots, curves/confusion/misclassified PNGs.
The hot loop never synchronizes with the device: loss and accuracy are summed on the device and read once
per epoch; timing uses CUDA events on a GPU.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import math
import os
import platform
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastcifar import __version__
from fastcifar.atomic import write_json, write_text
from fastcifar.checkpoint import CHECKPOINT_FILE, MODEL_FILE, ModelInfo, load_checkpoint, save_checkpoint, save_model
from fastcifar.config import TrainConfig, parse_config, to_dict, validate
from fastcifar.distributed import Dist, all_reduce_max, all_reduce_sum, broadcast_flag, from_env, \
    gather_interleaved, process_group
from fastcifar.errors import UserError, run_cli
from fastcifar.lookahead import Lookahead
from fastcifar.model import ModelConfig, ResNet9, count_parameters, summary

RESULT_FILES = ("summary.json", "metrics.csv", MODEL_FILE, CHECKPOINT_FILE)
METRIC_COLUMNS = ("seed", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds")


# ------------------------------------------------------------------------------------------------------
# Devices and precision
# ------------------------------------------------------------------------------------------------------
def select_device(name: str) -> torch.device:
    available = {"cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
                 "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, ok in available.items() if ok))
    if not available[name]:
        raise UserError(f"invalid --device ({name}): not available on this machine; use --device cpu or auto")
    return torch.device(name)


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls/convolutions and cuDNN autotuning on CUDA; nothing elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 where the device supports it (no loss scaling needed), fp16 otherwise, None without AMP."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Timer:
    """Wall time of a region, synchronized with the device (CUDA events on a GPU)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "Timer":
        self.start_wall = time.perf_counter()
        if self.device.type == "cuda":
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000
        else:
            if self.device.type == "mps":
                torch.mps.synchronize()
            self.seconds = time.perf_counter() - self.start_wall


# ------------------------------------------------------------------------------------------------------
# Data, model, optimizer
# ------------------------------------------------------------------------------------------------------
def build_loaders(config: TrainConfig, data, device: torch.device, dtype: torch.dtype | None, seed: int,
                  d: Dist = Dist()):
    """(train, test) loaders for the chosen pipeline. The gpu pipeline lives on `device` in the AMP dtype;
    under torchrun each rank gets its shard of one shared permutation (same seed on every rank)."""
    aug = dict(translate=config.translate, cutout=config.cutout, flip=config.flip, pad_mode=config.pad_mode)
    if config.pipeline == "albumentations":
        if d.enabled:
            raise UserError("--pipeline albumentations runs in one process only: use --pipeline gpu with torchrun")
        from fastcifar.reference import reference_loader

        common = dict(mean=data.mean, std=data.std, batch_size=config.batch_size, num_workers=config.workers)
        train = reference_loader(data.train_images, data.train_labels, train=True, drop_last=True, seed=seed,
                                 **common, **aug)
        test = reference_loader(data.test_images, data.test_labels, train=False, **common)
        return train, test
    from fastcifar.augment import GpuLoader

    common = dict(mean=data.mean, std=data.std, batch_size=config.batch_size, device=device,
                  dtype=dtype or torch.float32, channels_last=config.channels_last, rank=d.rank,
                  world_size=d.world_size)
    train = GpuLoader(data.train_images, data.train_labels, train=True, alt_flip=config.alt_flip,
                      drop_last=True, seed=seed, **common, **aug)
    test = GpuLoader(data.test_images, data.test_labels, train=False, **common)
    return train, test


def check_batch_size(config: TrainConfig, num_train: int, d: Dist) -> None:
    per_process = num_train // d.world_size
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
        n = len(data.train_images)
        pick = np.linspace(0, n - 1, min(whiten_sample, n)).round().astype(np.int64)
        device = next(model.parameters()).device
        images = normalize_images(data.train_images[pick], data.mean, data.std, device)
        init_whitening(model.prep[0], images.permute(0, 3, 1, 2))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------
# One epoch
# ------------------------------------------------------------------------------------------------------
@dataclass
class StepState:
    """What the hot loop accumulates on the device; read once per epoch."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    steps: int = 0
    first_bad_step: torch.Tensor | None = None  # step (in this epoch) of the first non-finite loss, or -1
    seconds: float = 0.0                         # training time of this epoch before an interruption

    @classmethod
    def zeros(cls, device: torch.device) -> "StepState":
        z = torch.zeros((), device=device, dtype=torch.float32)  # float32: MPS has no float64
        return cls(z.clone(), z.clone(), 0, 0, torch.full((), -1, device=device, dtype=torch.int64))

    def to_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "seen": self.seen,
                "steps": self.steps, "first_bad_step": self.first_bad_step.cpu(), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device) -> "StepState":
        return cls(d["loss_sum"].to(device), d["correct"].to(device), d["seen"], d["steps"],
                   d["first_bad_step"].to(device), d["seconds"])


class StopRequested(Exception):
    """Raised inside an epoch after SIGINT/SIGTERM, once the current step has finished."""


class SignalGuard:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half.

    Under torchrun the ranks must stop after the same step (or the next all-reduce would hang), so there
    the flag is agreed on every `every` steps with one tiny all-reduce; alone it costs nothing.
    """

    def __init__(self, d: Dist = Dist(), device: torch.device = torch.device("cpu"), every: int = 8):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self.d, self.device, self.every = d, device, every

    def stop_requested(self, step: int) -> bool:
        if not self.d.enabled:
            return self.signum is not None
        if step % self.every:
            return False
        if broadcast_flag(self.signum is not None, self.d, self.device):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False

    def __enter__(self) -> "SignalGuard":
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test helper thread)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None) -> None:
    """Zero grads, backward, step; through the GradScaler when training in fp16."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler, criterion: nn.Module, scaler: torch.amp.GradScaler | None,
                    device: torch.device, dtype: torch.dtype | None, state: StepState, lrs: list[float],
                    guard: SignalGuard | None = None, progress=None,
                    lookahead: Lookahead | None = None) -> StepState:
    """One pass over `batches`, stepping the scheduler per batch. Appends the lr of each step to `lrs`.

    Raises StopRequested after the step during which SIGINT/SIGTERM arrived; `state` then holds the
    partial epoch, so the caller can checkpoint mid-epoch.
    """
    model.train()
    for inputs, labels in batches:
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(inputs)
            loss = criterion(logits, labels)
        backward_and_step(loss, optimizer, scaler)
        if lookahead is not None:
            lookahead.step()
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.step()
        detached = loss.detach()
        bad = (~torch.isfinite(detached)) & (state.first_bad_step < 0)
        state.first_bad_step = torch.where(bad, state.steps, state.first_bad_step)
        state.loss_sum += detached.float() * len(labels)
        state.correct += (logits.detach().argmax(1) == labels).sum()
        state.seen += len(labels)
        state.steps += 1
        if progress is not None:
            progress.update(1)
        if guard is not None and guard.stop_requested(state.steps):
            raise StopRequested
    return state


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images translated by (dy, dx) pixels, the uncovered border filled by reflection."""
    p = max(abs(dy), abs(dx))
    h, w = x.shape[-2:]
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    return padded[..., p - dy:p - dy + h, p - dx:p - dx + w]


def tta_logits(model: nn.Module, x: torch.Tensor, translate: int = 0) -> torch.Tensor:
    """Mean logits of the image and its mirror; with `translate`, averaged 1:1 with the mean over both
    views shifted by +translate and -translate pixels in each direction (airbench's TTA level 2)."""
    views = [x, x.flip(3)]
    logits = torch.stack([model(v).float() for v in views]).mean(0)
    if translate:
        moved = [shift(v, t, t) for v in views for t in (translate, -translate)]
        logits = 0.5 * logits + 0.5 * torch.stack([model(v).float() for v in moved]).mean(0)
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None,
             tta: bool = False, d: Dist = Dist(), tta_translate: int = 0) -> dict[str, Any]:
    """Loss, accuracy and predictions on `loader`; with `tta`, logits averaged with the mirrored images
    (and, with `tta_translate` > 0, half weight on both views shifted by +-tta_translate pixels).
    Under torchrun each rank evaluates its shard and the sums (and predictions) are gathered."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    preds, labels_all = [], []
    for inputs, labels in loader:
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = tta_logits(model, inputs, tta_translate) if tta else model(inputs).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        preds.append(logits.argmax(1))
        labels_all.append(labels)
    preds_t, labels_t = torch.cat(preds), torch.cat(labels_all)
    counts = torch.stack([loss_sum, (preds_t == labels_t).sum().float(),
                          torch.tensor(len(labels_t), device=device, dtype=torch.float32)])
    loss, correct, n = all_reduce_sum(counts, d).tolist()
    n_int = int(n)
    return {"loss": loss / n, "acc": correct / n, "preds": gather_interleaved(preds_t, d, n_int).cpu().numpy(),
            "labels": gather_interleaved(labels_t, d, n_int).cpu().numpy()}


# ------------------------------------------------------------------------------------------------------
# Run directory
# ------------------------------------------------------------------------------------------------------
def check_out_dir(config: TrainConfig, resume: bool) -> Path:
    """Refuse a file, or a directory with results, before anything is loaded or written."""
    out = Path(config.out_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir is a file ({out}): choose a directory path")
    if out.is_dir() and not resume and not config.overwrite:
        existing = [f for f in RESULT_FILES if (out / f).exists()]
        if existing:
            raise UserError(f"run directory already has results ({out / existing[0]}): "
                            "use --overwrite to replace them, --resume to continue, or another --out-dir")
    return out


def create_out_dir(out: Path) -> None:
    """Create the run directory and prove it is writable (a full disk fails here, before training)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 65536)  # also fails early on a full disk
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out-dir ({out}): {e.strerror}; choose a writable directory")


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()
                         if k in METRIC_COLUMNS})
    write_text(path, buf.getvalue())


def epoch_row(row: dict[str, Any], header: bool = False) -> str:
    """One fixed-width line per epoch (airbench style)."""
    cols = [("seed", 5, "d"), ("epoch", 6, "d"), ("lr", 9, ".4f"), ("train_loss", 11, ".4f"),
            ("train_acc", 10, ".4f"), ("test_loss", 10, ".4f"), ("test_acc", 9, ".4f"),
            ("epoch_seconds", 14, ".2f"), ("total_seconds", 14, ".2f")]
    if header:
        return " ".join(f"{name:>{w}}" for name, w, _ in cols)
    out = []
    for name, w, fmt in cols:
        v = row.get(name)
        out.append(f"{v:>{w}{fmt}}" if isinstance(v, (int, float)) and not (isinstance(v, float) and
                                                                          math.isnan(v)) else f"{'':>{w}}")
    return " ".join(out)


# ------------------------------------------------------------------------------------------------------
# Training state: everything a resumed run needs
# ------------------------------------------------------------------------------------------------------
@dataclass
class RunState:
    """Where training stands; saved in every checkpoint, so a resumed run continues exactly."""

    run_index: int = 0            # which of the --runs seeds is in progress
    epoch: int = 0                # completed epochs of that run
    train_seconds: float = 0.0
    images: int = 0               # training samples processed (all ranks)
    step_in_epoch: int = 0        # > 0 when stopped mid-epoch: steps of epoch `epoch` already done
    partial: dict[str, Any] = field(default_factory=dict)         # StepState of that partial epoch
    lrs: list[float] = field(default_factory=list)                # lr of every step of this run
    rows: list[dict[str, Any]] = field(default_factory=list)      # metrics of every epoch so far
    finished: list[dict[str, Any]] = field(default_factory=list)  # results of completed runs


def numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state as tensors and numbers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    np.random.set_state(("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["gauss"]))


@dataclass
class Session:
    """What stays fixed across the seeds of one invocation: config, device, data, model, output."""

    config: TrainConfig
    device: torch.device
    dtype: torch.dtype | None
    dist: Dist
    out: Path
    data: Any
    model: ResNet9                # the plain module (compiled in place when --compile)
    runner: nn.Module             # what the loop calls: the model, or DDP around it
    criterion: nn.Module
    guard: SignalGuard
    compile_model: bool
    data_seconds: float
    compile_seconds: float | None = None
    on_epoch: Callable[[dict[str, Any]], None] | None = None  # called with each epoch's metrics row


@dataclass
class Fit:
    """The per-seed objects that a checkpoint captures."""

    train_loader: Any
    test_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    lookahead: Lookahead | None = None

    def state(self, s: Session, run: RunState, loader_state: dict) -> dict[str, Any]:
        """Plain containers only (tensors, numbers, strings), so `torch.load(weights_only=True)` reads it."""
        return {
            "format": 1, "config": to_dict(s.config), "run": asdict(run), "model": s.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {}, "loader": loader_state,
            "lookahead": self.lookahead.state_dict() if self.lookahead else {},
            "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state(),
                    **({"cuda": torch.cuda.get_rng_state()} if s.device.type == "cuda" else {})},
        }

    def restore(self, s: Session, ckpt: dict[str, Any]) -> RunState:
        s.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(ckpt["lookahead"])
        if ckpt["loader"] and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        set_numpy_rng_state(ckpt["rng"]["numpy"])
        if "cuda" in ckpt["rng"] and s.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        return RunState(**ckpt["run"])

    def save(self, s: Session, run: RunState, loader_state: dict) -> None:
        if s.dist.is_main:
            save_checkpoint(s.out / CHECKPOINT_FILE, self.state(s, run, loader_state))


# ------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------
def load_resume(run_dir: str) -> tuple[TrainConfig, dict[str, Any]]:
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"--resume directory not found ({path}): pass the --out-dir of the run to continue")
    ckpt = load_checkpoint(path / CHECKPOINT_FILE)
    try:
        config = TrainConfig(**ckpt["config"])
        RunState(**ckpt["run"])
    except (KeyError, TypeError) as e:
        raise UserError(f"checkpoint has no valid config ({path / CHECKPOINT_FILE}): {e}; start a new run")
    config.out_dir = str(path)
    return config, ckpt


def warm_up(s: Session, loader) -> float:
    """Trigger compilation (train and eval graphs) outside the timed region; weights are restored after."""
    saved = {k: v.clone() for k, v in s.model.state_dict().items()}
    loader_state = loader.state_dict() if hasattr(loader, "state_dict") else None
    with Timer(s.device) as t:
        inputs, labels = next(iter(loader))
        inputs, labels = inputs.to(s.device), labels.to(s.device)
        s.runner.train()
        for _ in range(2):
            with autocast(s.device, s.dtype):
                s.criterion(s.runner(inputs), labels).backward()
        s.runner.eval()
        with torch.no_grad(), autocast(s.device, s.dtype):
            s.runner(inputs)
            s.runner(inputs.flip(3))
    s.model.load_state_dict(saved)
    s.model.zero_grad(set_to_none=True)
    if loader_state is not None:  # the warm-up must not shift the run's random choices
        loader.load_state_dict(loader_state)
    return t.seconds


def setup(config: TrainConfig, resume: bool, d: Dist, device: torch.device) -> Session:
    """Output directory, data, model (compiled, wrapped), loss and signal guard."""
    configure_backends(device)
    compile_model = config.compile if config.compile is not None else device.type == "cuda"
    out = check_out_dir(config, resume=resume)
    from fastcifar.data import load_cifar10

    t0 = time.perf_counter()
    data = load_cifar10(config.data_dir, download=config.download or None)
    if config.val_split:  # from here on the "test" arrays are the held-out training images
        from fastcifar.data import validation_split

        data = validation_split(data, config.val_split, config.split_seed)
    data_seconds = time.perf_counter() - t0
    check_batch_size(config, len(data.train_labels), d)
    if d.is_main:
        create_out_dir(out)
        write_json(out / "config.json", to_dict(config))
    dtype = amp_dtype(device, config.amp)
    model = build_model(config, len(data.classes), device)
    if d.is_main:
        print(summary(model))
    runner: nn.Module = model
    if config.sync_bn and d.enabled:
        if device.type != "cuda":
            raise UserError("invalid --sync-bn: SyncBatchNorm needs CUDA devices; drop the flag on the CPU")
        model = runner = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if compile_model:
        # in place, before DDP wrapping, as PyTorch recommends; reduce-overhead adds CUDA graphs
        model.compile(mode=None if config.compile_mode == "default" else config.compile_mode)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    print(f"device {device}  world {d.world_size}  amp {dtype}  compile {compile_model}  "
          f"pipeline {config.pipeline}  data {data.source} ({len(data.train_labels)} train, "
          f"{len(data.test_labels)} test) loaded in {data_seconds:.1f}s")
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return Session(config, device, dtype, d, out, data, model, runner, criterion, SignalGuard(d, device),
                   compile_model, data_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_config(argv)
    ckpt = None
    if args.resume:
        config, ckpt = load_resume(args.resume)
    run_training(config, ckpt)
    return 0


def train(config: TrainConfig, *, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train `config` in this process and return the summary (what summary.json holds).

    `on_epoch(row)` gets each epoch's metrics row after its evaluation; an exception it raises (a pruner's)
    propagates out of train().
    """
    validate(config)
    return run_training(config, None, on_epoch)


def run_training(config: TrainConfig, ckpt: dict[str, Any] | None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    d = from_env()
    device = select_device(config.device)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not d.is_main:  # one voice: only rank 0 prints (errors still go to stderr everywhere)
        sys.stdout = open(os.devnull, "w")
    with process_group(d, device):
        s = setup(config, ckpt is not None, d, device)
        s.on_epoch = on_epoch
        try:
            results = train_all(s, ckpt)
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"out of memory on {device} at --batch-size {config.batch_size}, --width "
                            f"{config.width}: lower --batch-size or --width (then --resume {s.out} if a "
                            "checkpoint exists)") from None
        summary_data = summarize(s, results)
        if d.is_main:
            write_json(s.out / "summary.json", summary_data)
        print(format_summary(summary_data))
    return summary_data


def train_all(s: Session, ckpt: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Train seeds seed .. seed+runs-1 (from where a checkpoint left off); compile/warm up only once."""
    config = s.config
    run = RunState() if ckpt is None else RunState(**ckpt["run"])
    results = list(run.finished)
    train_loader = test_loader = None
    with s.guard:
        for run_index in range(run.run_index, config.runs):
            seed = config.seed + run_index
            seed_everything(seed)
            if hasattr(train_loader, "reseed"):  # the device-resident data is uploaded once per invocation
                train_loader.reseed(seed)
            else:
                train_loader, test_loader = build_loaders(config, s.data, s.device, s.dtype, seed, s.dist)
            if s.compile_seconds is None and (s.compile_model or s.device.type == "cuda"):
                s.compile_seconds = warm_up(s, train_loader)
                print(f"warm-up and compile: {s.compile_seconds:.1f}s (not counted as training time)")
            init_weights(s.model, config, s.data, seed)
            optimizer = build_optimizer(config, s.model, s.device)
            scheduler = build_scheduler(config, optimizer, len(train_loader))
            scaler = torch.amp.GradScaler(s.device.type) if s.dtype == torch.float16 else None
            lookahead = Lookahead(s.model, total_steps(config, len(train_loader))) if config.lookahead else None
            fit = Fit(train_loader, test_loader, optimizer, scheduler, scaler, lookahead)
            if ckpt is not None and run.run_index == run_index and (run.epoch or run.step_in_epoch):
                run = fit.restore(s, ckpt)
                print(f"resumed seed {seed} at epoch {run.epoch + 1}, step {run.step_in_epoch + 1}")
            else:
                run = RunState(run_index=run_index, rows=run.rows, finished=results)
            results.append(train_run(s, fit, seed, run))
            run = RunState(run_index=run_index + 1, rows=run.rows, finished=results)
    return results


def reduce_epoch(state: StepState, s: Session) -> tuple[float, float, int, int]:
    """(mean loss, accuracy, samples, first bad step) over all ranks; the epoch's one host sync."""
    sums = torch.stack([state.loss_sum, state.correct, torch.tensor(float(state.seen), device=s.device)])
    loss_sum, correct, seen = all_reduce_sum(sums, s.dist).tolist()
    bad = int(all_reduce_max(state.first_bad_step.clone(), s.dist).item())
    return loss_sum / seen, correct / seen, int(seen), bad


def train_run(s: Session, fit: Fit, seed: int, run: RunState) -> dict[str, Any]:
    """Train one seed from where `run` stands to the end; write checkpoints, metrics and artifacts."""
    config, loader = s.config, fit.train_loader
    if run.epoch == 0 and run.step_in_epoch == 0:
        print(epoch_row({}, header=True))
    resumable = hasattr(loader, "plan_epoch")
    steps = epoch_steps(config, len(loader))
    for epoch in range(run.epoch, len(steps)):
        state = StepState.from_dict(run.partial, s.device) if run.step_in_epoch else StepState.zeros(s.device)
        loader_start = loader.state_dict() if resumable else {}
        if resumable:
            batches = itertools.islice(loader.batches(loader.plan_epoch(), start=state.steps),
                                       steps[epoch] - state.steps)
        else:
            batches = itertools.islice(iter(loader), state.steps, steps[epoch])
        lrs: list[float] = []
        progress = _progress(steps[epoch] - state.steps, f"epoch {epoch + 1}")
        try:
            with Timer(s.device) as timer:
                train_one_epoch(s.runner, batches, fit.optimizer, fit.scheduler, s.criterion, fit.scaler,
                                s.device, s.dtype, state, lrs, s.guard, progress, fit.lookahead)
        except StopRequested:
            state.seconds += time.perf_counter() - timer.start_wall
            run.step_in_epoch, run.partial = state.steps, state.to_dict()
            run.lrs.extend(lrs)
            fit.save(s, run, loader_start)
            code = 130 if s.guard.signum == signal.SIGINT else 143
            print(f"\nstopped by signal {s.guard.signum} at step {state.steps} of epoch {epoch + 1}; checkpoint "
                  f"saved. Resume with: python -m fastcifar.train --resume {s.out}", file=sys.stderr)
            raise SystemExit(code)
        finally:
            if progress is not None:
                progress.close()
        loss, acc, seen, bad = reduce_epoch(state, s)
        if bad >= 0:
            lr = lrs[bad - (state.steps - len(lrs))]
            raise UserError(f"loss became non-finite at step {bad + 1} of epoch {epoch + 1} (lr {lr:.4g}); the last "
                            f"good checkpoint is kept in {s.out}: lower --lr and --resume, or start again")
        seconds = state.seconds + timer.seconds
        run.train_seconds += seconds
        run.lrs.extend(lrs)
        run.images += seen
        row = {"seed": seed, "epoch": epoch + 1, "lr": lrs[-1] if lrs else fit.scheduler.get_last_lr()[0],
               "train_loss": loss, "train_acc": acc, "test_loss": float("nan"), "test_acc": float("nan"),
               "epoch_seconds": seconds, "total_seconds": run.train_seconds}
        last = epoch + 1 == len(steps)
        if last or (epoch + 1) % config.eval_every == 0:
            ev = evaluate(s.runner, fit.test_loader, s.device, s.dtype, d=s.dist)
            row.update(test_loss=ev["loss"], test_acc=ev["acc"])
        print(epoch_row(row), flush=True)
        run.rows.append(row)
        run.epoch, run.step_in_epoch, run.partial = epoch + 1, 0, {}
        if s.dist.is_main:
            write_metrics(s.out / "metrics.csv", run.rows)
        if config.checkpoint_every and (run.epoch % config.checkpoint_every == 0 or last):
            fit.save(s, run, loader.state_dict() if resumable else {})
        if s.on_epoch is not None:
            s.on_epoch(dict(row))
    return finish_run(s, fit, seed, run)


def finish_run(s: Session, fit: Fit, seed: int, run: RunState) -> dict[str, Any]:
    """Final evaluation (plain and flip-TTA), model.safetensors and the plots."""
    final = evaluate(s.runner, fit.test_loader, s.device, s.dtype, d=s.dist)
    tta = (evaluate(s.runner, fit.test_loader, s.device, s.dtype, tta=True, d=s.dist,
                    tta_translate=s.config.tta_translate) if s.config.tta else None)
    result = {"seed": seed, "test_acc": final["acc"], "test_loss": final["loss"],
              "test_acc_tta": tta["acc"] if tta else None, "train_seconds": run.train_seconds,
              "images": run.images, "epochs": s.config.epochs}
    if s.dist.is_main:
        info = ModelInfo(config=s.model.config, classes=list(s.data.classes), mean=list(s.data.mean),
                         std=list(s.data.std), test_acc=final["acc"],
                         extra={"test_acc_tta": result["test_acc_tta"], "seed": seed})
        save_model(s.out / MODEL_FILE, s.model, info)
        if s.config.plots:
            from fastcifar.plots import save_run_plots

            save_run_plots(s.out, [r for r in run.rows if r["seed"] == seed], run.lrs,
                           len(fit.train_loader), final, s.data)
    print(f"seed {seed}: test acc {final['acc']:.4f}" + (f"  ({tta_name(s.config)} {tta['acc']:.4f})" if tta else "") +
          f"  train {run.train_seconds:.1f}s")
    return result


def _progress(total: int, desc: str):
    if not sys.stdout.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def summarize(s: Session, results: list[dict]) -> dict:
    accs = np.array([r["test_acc"] for r in results])
    ttas = np.array([r["test_acc_tta"] for r in results if r["test_acc_tta"] is not None])
    secs = np.array([r["train_seconds"] for r in results])
    last = results[-1]
    return {
        "test_acc": float(last["test_acc"]), "test_acc_tta": last["test_acc_tta"],
        "train_seconds": float(last["train_seconds"]), "compile_seconds": s.compile_seconds,
        "data_seconds": s.data_seconds, "images_per_second": float(last["images"] / last["train_seconds"]),
        "tta": tta_name(s.config) if s.config.tta else None,
        "eval_split": "val" if s.config.val_split else "test",  # what the test_* figures were measured on
        "epochs": s.config.epochs, "params": count_parameters(s.model), "device": _device_name(s.device),
        "world_size": s.dist.world_size, "torch": torch.__version__, "fastcifar": __version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "runs": {"seeds": [r["seed"] for r in results], "test_acc": accs.tolist(),
                 "test_acc_tta": ttas.tolist(), "train_seconds": secs.tolist(),
                 "mean": float(accs.mean()), "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                 "mean_tta": float(ttas.mean()) if len(ttas) else None,
                 "std_tta": float(ttas.std(ddof=1)) if len(ttas) > 1 else (0.0 if len(ttas) else None),
                 "median_train_seconds": float(np.median(secs))},
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def tta_name(config: TrainConfig) -> str:
    return f"flip + translate {config.tta_translate} TTA" if config.tta_translate else "flip TTA"


def format_summary(s: dict) -> str:
    r = s["runs"]
    line = f"{len(r['seeds'])} run(s): test acc {r['mean']:.4f} +- {r['std']:.4f}"
    if r["mean_tta"] is not None:
        line += f", {s['tta']} {r['mean_tta']:.4f} +- {r['std_tta']:.4f}"
    return line + f"; median train {r['median_train_seconds']:.1f}s on {s['device']}"


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.train"))
