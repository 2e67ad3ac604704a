"""Learning-rate range test (Smith 2015): pick a peak --lr.

    python -m fastcifar.lr_find --data-dir ../shared/data/cifar10-png.tar.gz --width 16 --device cpu --steps 150 --out /tmp/lr_find_w16.png

From a fresh model (seeded like a training run) on the device-resident loader, the lr grows exponentially
until the loss, smoothed by a bias-corrected EMA, exceeds --diverge x its best or is not finite. Prints two
suggestions for the one cycle's peak lr: where the smoothed loss falls fastest (min d loss / d log lr), and
the lr of its minimum / 10 (fastai's rule of thumb). `--pipeline` is ignored and the model is not compiled.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fastcifar import config as train_config
from fastcifar.atomic import write_text
from fastcifar.config import TrainConfig, validate
from fastcifar.errors import UserError, run_cli

BETA = 0.98  # EMA factor of the smoothed loss


@dataclass
class LRFindResult:
    lrs: list[float]          # lr of each recorded step (the lr its update used)
    losses: list[float]       # training loss of that step's batch (before its update)
    smoothed: list[float]     # bias-corrected EMA of `losses`
    suggestion_steepest: float  # lr at the steepest descent of the smoothed loss (nan: too few points)
    suggestion_min_over_10: float  # lr at the minimum smoothed loss, / 10 (nan: no points)
    stop_reason: str  # completed, diverged, non-finite or data exhausted

    def best_index(self) -> int:
        return int(np.argmin(self.smoothed))


def lr_range_test(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, criterion: nn.Module,
                  *, start_lr: float = 1e-4, end_lr: float = 10.0, steps: int = 200, diverge: float = 4.0,
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> LRFindResult:
    """Train `model` (train.train_one_epoch, one batch at a time) on up to `steps` `batches` until the smoothed loss
    exceeds `diverge` x its best (that step recorded) or the loss is not finite (not recorded). `dtype`: autocast's.
    Model (weights, buffers, grads, mode) and optimizer are restored after, even on error."""
    from fastcifar.train import train_one_epoch

    device = torch.device(device)
    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    saved_opt = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    lrs, losses, smoothed = [], [], []
    avg = 0.0
    try:
        for group in optimizer.param_groups:  # the ramp's lr times each group's multiple of the base lr
            group["lr"] = group["initial_lr"] = group.get("lr_scale", 1.0)
        ramp = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: start_lr * (end_lr / start_lr) ** (i / (steps - 1)))
        for i, batch in enumerate(itertools.islice(batches, steps)):
            lr = ramp.get_last_lr()[0] / optimizer.param_groups[0].get("lr_scale", 1.0)
            sums, _ = train_one_epoch(model, criterion, optimizer, ramp, scaler, [batch], device, dtype)
            loss_sum, _, seen, _ = sums.tolist()  # one sync per step: the divergence check needs the value anyway
            value = loss_sum / seen
            if not math.isfinite(value):
                reason = "non-finite"
                break
            avg = BETA * avg + (1 - BETA) * value
            smooth = avg / (1 - BETA ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(smooth)
            if smooth > diverge * min(smoothed):
                reason = "diverged"
                break
        else:
            reason = "completed" if len(lrs) == steps else "data exhausted"
    finally:
        model.load_state_dict(saved_model)
        for p, g in zip(model.parameters(), saved_grads):
            p.grad = g
        optimizer.load_state_dict(saved_opt)
        model.train(was_training)
    return LRFindResult(lrs, losses, smoothed, *suggest(lrs, smoothed), reason)


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> tuple[float, float]:
    """(steepest, min/10). Steepest is the argmin of d smoothed / d log lr, searched up to the minimum of the
    smoothed loss and skipping the first 10% of points (at most 10), whose average is still warming up."""
    n = len(lrs)
    if n == 0:
        return math.nan, math.nan
    best = int(np.argmin(smoothed))
    min_over_10 = float(lrs[best]) / 10
    if n < 3:
        return math.nan, min_over_10
    lo, hi = min(10, n // 10), best + 1
    if hi - lo < 3:  # the minimum comes too early to have a descent before it: search the whole curve
        lo, hi = 0, n
    grad = np.gradient(np.asarray(smoothed[lo:hi], dtype=np.float64), np.log(np.asarray(lrs[lo:hi], dtype=np.float64)))
    return float(lrs[lo + int(np.argmin(grad))]), min_over_10


def write_csv(path: str | Path, result: LRFindResult) -> None:
    rows = zip(result.lrs, result.losses, result.smoothed)
    write_text(path, "step,lr,loss,smoothed\n" + "".join(f"{i},{lr:.8g},{loss:.6g},{smooth:.6g}\n"
                                                         for i, (lr, loss, smooth) in enumerate(rows)))


def save_plot(path: str | Path, result: LRFindResult, title: str) -> None:
    """Loss and smoothed loss against the lr, both suggestions marked (the caller has at least 3 points)."""
    from fastcifar.plots import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    ax.plot(result.lrs, result.losses, color="0.75", lw=0.8, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=1.8, label=f"smoothed (EMA {BETA})")
    steepest = result.suggestion_steepest
    ax.axvline(steepest, color="C3", ls="--", lw=1)
    ax.plot([steepest], [result.smoothed[result.lrs.index(steepest)]], "o", color="C3",
            label=f"steepest descent: {steepest:.3g}")
    ax.axvline(result.suggestion_min_over_10, color="C2", ls=":", lw=1.2,
               label=f"lr of min loss / 10: {result.suggestion_min_over_10:.3g}")
    # the y range ends above the best point's curve, so the diverging tail does not squash the interesting part
    lo, hi = min(min(result.losses), min(result.smoothed)), max(result.smoothed[:result.best_index() + 1])
    span = max(hi - lo, 1e-3)
    ax.set(xscale="log", ylim=(lo - 0.05 * span, hi + 0.35 * span), xlabel="learning rate (log scale)",
           ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = train_config.ArgumentParser(
        prog="python -m fastcifar.lr_find", parents=[train_config.get_args_parser()], add_help=False,  # it has -h
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="LR range test: exponential lr ramp, smoothed loss, suggested peak --lr. "
                    "Training flags apply; schedule flags are ignored.")
    group = parser.add_argument_group("lr range test")
    group.add_argument("--start-lr", type=float, default=1e-4, help="first learning rate")
    group.add_argument("--end-lr", type=float, default=10.0, help="last learning rate (if it gets there)")
    group.add_argument("--steps", type=int, default=200, help="optimizer steps of the ramp")
    group.add_argument("--diverge", type=float, default=4.0,
                       help="stop once the smoothed loss exceeds this x its best value")
    group.add_argument("--out", default="lr_find.png", help="plot; the curve goes to <stem>.csv next to it")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    args = train_config.layered_args(get_args_parser(), argv)
    config = train_config.config_from_args(args)
    # min_momentum only shapes the one-cycle schedule, which the range test ignores: --momentum 0.8 alone is fine
    config.min_momentum = min(config.min_momentum, config.momentum)
    validate(config)
    checks = [
        (args.resume is None, "--resume", args.resume, "does not apply to the range test"),
        (args.start_lr > 0, "--start-lr", args.start_lr, "must be > 0"),
        (args.end_lr > args.start_lr, "--end-lr", args.end_lr, f"must be > --start-lr ({args.start_lr})"),
        (args.steps >= 10, "--steps", args.steps, "must be >= 10"),
        (args.diverge > 1, "--diverge", args.diverge, "must be > 1"),
        (Path(args.out).suffix.lower() == ".png", "--out", args.out, "must be a .png path"),
        (not Path(args.out).is_dir(), "--out", args.out, "is a directory: pass a .png file path"),
    ]
    for ok, flag, value, what in checks:
        if not ok:
            raise UserError(f"invalid {flag} ({value!r}): {what}")
    return config, args


def main(argv: Sequence[str] | None = None) -> int:
    from fastcifar.data import load_cifar10
    from fastcifar.distributed import Dist
    from fastcifar.recipe import (build_criterion, build_loaders, build_model, build_optimizer, check_batch_size,
                                  check_optimizer_dtype, init_weights, seed_everything)
    from fastcifar.runtime import amp_dtype, configure_backends, select_device

    config, args = parse_args(argv)
    out = Path(args.out)
    try:  # fail before the minutes of work, not after
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the directory of --out ({out.parent}): {e.strerror}")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"cannot write to the directory of --out ({out.parent}): choose a writable path")
    device = select_device(config.device)
    configure_backends(device)
    dtype = amp_dtype(device, config.amp, config.amp_dtype)
    check_optimizer_dtype(config, dtype)
    data = load_cifar10(config.data_dir, download=config.download or None)
    check_batch_size(config, len(data.train_labels), Dist())
    seed_everything(config.seed)
    train_loader, _ = build_loaders(replace(config, pipeline="gpu"), data, device, dtype, config.seed)
    batches = itertools.chain.from_iterable(itertools.repeat(train_loader))  # fresh epochs, endlessly
    model = build_model(config, len(data.classes), device)
    init_weights(model, config, data, config.seed)  # the model a training run with this seed starts from
    optimizer = build_optimizer(config, model, device)
    print(f"lr range test: {args.start_lr:g} -> {args.end_lr:g} over {args.steps} steps "
          f"({args.steps / len(train_loader):.2f} epochs of {len(train_loader)} batches of {config.batch_size}); "
          f"width {config.width}, {config.optimizer}, device {device}, amp {dtype}", flush=True)
    t0 = time.perf_counter()
    result = lr_range_test(model, optimizer, batches, build_criterion(config), start_lr=args.start_lr,
                           end_lr=args.end_lr, steps=args.steps, diverge=args.diverge, device=device, dtype=dtype)
    seconds = time.perf_counter() - t0
    if len(result.lrs) < 3:
        raise UserError(f"the loss diverged after {len(result.lrs)} step(s) (lr {args.start_lr:g}): lower --start-lr")
    write_csv(out.with_suffix(".csv"), result)
    save_plot(out, result, title=f"LR range test: width {config.width}, batch {config.batch_size}, "
                                 f"{config.optimizer}, wd {config.weight_decay:g} ({result.stop_reason})")
    stop = {"completed": "ran all steps", "diverged": f"stopped: smoothed loss > {args.diverge:g} x best",
            "non-finite": "stopped: the loss became non-finite"}[result.stop_reason]  # the batches never run out
    best = result.best_index()
    print(f"{len(result.lrs)} steps in {seconds:.1f}s, lr {result.lrs[0]:.3g} .. {result.lrs[-1]:.3g} ({stop}); "
          f"min smoothed loss {result.smoothed[best]:.4f} at lr {result.lrs[best]:.3g}")
    print(f"suggested peak lr (steepest descent of the smoothed loss): {result.suggestion_steepest:.3g}")
    print(f"suggested peak lr (lr at the minimum smoothed loss / 10):  {result.suggestion_min_over_10:.3g}")
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.lr_find"))
