"""Train the custom ResNet-9 on CIFAR-10: One Cycle, AMP, channels_last, torch.compile, several seeds.

    python -m fastcifar.train --data-dir ../shared/data/cifar10-png.tar.gz --out-dir runs/default
    python -m fastcifar.train --data-dir ../shared/data/cifar10-png.tar.gz --width 16 --epochs 10 --device cpu
    python -m fastcifar.train --preset speedrun --data-dir ../shared/data/cifar10-png.tar.gz --runs 5
    python -m fastcifar.train --resume runs/default          # continue from the last finished epoch

`train` is the loop: config -> data, model, loaders (`setup`) -> for each seed: fresh weights (`start_seed`),
`for epoch: train_one_epoch; evaluate` -> model, plots and summary (`finish_seed`). docs/training.md has more.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

import torch
from torch import nn

import fastcifar.data
from fastcifar.atomic import write_json
from fastcifar.augment import DeviceLoader
from fastcifar.checkpoint import CHECKPOINT_FILE, MODEL_FILE, ModelInfo, RunState, Training, load_resume, save_model
from fastcifar.config import TrainConfig, format_config, parse_config, resume_config, validate
from fastcifar.distributed import Dist, all_reduce, process_group
from fastcifar.errors import UserError, run_cli
from fastcifar.evaluate import evaluate, evaluation_record, tta_inputs
from fastcifar.flops import recipe_flops
from fastcifar.lookahead import Lookahead
from fastcifar.model import ResNet9, count_parameters, summary as model_summary
from fastcifar.recipe import build_criterion, build_loaders, build_model, build_optimizer, build_scheduler, \
    check_batch_size, check_optimizer_dtype, epoch_steps, init_weights, seed_everything, stop_whitening_bias, \
    total_steps
from fastcifar.report import METRICS_FILE, SUMMARY_FILE, check_out_dir, create_out_dir, epoch_row, format_summary, \
    progress_bar, run_summary, seed_line, work_line, write_metrics
from fastcifar.runtime import SignalGuard, StopRequested, Timer, amp_dtype, autocast, configure_backends, \
    environment, out_of_memory_is_one_line, run_seconds, select_device


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    scaler: torch.amp.GradScaler, batches: Iterable, device: torch.device,
                    dtype: torch.dtype | None, lookahead: Lookahead | None = None,
                    guard: SignalGuard | None = None) -> tuple[torch.Tensor, list[float]]:
    """One pass over `batches`, stepping the scheduler per batch. Returns the epoch's sums, still on the device
    (loss x samples, correct, samples, the first step whose loss was not finite or -1: `reduce_epoch` reads them
    in one sync), and the lr of each step. Raises StopRequested after the step during which SIGINT/SIGTERM arrived."""
    model.train()
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    first_bad = torch.full((), -1.0, device=device)
    seen, lrs = 0, []
    for step, (inputs, labels) in enumerate(batches):
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(inputs)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if lookahead is not None:
            lookahead.step()
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.step()
        detached = loss.detach().float()
        first_bad = torch.where(torch.isfinite(detached) | (first_bad >= 0), first_bad, step)
        loss_sum += detached * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if guard is not None and guard.stop_requested():
            raise StopRequested
    return torch.stack([loss_sum, correct, torch.full((), float(seen), device=device), first_bad]), lrs


def reduce_epoch(sums: torch.Tensor, dist: Dist) -> tuple[float, float, int, int]:
    """(mean loss, accuracy, samples, first non-finite step or -1) over all ranks: the epoch's one host sync."""
    loss_sum, correct, seen, bad = torch.cat([all_reduce(sums[:3].clone(), dist),
                                              all_reduce(sums[3:].clone(), dist, "max")]).tolist()
    return loss_sum / seen, correct / seen, int(seen), int(bad)


@dataclass(frozen=True)
class Session:
    """What one invocation sets up once and every seed shares."""

    config: TrainConfig
    dist: Dist
    device: torch.device
    dtype: torch.dtype | None    # the autocast dtype; None: fp32
    out: Path
    data: Any
    model_without_ddp: ResNet9   # the plain module (compiled in place with --compile)
    model: nn.Module             # what the loop calls: model_without_ddp, or DDP around it
    criterion: nn.Module
    train_loader: Any            # the device-resident one is reseeded for each seed, the albumentations one rebuilt
    test_loader: Any
    clocks: dict[str, float | None]  # measured once: runtime.SESSION_CLOCKS and the seeds' prep_seconds
    flops: dict[str, Any]            # flops.recipe_flops: the work of one seed


