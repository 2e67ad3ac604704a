"""Train the custom ResNet-9 on CIFAR-10: One Cycle, AMP, channels_last, torch.compile, multi-seed runs.

    python -m fastcifar.train --data-dir ../shared/data/cifar10-png.tar.gz --out-dir runs/default
    python -m fastcifar.train --data-dir ../shared/data/cifar10-png.tar.gz --width 16 --epochs 10 --device cpu
    python -m fastcifar.train --preset seed --data-dir ... --out-dir runs/seed     # the original notebook
    python -m fastcifar.train --preset speedrun --data-dir ... --runs 5            # the fast recipe, 5 seeds
    python -m fastcifar.train --resume runs/default                                # continue after a stop

This file is the loop and `main`; the parts live next to it: `runtime` (device, precision, timer, signals),
`recipe` (loaders, model, optimizer, scheduler, init), `evaluate` (TTA and evaluation), `checkpoint`
(artifacts and resumable state) and `report` (run directory, metrics.csv, summary.json, console rows).
In-process, `train(config, on_epoch=...)` runs the same thing and returns the run summary.

A run directory gets config.json, metrics.csv, summary.json (rewritten after every seed), model.safetensors
(+ everything needed to rebuild the model), checkpoint.pt (resumable state) and, with --plots,
curves/confusion/misclassified PNGs. The hot loop never synchronizes with the device: loss and accuracy are
summed on the device and read once per epoch; timing uses CUDA events on a GPU.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from fastcifar.atomic import write_json
from fastcifar.checkpoint import CHECKPOINT_FILE, MODEL_FILE, ModelInfo, RunState, load_resume, \
    restore_training_state, save_checkpoint, save_model, training_state
from fastcifar.config import TrainConfig, parse_config, resume_config, to_dict, validate
from fastcifar.distributed import Dist, all_reduce_max, all_reduce_sum, from_env, process_group
from fastcifar.errors import UserError, run_cli
from fastcifar.evaluate import evaluate, evaluation_record, tta_inputs
from fastcifar.flops import recipe_flops
from fastcifar.lookahead import Lookahead
from fastcifar.model import ResNet9, count_parameters, summary as model_summary
from fastcifar.recipe import ResumableLoader, build_criterion, build_loaders, build_model, build_optimizer, \
    build_scheduler, check_batch_size, epoch_steps, init_weights, loader_seconds, seed_everything, \
    stop_whitening_bias, total_steps
from fastcifar.report import METRICS_FILE, check_out_dir, create_out_dir, epoch_row, format_summary, \
    run_summary, seed_line, write_metrics, write_summary
from fastcifar.runtime import SignalGuard, StopRequested, Timer, amp_dtype, autocast, configure_backends, \
    environment, select_device

EpochCallback = Callable[[dict[str, Any]], None]


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
        zero = torch.zeros((), device=device, dtype=torch.float32)  # float32: MPS has no float64
        return cls(zero.clone(), zero.clone(), 0, 0, torch.full((), -1, device=device, dtype=torch.int64))

    def to_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "seen": self.seen,
                "steps": self.steps, "first_bad_step": self.first_bad_step.cpu(), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, state: dict[str, Any], device: torch.device) -> "StepState":
        return cls(state["loss_sum"].to(device), state["correct"].to(device), state["seen"], state["steps"],
                   state["first_bad_step"].to(device), state["seconds"])


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
        if guard is not None and guard.stop_requested():
            raise StopRequested
    return state


# ------------------------------------------------------------------------------------------------------
# What one invocation and one seed hold
# ------------------------------------------------------------------------------------------------------
@dataclass
class Session:
    """What stays fixed across the seeds of one invocation: config, device, data, model, output."""

    config: TrainConfig
    device: torch.device
    dtype: torch.dtype | None
    dist: Dist
    out: Path
    data: Any
    model_without_ddp: ResNet9    # the plain module (compiled in place when --compile)
    model: nn.Module              # what the loop calls: model_without_ddp, or DDP around it
    criterion: nn.Module
    guard: SignalGuard
    compile_model: bool
    data_seconds: float
    on_epoch: EpochCallback | None = None
    compile_seconds: float | None = None
    upload_seconds: float = 0.0   # uint8 images host -> device, once per invocation (outside run_seconds)
    prep_seconds: float = 0.0     # their on-device normalize/pad/mirror, once: added to every seed's run_seconds
    flops: dict[str, Any] | None = None  # flops.recipe_flops: the work of one seed


@dataclass
class Fit:
    """The per-seed objects that a checkpoint captures."""

    train_loader: Any
    test_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    lookahead: Lookahead | None = None

    def save(self, session: Session, run: RunState, loader_state: dict) -> None:
        if session.dist.is_main:
            state = training_state(config=to_dict(session.config), run=run, model=session.model_without_ddp,
                                   optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                                   lookahead=self.lookahead, loader_state=loader_state, device=session.device)
            save_checkpoint(session.out / CHECKPOINT_FILE, state)

    def restore(self, session: Session, ckpt: dict[str, Any]) -> RunState:
        return restore_training_state(ckpt, model=session.model_without_ddp, optimizer=self.optimizer,
                                      scheduler=self.scheduler, scaler=self.scaler, lookahead=self.lookahead,
                                      train_loader=self.train_loader, device=session.device)


def warm_up(session: Session, loader, test_loader) -> float:
    """Every compilation and one-time device cost of the run, outside the timed regions and counted in
    compile_seconds: the whitening init's solver, the training step, and the evaluation forwards on a test batch (all test batches have its shape) in each view the
    configured TTA uses (plain, flipped, shifted), twice, so CUDA graphs are recorded too. Weights are
    restored after."""
    saved = {k: v.clone() for k, v in session.model_without_ddp.state_dict().items()}
    loader_state = loader.state_dict() if isinstance(loader, ResumableLoader) else None
    device, dtype, model, config = session.device, session.dtype, session.model, session.config
    with Timer(device) as timer:
        if config.whiten:  # the first eigh on a GPU loads its solver: a one-time cost outside the seeds' init
            init_weights(session.model_without_ddp, config, session.data, seed=0)
        inputs, labels = next(iter(loader))
        inputs, labels = inputs.to(device), labels.to(device)
        model.train()
        for _ in range(2):
            with autocast(device, dtype):
                session.criterion(model(inputs), labels).backward()
        model.eval()
        test_inputs = next(iter(test_loader))[0].to(device)
        with torch.no_grad(), autocast(device, dtype):  # the views made as evaluate makes them
            views = tta_inputs(test_inputs, config.tta_translate) if config.tta else [test_inputs]
            for _ in range(2):
                for view in views:
                    model(view)
    session.model_without_ddp.load_state_dict(saved)
    session.model_without_ddp.zero_grad(set_to_none=True)
    if loader_state is not None:  # the warm-up must not shift the run's random choices
        loader.load_state_dict(loader_state)
    return timer.seconds


def setup(config: TrainConfig, resume: bool, dist: Dist, device: torch.device,
          on_epoch: EpochCallback | None = None) -> Session:
    """Output directory, data, model (compiled, wrapped), loss and signal guard."""
    configure_backends(device)
    if config.optimizer == "muon" and amp_dtype(device, config.amp, config.amp_dtype) == torch.float16:
        raise UserError("invalid --optimizer muon with fp16 (a GradScaler cannot unscale Muon's matrices): train "
                        "in bf16 (--amp-dtype bf16) or fp32 (--no-amp)")
    compile_model = config.compile if config.compile is not None else device.type == "cuda"
    out = check_out_dir(config, resume=resume)
    from fastcifar.data import load_cifar10

    start = time.perf_counter()
    data = load_cifar10(config.data_dir, download=config.download or None)
    if config.val_split:  # from here on the "test" arrays are the held-out training images
        from fastcifar.data import validation_split

        data = validation_split(data, config.val_split, config.split_seed)
    data_seconds = time.perf_counter() - start
    check_batch_size(config, len(data.train_labels), dist)
    if dist.is_main:
        create_out_dir(out)
        write_json(out / "config.json", to_dict(config))
    dtype = amp_dtype(device, config.amp, config.amp_dtype)
    model_without_ddp = build_model(config, len(data.classes), device)
    if dist.is_main:
        print(model_summary(model_without_ddp))
    model: nn.Module = model_without_ddp
    if config.sync_bn and dist.enabled:
        if device.type != "cuda":
            raise UserError("invalid --sync-bn: SyncBatchNorm needs CUDA devices; drop the flag on the CPU")
        model_without_ddp = model = nn.SyncBatchNorm.convert_sync_batchnorm(model_without_ddp)
    if compile_model:
        # in place, before DDP wrapping, as PyTorch recommends; reduce-overhead adds CUDA graphs
        model_without_ddp.compile(mode=None if config.compile_mode == "default" else config.compile_mode)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model_without_ddp, device_ids=[device] if device.type == "cuda" else None)
    print(f"device {device}  world {dist.world_size}  amp {dtype}  compile {compile_model}  "
          f"pipeline {config.pipeline}  data {data.source} ({len(data.train_labels)} train, "
          f"{len(data.test_labels)} test) loaded in {data_seconds:.1f}s")
    flops = recipe_flops(config, len(data.train_labels), len(data.test_labels), len(data.classes), dist.world_size)
    print(f"work per run: {flops['per_run'] / 1e15:.4f} PFLOP (training {flops['train'] / 1e15:.4f}, final "
          f"evaluation {flops['eval'] / 1e15:.4f}; {flops['per_image_forward'] / 1e6:.1f} MFLOP per image forward)")
    return Session(config, device, dtype, dist, out, data, model_without_ddp, model, build_criterion(config),
                   SignalGuard(dist, device), compile_model, data_seconds, on_epoch, flops=flops)


# ------------------------------------------------------------------------------------------------------
# Seeds and epochs
# ------------------------------------------------------------------------------------------------------
def train_all(session: Session, ckpt: dict[str, Any] | None) -> dict[str, Any]:
    """Train seeds seed .. seed+runs-1 (from where a checkpoint left off); compile/warm up only once.
    summary.json is rewritten after every seed; returns the final run summary."""
    config = session.config
    run = RunState() if ckpt is None else RunState(**ckpt["run"])
    results = list(run.finished)
    train_loader = test_loader = None
    with session.guard:
        for run_index in range(run.run_index, config.runs):
            started = time.perf_counter()  # this seed's wall clock starts here
            seed = config.seed + run_index
            seed_everything(seed)
            if isinstance(train_loader, ResumableLoader):  # device-resident data is uploaded once per invocation
                train_loader.reseed(seed)
            else:
                train_loader, test_loader = build_loaders(config, session.data, session.device, session.dtype,
                                                          seed, session.dist)
                session.upload_seconds, session.prep_seconds = loader_seconds(train_loader, test_loader)
            if session.compile_seconds is None and (session.compile_model or session.device.type == "cuda"):
                session.compile_seconds = warm_up(session, train_loader, test_loader)
                print(f"warm-up and compile: {session.compile_seconds:.1f}s (not counted as training time)")
            with Timer(session.device) as init:
                init_weights(session.model_without_ddp, config, session.data, seed)
            optimizer = build_optimizer(config, session.model_without_ddp, session.device)
            scheduler = build_scheduler(config, optimizer, len(train_loader))
            scaler = torch.amp.GradScaler(session.device.type) if session.dtype == torch.float16 else None
            lookahead = (Lookahead(session.model_without_ddp, total_steps(config, len(train_loader)))
                         if config.lookahead else None)
            fit = Fit(train_loader, test_loader, optimizer, scheduler, scaler, lookahead)
            if ckpt is not None and run.run_index == run_index and (run.epoch or run.step_in_epoch):
                run = fit.restore(session, ckpt)
                print(f"resumed seed {seed} at epoch {run.epoch + 1}, step {run.step_in_epoch + 1}")
            else:
                run = RunState(run_index=run_index, rows=run.rows, finished=results, init_seconds=init.seconds)
            results.append(train_seed(session, fit, seed, run, started))
            summary = summarize(session, results)
            if session.dist.is_main:
                write_summary(session.out, summary)
            run = RunState(run_index=run_index + 1, rows=run.rows, finished=results)
    return summarize(session, results)


def lr_of_step(all_lrs: list[float], steps_in_epoch: int, step: int) -> float:
    """The lr of step `step` of the current epoch, from the lrs of the whole run so far, which end with the
    `steps_in_epoch` steps of this epoch (those before a resume included)."""
    return all_lrs[len(all_lrs) - steps_in_epoch + step]


def reduce_epoch(state: StepState, session: Session) -> tuple[float, float, int, int]:
    """(mean loss, accuracy, samples, first bad step) over all ranks; the epoch's one host sync."""
    sums = torch.stack([state.loss_sum, state.correct, torch.tensor(float(state.seen), device=session.device)])
    sums = all_reduce_sum(sums, session.dist)
    bad = all_reduce_max(state.first_bad_step.clone(), session.dist).to(sums.dtype)
    loss_sum, correct, seen, first_bad = torch.cat([sums, bad.view(1)]).tolist()  # one read of both
    return loss_sum / seen, correct / seen, int(seen), int(first_bad)


def train_seed(session: Session, fit: Fit, seed: int, run: RunState, started: float) -> dict[str, Any]:
    """Train one seed from where `run` stands to the end; write checkpoints, metrics and artifacts.
    `started` is this process's perf_counter at the seed's start (a resumed seed adds the checkpoint's)."""
    config, loader = session.config, fit.train_loader
    origin = started - run.wall_seconds  # perf_counter() - origin = the seed's wall seconds so far
    if run.epoch == 0 and run.step_in_epoch == 0:
        print(epoch_row({}, header=True))
    resumable = isinstance(loader, ResumableLoader)
    steps = epoch_steps(config, len(loader))
    for epoch in range(run.epoch, len(steps)):
        state = (StepState.from_dict(run.partial, session.device) if run.step_in_epoch
                 else StepState.zeros(session.device))
        loader_start = loader.state_dict() if resumable else {}
        stop_whitening_bias(fit.optimizer, config, epoch)
        lrs: list[float] = []
        progress = progress_bar(steps[epoch] - state.steps, f"epoch {epoch + 1}")
        try:
            with Timer(session.device) as timer:  # the epoch's random draws are training time, on both paths
                if resumable:
                    batches = itertools.islice(loader.batches(loader.plan_epoch(), start=state.steps),
                                               steps[epoch] - state.steps)
                else:
                    batches = itertools.islice(iter(loader), state.steps, steps[epoch])
                train_one_epoch(session.model, batches, fit.optimizer, fit.scheduler, session.criterion,
                                fit.scaler, session.device, session.dtype, state, lrs, session.guard, progress,
                                fit.lookahead)
        except StopRequested:
            state.seconds += timer.seconds  # the timer's own clock (CUDA events on a GPU), as for whole epochs
            run.step_in_epoch, run.partial = state.steps, state.to_dict()
            run.lrs.extend(lrs)
            run.wall_seconds = time.perf_counter() - origin
            diverged = int(state.first_bad_step.item()) >= 0  # one sync, at the stop only
            if not diverged:  # never replace the last good checkpoint with non-finite weights
                fit.save(session, run, loader_start)
            code = 130 if session.guard.signum == signal.SIGINT else 143
            saved = ("the loss had become non-finite, so the last good checkpoint is kept" if diverged
                     else "checkpoint saved")
            print(f"\nstopped by signal {session.guard.signum} at step {state.steps} of epoch {epoch + 1}; "
                  f"{saved}. Resume with: python -m fastcifar.train --resume {session.out}", file=sys.stderr)
            raise SystemExit(code)
        finally:
            if progress is not None:
                progress.close()
        loss, acc, seen, bad = reduce_epoch(state, session)
        if bad >= 0:
            lr = lr_of_step(run.lrs + lrs, state.steps, bad)
            raise UserError(f"loss became non-finite at step {bad + 1} of epoch {epoch + 1} (lr {lr:.4g}); the last "
                            f"good checkpoint is kept in {session.out}: lower --lr and --resume, or start again")
        seconds = state.seconds + timer.seconds
        run.train_seconds += seconds
        run.lrs.extend(lrs)
        run.images += seen
        row = {"seed": seed, "epoch": epoch + 1, "lr": lrs[-1] if lrs else fit.scheduler.get_last_lr()[0],
               "train_loss": loss, "train_acc": acc, "test_loss": float("nan"), "test_acc": float("nan"),
               "epoch_seconds": seconds, "total_seconds": run.train_seconds}
        last = epoch + 1 == len(steps)
        if last or (epoch + 1) % config.eval_every == 0:
            with Timer(session.device) as eval_timer:
                result = evaluate(session.model, fit.test_loader, session.device, session.dtype, dist=session.dist)
            run.eval_seconds += eval_timer.seconds
            row.update(test_loss=result["loss"], test_acc=result["acc"])
        print(epoch_row(row), flush=True)
        run.rows.append(row)
        run.epoch, run.step_in_epoch, run.partial = epoch + 1, 0, {}
        if session.dist.is_main:
            write_metrics(session.out / METRICS_FILE, run.rows)
        if config.checkpoint_every and (run.epoch % config.checkpoint_every == 0 or last):
            run.wall_seconds = time.perf_counter() - origin
            fit.save(session, run, loader.state_dict() if resumable else {})
        if session.on_epoch is not None and session.dist.is_main:  # after the files: a raise keeps them
            session.on_epoch(dict(row))
    return finish_seed(session, fit, seed, run, origin)