def setup(config: TrainConfig, resume: bool, dist: Dist, device: torch.device) -> Session:
    """Run directory, data, model (compiled, wrapped), loss, loaders and the warm-up of every compilation."""
    configure_backends(device)
    dtype = amp_dtype(device, config.amp, config.amp_dtype)
    check_optimizer_dtype(config, dtype)
    if dist.enabled and config.whiten_bias_epochs and config.whiten_bias_stop == "grad":  # DDP's hooks are fixed
        raise UserError("invalid --whiten-bias-stop grad under torchrun (DDP cannot drop a parameter mid-run): "
                        "use --whiten-bias-stop lr")
    out = check_out_dir(config, resume=resume)
    with Timer(torch.device("cpu")) as data_timer:
        data = fastcifar.data.load_cifar10(config.data_dir, download=config.download or None)
        if config.val_split:  # from here on the "test" arrays are the held-out training images
            data = fastcifar.data.validation_split(data, config.val_split, config.split_seed)
    check_batch_size(config, len(data.train_labels), dist)
    if dist.is_main:
        create_out_dir(out)
        if not resume:  # an --overwrite run: a stop before its first checkpoint must not offer the old run's
            (out / CHECKPOINT_FILE).unlink(missing_ok=True)
        write_json(out / "config.json", asdict(config))
    model_without_ddp = build_model(config, len(data.classes), device)
    print(model_summary(model_without_ddp))
    if config.sync_bn and dist.enabled:
        if device.type != "cuda":
            raise UserError("invalid --sync-bn: SyncBatchNorm needs CUDA devices; drop the flag on the CPU")
        model_without_ddp = nn.SyncBatchNorm.convert_sync_batchnorm(model_without_ddp)
    compile_model = config.compile if config.compile is not None else device.type == "cuda"
    if compile_model:  # in place, before DDP wraps it, as PyTorch recommends; reduce-overhead adds CUDA graphs
        model_without_ddp.compile(mode=None if config.compile_mode == "default" else config.compile_mode)
    model: nn.Module = model_without_ddp
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    train_loader, test_loader = build_loaders(config, data, device, dtype, config.seed, dist)
    resident = [loader for loader in (train_loader, test_loader) if isinstance(loader, DeviceLoader)]
    clocks = {"data_seconds": data_timer.seconds, "compile_seconds": None,  # albumentations: no upload, no prep
              **{key: sum(getattr(loader, key) for loader in resident) for key in ("upload_seconds", "prep_seconds")}}
    flops = recipe_flops(config, len(data.train_labels), len(data.test_labels), len(data.classes), dist.world_size)
    session = Session(config, dist, device, dtype, out, data, model_without_ddp, model, build_criterion(config),
                      train_loader, test_loader, clocks, flops)
    if compile_model or device.type == "cuda":
        session.clocks["compile_seconds"] = warm_up(session)
        print(f"warm-up and compile: {session.clocks['compile_seconds']:.1f}s (not counted as training time)")
    print(f"device {device}  world {dist.world_size}  amp {dtype}  compile {compile_model}  "
          f"pipeline {config.pipeline}  data {data.source} ({len(data.train_labels)} train, "
          f"{len(data.test_labels)} test) loaded in {data_timer.seconds:.1f}s")
    print(work_line(flops))
    return session


def warm_up(session: Session) -> float:
    """Every compilation and one-time device cost of the run, outside the timed regions: the whitening init's
    solver, the training step, and the evaluation forwards on a test batch (all have its shape) in each view the
    configured TTA uses, twice, so CUDA graphs are recorded too. The weights and the loader's state stay."""
    model, device, dtype, loader = session.model, session.device, session.dtype, session.train_loader
    saved = {k: v.clone() for k, v in session.model_without_ddp.state_dict().items()}
    loader_state = loader.state_dict() if isinstance(loader, DeviceLoader) else None
    with Timer(device) as timer:
        if session.config.whiten:  # the first eigh on a GPU loads its solver: a one-time cost, not the seeds'
            init_weights(session.model_without_ddp, session.config, session.data, seed=0)
        inputs, labels = (t.to(device) for t in next(iter(loader)))
        model.train()
        stops = session.config.whiten_bias_epochs and session.config.whiten_bias_stop == "grad"
        for trained in [True, False][:1 + bool(stops)]:  # a bias stopped by requires_grad is one more graph
            if stops:
                session.model_without_ddp.whitening_bias().requires_grad_(trained)
            for _ in range(2):
                with autocast(device, dtype):
                    session.criterion(model(inputs), labels).backward()
        model.eval()
        test_inputs = next(iter(session.test_loader))[0].to(device)
        with torch.no_grad(), autocast(device, dtype):  # the views made as evaluate makes them
            views = tta_inputs(test_inputs, session.config.tta_translate) if session.config.tta else [test_inputs]
            for view in views * 2:
                model(view)
    session.model_without_ddp.load_state_dict(saved)
    session.model_without_ddp.zero_grad(set_to_none=True)
    if loader_state is not None:  # the warm-up must not shift the run's random choices
        loader.load_state_dict(loader_state)
    return timer.seconds