def finish_seed(session: Session, fit: Fit, seed: int, run: RunState, origin: float) -> dict[str, Any]:
    """Final evaluation (plain and, with --tta, flip (+ translate) TTA), model.safetensors and the plots.
    The seed's clocks (report.run_summary says what each covers): run_seconds counts the evaluation whose
    accuracy is the recipe's own (the TTA one with --tta, else the plain one); wall_seconds ends here."""
    config = session.config
    with Timer(session.device) as own_eval:
        final = evaluate(session.model, fit.test_loader, session.device, session.dtype, dist=session.dist)
    evaluations = [evaluation_record(final, flip=False, translate=0)]
    if config.tta:
        with Timer(session.device) as own_eval:
            tta = evaluate(session.model, fit.test_loader, session.device, session.dtype, tta=True,
                           dist=session.dist, tta_translate=config.tta_translate)
        evaluations.append(evaluation_record(tta, flip=True, translate=config.tta_translate))
    # airbench's convention; the loaders' one preparation per invocation is added to every seed
    run_seconds = session.prep_seconds + run.init_seconds + run.train_seconds + own_eval.seconds
    result = {"seed": seed, "test_acc": final["acc"], "test_loss": final["loss"],
              "test_acc_tta": evaluations[1]["test_acc"] if config.tta else None,
              "evaluations": evaluations, "run_seconds": run_seconds, "train_seconds": run.train_seconds,
              "prep_seconds": session.prep_seconds, "init_seconds": run.init_seconds,
              "final_eval_seconds": own_eval.seconds, "eval_seconds": run.eval_seconds,
              "images": run.images, "epochs": config.epochs}
    if session.dist.is_main:
        data = session.data
        info = ModelInfo(config=session.model_without_ddp.config, classes=list(data.classes), mean=list(data.mean),
                         std=list(data.std), test_acc=final["acc"],
                         extra={"test_acc_tta": result["test_acc_tta"], "seed": seed})
        save_model(session.out / MODEL_FILE, session.model_without_ddp, info)
        if config.plots:
            from fastcifar.plots import save_run_plots

            save_run_plots(session.out, [r for r in run.rows if r["seed"] == seed], run.lrs,
                           len(fit.train_loader), final, data)
    result["wall_seconds"] = time.perf_counter() - origin
    print(seed_line(result))
    return result