def start_seed(session: Session, run: RunState, ckpt: dict[str, Any] | None, started: float) -> Training:
    """The seed `run` stands in, ready for its next epoch: seeded loader, fresh weights and optimizer, or
    the state `ckpt` saved. Its wall clock in this process starts at `started` (perf_counter)."""
    config, device, model = session.config, session.device, session.model_without_ddp
    seed = config.seed + run.run_index
    seed_everything(seed)
    loader = session.train_loader
    if isinstance(loader, DeviceLoader):  # its data stays on the device
        loader.reseed(seed)
    else:
        loader = build_loaders(config, session.data, device, session.dtype, seed, session.dist)[0]
    with Timer(device) as init:
        init_weights(model, config, session.data, seed)
    optimizer = build_optimizer(config, model, device)
    lookahead = Lookahead(model, total_steps(config, len(loader))) if config.lookahead else None
    training = Training(model, optimizer, build_scheduler(config, optimizer, len(loader)),
                        torch.amp.GradScaler(device.type, enabled=session.dtype == torch.float16), lookahead,
                        loader, run, origin=started - run.wall_seconds)
    if ckpt is not None:
        training.restore(ckpt, device)
        print(f"resumed seed {seed} after epoch {run.epoch}")
    else:
        run.init_seconds = init.seconds
        print(epoch_row({}, header=True))
    return training


def end_epoch(session: Session, training: Training, sums: torch.Tensor, lrs: list[float], seconds: float,
              evaluation: dict[str, Any], last: bool) -> dict[str, Any]:
    """After an epoch's steps and evaluation (NaNs when not due): the one host sync, which refuses a non-finite
    loss, then the metrics row (console and metrics.csv) and the checkpoint. Returns the row."""
    config, run = session.config, training.run
    loss, acc, seen, bad = reduce_epoch(sums, session.dist)
    epoch = run.epoch + 1
    if bad >= 0:
        raise UserError(f"loss became non-finite at step {bad + 1} of epoch {epoch} (lr {lrs[bad]:.4g}); the last "
                        f"good checkpoint is kept in {session.out}: lower --lr and --resume, or start again")
    run.epoch, run.train_seconds, run.images = epoch, run.train_seconds + seconds, run.images + seen
    run.lrs.extend(lrs)
    row = {"seed": config.seed + run.run_index, "epoch": epoch, "lr": lrs[-1], "train_loss": loss, "train_acc": acc,
           "test_loss": evaluation["loss"], "test_acc": evaluation["acc"], "epoch_seconds": seconds,
           "total_seconds": run.train_seconds}
    print(epoch_row(row), flush=True)
    run.rows.append(row)
    if session.dist.is_main:
        write_metrics(session.out / METRICS_FILE, run.rows)
    if config.checkpoint_every and (run.epoch % config.checkpoint_every == 0 or last):
        run.wall_seconds = time.perf_counter() - training.origin
        if session.dist.is_main:
            training.save(session.out / CHECKPOINT_FILE, asdict(config), session.device)
    return row


def finish_seed(session: Session, training: Training) -> dict[str, Any]:
    """Final evaluation (plain and, with --tta, the recipe's TTA, timed as final_eval_seconds), model.safetensors,
    the plots and summary.json with every seed finished so far, which it returns."""
    config, run, device, data = session.config, training.run, session.device, session.data
    seed = config.seed + run.run_index
    views = [(False, 0), (True, config.tta_translate)][:1 + config.tta]  # (flip, translate)
    results = []
    for flip, translate in views:
        with Timer(device) as own_eval:
            results.append(evaluate(session.model, session.test_loader, device, session.dtype, tta=flip,
                                    dist=session.dist, tta_translate=translate))
    final = results[0]
    clocks = {"prep_seconds": session.clocks["prep_seconds"], "init_seconds": run.init_seconds,
              "train_seconds": run.train_seconds, "final_eval_seconds": own_eval.seconds}
    result = {"seed": seed, "test_acc": final["acc"], "test_loss": final["loss"],
              "test_acc_tta": results[1]["acc"] if config.tta else None,
              "evaluations": [evaluation_record(r, flip, translate) for r, (flip, translate) in zip(results, views)],
              "run_seconds": run_seconds(clocks), **clocks, "eval_seconds": run.eval_seconds, "images": run.images,
              "epochs": config.epochs}
    if session.dist.is_main:
        save_model(session.out / MODEL_FILE, session.model_without_ddp,
                   ModelInfo(session.model_without_ddp.config, list(data.classes), list(data.mean), list(data.std),
                             final["acc"], extra={"test_acc_tta": result["test_acc_tta"], "seed": seed,
                                    "tta": {"flip": config.tta, "translate": config.tta_translate}}))
        if config.plots:
            from fastcifar.plots import save_run_plots

            save_run_plots(session.out, [r for r in run.rows if r["seed"] == seed], run.lrs,
                           len(training.loader), final, data)
    result["wall_seconds"] = time.perf_counter() - training.origin
    print(seed_line(result))
    run.finished.append(result)
    summary = run_summary(config, run.finished, params=count_parameters(session.model_without_ddp),
                          world_size=session.dist.world_size, environment=environment(device),
                          clocks=session.clocks, flops=session.flops)
    if session.dist.is_main:
        write_json(session.out / SUMMARY_FILE, summary)
    return summary