def progress_bar(total: int, desc: str):
    """A tqdm bar on a terminal; None when stdout is a file or pipe."""
    if not sys.stdout.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def summarize(session: Session, results: list[dict[str, Any]]) -> dict[str, Any]:
    return run_summary(session.config, results, params=count_parameters(session.model_without_ddp),
                       world_size=session.dist.world_size, environment=environment(session.device),
                       compile_seconds=session.compile_seconds, data_seconds=session.data_seconds,
                       upload_seconds=session.upload_seconds, flops=session.flops)


# ------------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------------
def train(config: TrainConfig, *, on_epoch: EpochCallback | None = None,
          resume_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run `config` in this process and return the run summary (what summary.json holds).

    `on_epoch(row)` is called on rank 0 after each epoch's evaluation with that epoch's metrics row (the
    metrics.csv keys; test_acc is NaN when the epoch was not evaluated), after metrics.csv and the
    checkpoint are written: an exception it raises propagates out of `train` and leaves those files intact.
    `resume_from` (a run directory or its checkpoint.pt) continues that run; every recipe field of
    `config` must then equal the checkpoint's (environment fields may differ).
    """
    validate(config)  # as the command line does: a bad value fails before anything is loaded
    ckpt = None
    if resume_from is not None:
        run_dir, ckpt = load_resume(resume_from)
        config = resume_config(ckpt["config"], config, {f.name for f in fields(TrainConfig)}, str(run_dir))
    return run_training(config, ckpt, on_epoch)


def run_training(config: TrainConfig, ckpt: dict[str, Any] | None,
                 on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    dist = from_env()
    device = select_device(config.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_main:  # one voice: only rank 0 prints (errors still go to stderr everywhere)
        sys.stdout = open(os.devnull, "w")
    with process_group(dist, device):
        session = setup(config, ckpt is not None, dist, device, on_epoch)
        try:
            summary = train_all(session, ckpt)
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"out of memory on {device} at --batch-size {config.batch_size}, --width "
                            f"{config.width}: lower --batch-size or --width (then --resume {session.out} if a "
                            "checkpoint exists)") from None
        print(format_summary(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_config(argv)
    ckpt = None
    if args.resume:
        run_dir, ckpt = load_resume(args.resume)
        config = resume_config(ckpt["config"], config, args.explicit, str(run_dir))
    run_training(config, ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.train"))