@contextlib.contextmanager
def stop_keeps_the_checkpoint(guard: SignalGuard, out: Path) -> Iterator[None]:
    """A signal's stop exits 130 (SIGINT) or 143 (SIGTERM), the last checkpoint written untouched."""
    try:
        yield
    except StopRequested:
        kept = ("no checkpoint was written yet" if not (out / CHECKPOINT_FILE).exists() else
                f"the last checkpoint written (every --checkpoint-every epochs) is kept; resume with: python -m "
                f"fastcifar.train --resume {out}")
        print(f"\nstopped by signal {guard.signum} after step {guard.steps}; {kept}", file=sys.stderr)
        raise SystemExit(130 if guard.signum == signal.SIGINT else 143) from None


def train(config: TrainConfig, *, on_epoch: Callable[[dict[str, Any]], None] | None = None,
          resume_from: str | os.PathLike | None = None, explicit: Collection[str] | None = None) -> dict[str, Any]:
    """Run `config` and return the run summary (what summary.json holds). `on_epoch(row)` gets each epoch's
    metrics row on rank 0 after metrics.csv and the checkpoint are written (a raise leaves them intact).
    `resume_from` (a run directory or its checkpoint.pt) continues that run: the fields named in `explicit`
    (default: all) must equal the checkpoint's, except the environment ones, which `config` may change."""
    validate(config)  # as the command line does: a bad value fails before anything is loaded
    ckpt = None
    if resume_from is not None:
        run_dir, ckpt = load_resume(resume_from)
        config = resume_config(ckpt["config"], config, explicit, str(run_dir))
    run = RunState(**ckpt["run"]) if ckpt else RunState()
    with process_group(select_device(config.device)) as (dist, device), out_of_memory_is_one_line(config, device):
        if not dist.is_main:  # one voice: only rank 0 prints (errors still go to stderr everywhere)
            sys.stdout = open(os.devnull, "w")
        started = time.perf_counter()  # the first seed's wall clock includes the setup
        session = setup(config, ckpt is not None, dist, device)
        with SignalGuard(dist, device) as guard, stop_keeps_the_checkpoint(guard, session.out):
            for run_index in range(run.run_index, config.runs):
                training = start_seed(session, run, ckpt, started)
                ckpt = None  # only the seed in progress at the checkpoint resumes from it
                steps = epoch_steps(config, len(training.loader))
                for epoch in range(run.epoch, len(steps)):
                    stop_whitening_bias(training.optimizer, config, epoch)
                    with Timer(device) as timer:  # the epoch's random draws (iter(loader)) are training time
                        batches = progress_bar(itertools.islice(training.loader, steps[epoch]), steps[epoch], epoch)
                        sums, lrs = train_one_epoch(session.model, session.criterion, training.optimizer,
                                                    training.scheduler, training.scaler, batches, device,
                                                    session.dtype, training.lookahead, guard)
                    last, evaluation = epoch + 1 == len(steps), {"loss": math.nan, "acc": math.nan}
                    if last or (epoch + 1) % config.eval_every == 0:
                        with Timer(device) as eval_timer:
                            evaluation = evaluate(session.model, session.test_loader, device, session.dtype, dist=dist)
                        run.eval_seconds += eval_timer.seconds
                    row = end_epoch(session, training, sums, lrs, timer.seconds, evaluation, last)
                    if on_epoch is not None and dist.is_main:  # after the files: a raise keeps them
                        on_epoch(dict(row))
                summary = finish_seed(session, training)
                run, started = RunState(run_index + 1, rows=run.rows, finished=run.finished), time.perf_counter()
    print(format_summary(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_config(argv)
    if args.print_config:
        if args.resume:  # the run would take the checkpoint's recipe, which this line has not read
            raise UserError("invalid --print-config with --resume: print the run's config.json instead")
        print(format_config(config, args.sources))
        return 0
    train(config, resume_from=args.resume, explicit=args.explicit)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.train"))
