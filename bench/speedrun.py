"""Speedrun benchmark: N seeds of a fastcifar preset, optionally against airbench94 on the same images.

    python bench/speedrun.py --data-dir ../shared/data/cifar10-png.tar.gz --preset speedrun --runs 5
    python bench/speedrun.py --data-dir .gpu/cifar10-gpu.tar.gz --preset speedrun --runs 5 \\
        --airbench --airbench-runs 5 --json /tmp/speedrun.json
    python bench/speedrun.py --data-dir DIR --preset default --runs 2 -- --width 16 --epochs 2 --device cpu
    python bench/speedrun.py --data-dir ../shared/data/cifar10-png.tar.gz --preset speedrun --runs 5 --airbench \\
        --json cpu.json -- --device cpu        # both methods on the CPU, same threads and precision

Everything after `--` is passed to `fastcifar.train` unchanged (it overrides the preset; --runs, --seed,
--out-dir and --resume are ours). Each seed is its own in-process `fastcifar.train.main` call (`--runs 1`,
its own run directory), so an error in one seed (non-finite loss, out of memory) is recorded for that
seed and the rest continue. Unless overridden after `--`, the runs use `--no-plots --checkpoint-every 0`.
With `--airbench` the two methods are interleaved seed by seed (fastcifar first on even seeds, airbench
first on odd ones), so both see the same GPU clocks and temperature.

One clock for both sides, airbench94's convention: **run seconds** = on-device data
preparation from uint8 images already on the device + first-layer (whitening) init + every training step +
the final evaluation with the method's own TTA, timed with device events. Per-epoch evaluations, reading
and decoding files, the host-to-device upload and compilation are not in it. Per method and seed:
- fastcifar: `run_seconds` from its summary.json (the trainer's own events); `train_seconds` (steps only)
  is reported apart as "steps s". A summary without `run_seconds` leaves "run s" empty and says so: steps
  seconds are never put in its place.
- airbench94 0.1.8: its own printed `total_time_seconds` (the final `eval` row of its table), read as it
  is; output without it is an error (AirbenchOutputError), never replaced by wall time.
- both: `wall_seconds` = this harness's host clock (device synchronized) around the whole per-seed call:
  fastcifar's includes its setup (data from the decoded cache, upload, model, warm-up and compilation,
  which is also reported apart), airbench's its loading of train.pt/test.pt onto the device and its
  per-epoch evaluations. airbench's one-step warm-up (`warmup94`) runs once before its first seed, apart.

`--airbench` needs airbench (PyPI `airbench==0.1.8`, `pip install fastcifar[bench]`, or its wheel) and
CUDA; our decoded CIFAR-10 is written as `cifar10/train.pt`/`test.pt` (uint8 N x 32 x 32 x 3 images,
int64 labels, class names) into a scratch directory that is the working directory during its runs.

`--json OUT` gets every number plus date, device, torch version, data source and the command line; it is
rewritten after every seed of either method, so a run cut short (SIGTERM from `timeout`) keeps what
finished.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/speedrun.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402 (after the sys.path line)

from fastcifar.config import split_at_double_dash  # noqa: E402
from fastcifar.errors import UserError, first_line, run_cli  # noqa: E402
from fastcifar.stats import describe  # noqa: E402

THRESHOLD = 0.94
AIRBENCH_VERSION = "0.1.8"
DEFAULT_TRAIN_FLAGS = ("--no-plots", "--checkpoint-every", "0")
AIRBENCH_COLUMNS = ("run", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds")
PER_SEED_TRAIN_FLAGS = ("--runs", "--seed", "--out-dir", "--resume")  # speedrun sets these for each seed
FASTCIFAR, AIRBENCH = "fastcifar", "airbench94"
CLOCK = {
    "run_seconds": "airbench94's convention, device events: on-device data preparation from uint8 images already "
                   "on the device + first-layer (whitening) init + all training steps + the final evaluation with "
                   "the method's own TTA; per-epoch evaluations, reading/decoding files, the host-to-device upload "
                   "and compilation are not in it. fastcifar: its summary's run_seconds; airbench94: its own "
                   "printed total_time_seconds",
    "train_seconds": "fastcifar only: the training steps alone (its summary's train_seconds)",
    "wall_seconds": "this harness's host clock, device synchronized, around each per-seed call: fastcifar's "
                    "includes its setup, warm-up and compilation (compile_seconds, reported apart); airbench's its "
                    "loading of train.pt/test.pt onto the device and its per-epoch evaluations",
}


class Stopped(Exception):
    """SIGTERM/SIGINT outside the trainer (which handles them itself)."""

    def __init__(self, message: str, code: int = 143):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/speedrun.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train N seeds of a fastcifar preset (and optionally airbench94 on the same images, "
                    "interleaved seed by seed); report accuracy mean +- std, the fraction >= 94% and median "
                    "seconds on airbench's clock (run s), steps only and wall. Flags after `--` go to "
                    "fastcifar.train.",
        epilog="example: python bench/speedrun.py --data-dir ../shared/data/cifar10-png.tar.gz --preset speedrun "
               "--runs 5 --airbench --json out.json -- --epochs 10")
    p.add_argument("--data-dir", metavar="PATH", help="CIFAR-10 source (see fastcifar.data); default: the cache")
    p.add_argument("--preset", default="speedrun", help="fastcifar.config preset to benchmark")
    p.add_argument("--runs", type=int, default=5, help="seeds to train (seed .. seed+runs-1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (fastcifar and airbench)")
    p.add_argument("--out-dir", metavar="DIR", help="fastcifar run directory (default: runs/speedrun-<preset>-<time>)")
    p.add_argument("--airbench", action="store_true", help="also run airbench94 (airbench==0.1.8) on the trainer's "
                   "device: CUDA, or the CPU (`-- --device cpu`) in the trainer's precision")
    p.add_argument("--airbench-runs", type=int, default=None, help="airbench seeds (default: --runs), interleaved "
                   "with fastcifar's seed by seed")
    p.add_argument("--work-dir", metavar="DIR", help="scratch directory for airbench's cifar10/*.pt "
                   "(default: a temporary directory, removed afterwards)")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help="accuracy counted as a success")
    p.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, train_flags = split_at_double_dash(argv)
    args = get_args_parser().parse_args(ours)
    from fastcifar.config import PRESETS

    if args.preset not in PRESETS:
        raise UserError(f"invalid --preset ({args.preset}): not in fastcifar.config.PRESETS; "
                        f"choose one of {', '.join(sorted(PRESETS))}")
    if args.runs < 1 or (args.airbench_runs is not None and args.airbench_runs < 1):
        raise UserError("invalid --runs/--airbench-runs: must be >= 1")
    if args.airbench_runs is None:
        args.airbench_runs = args.runs
    taken = [f for f in train_flags if f.split("=")[0] in PER_SEED_TRAIN_FLAGS]
    if taken:
        raise UserError(f"invalid trainer flag {taken[0]} after `--`: speedrun sets --runs 1, --seed and --out-dir "
                        "for each seed itself; use speedrun's own --runs, --seed and --out-dir")
    from fastcifar.config import parse_config

    args.train_config, _ = parse_config(train_argv(args, args.seed, Path("unused"), train_flags))  # fails now
    return args, train_flags


def train_argv(args: argparse.Namespace, seed: int, out_dir: Path, extra: Sequence[str]) -> list[str]:
    """The fastcifar.train command line of one seed: ours first, so flags after `--` override them."""
    argv = ["--preset", args.preset, "--runs", "1", "--seed", str(seed), "--out-dir", str(out_dir), "--overwrite",
            *DEFAULT_TRAIN_FLAGS]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    return argv + list(extra)


def schedule(runs: int, airbench_runs: int) -> list[tuple[str, int]]:
    """(method, index) in running order: seed by seed, fastcifar first on even indices, airbench94 on odd ones,
    so neither method always meets the warmer GPU."""
    order: list[tuple[str, int]] = []
    for i in range(max(runs, airbench_runs)):
        pair = [(m, i) for m, n in ((FASTCIFAR, runs), (AIRBENCH, airbench_runs)) if i < n]
        order += pair[::-1] if i % 2 else pair
    return order


def timed_call(fn):
    """(fn(), host seconds it took), the device synchronized before and after so queued work is counted."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------
# Statistics and the table
# ------------------------------------------------------------------------------------------------------
def at_least(values: Sequence[float], threshold: float) -> dict[str, Any] | None:
    if not values:
        return None
    k = int(sum(v >= threshold for v in values))
    return {"count": k, "runs": len(values), "fraction": k / len(values)}


def method_stats(records: Sequence[dict[str, Any]], threshold: float, own_tta: str | None) -> dict[str, Any]:
    """One method's numbers over its finished seeds (records without an error). The success fraction uses the
    method's own TTA accuracy when it has one."""
    done = [r for r in records if not r.get("error")]

    def column(key: str) -> list[float]:
        return [float(r[key]) for r in done if r.get(key) is not None]

    acc, own = column("acc"), column("acc_tta")
    return {
        "runs": len(records), "finished": len(done), "failed": len(records) - len(done), "acc": describe(acc), "acc_flip_tta": describe(column("acc_flip_tta")),
        "acc_tta": describe(own), "tta": own_tta if own else None,
        "at_least_threshold": {"threshold": threshold, "acc": at_least(acc, threshold),
                               "acc_tta": at_least(own, threshold), "primary": "acc_tta" if own else "acc"},
        "flops_per_run": column("flops")[0] if column("flops") else None,
        "run_seconds": describe(column("run_seconds")), "train_seconds": describe(column("train_seconds")),
        "wall_seconds": describe(column("wall_seconds")),
        "run_seconds_missing": sum(r.get("run_seconds") is None for r in done),
    }


def _pm(d: dict | None) -> str:
    """'mean +- std' in percent, 15 characters wide."""
    text = f"{100 * d['mean']:.2f} +- {100 * d['std']:.2f}" if d and d["n"] else "-"
    return f"{text:>15}"


def _median(d: dict | None) -> float | None:
    return d["median"] if d and d["n"] else None


def format_table(rows: list[tuple[str, dict[str, Any]]], reference: str | None = None) -> str:
    """One fixed-width table: accuracies in %, success fractions, median run / steps / wall seconds, and the
    median run seconds relative to `reference`'s."""
    ref_s = _median(dict(rows)[reference]["run_seconds"]) if reference in dict(rows) else None
    thr_pct = f">={100 * rows[0][1]['at_least_threshold']['threshold']:g}%" if rows else ">=thr"
    head = (f"{'method':<24} {'runs':>5}  {'failed':>6}  {'acc %':>15}  {'flip TTA %':>15}  {'own TTA %':>15}  "
            f"{thr_pct:>7}  {thr_pct + ' TTA':>11}  {'PFLOP':>6}  {'run s':>8}  {'steps s':>8}  {'wall s':>8}  "
            f"{'run ratio':>9}")
    lines = [head, "-" * len(head)]
    for name, s in rows:
        thr = s["at_least_threshold"]
        plain, tta = (f"{f['count']}/{f['runs']}" if f else "-" for f in (thr["acc"], thr["acc_tta"]))
        run_s, steps_s, wall_s = (_median(s[k]) for k in ("run_seconds", "train_seconds", "wall_seconds"))
        ratio = f"{run_s / ref_s:8.2f}x" if (run_s and ref_s) else f"{'-':>9}"
        secs = "  ".join(f"{v:8.2f}" if v is not None else f"{'-':>8}" for v in (run_s, steps_s, wall_s))
        pflop = f"{s['flops_per_run'] / 1e15:6.3f}" if s.get("flops_per_run") else f"{'-':>6}"
        lines.append(f"{name:<24} {s['finished']:>2}/{s['runs']:<2}  {s['failed']:>6}  {_pm(s['acc'])}  {_pm(s['acc_flip_tta'])}  "
                     f"{_pm(s['acc_tta'])}  {plain:>7}  {tta:>11}  {pflop}  {secs}  {ratio}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# fastcifar: one seed per call
# ------------------------------------------------------------------------------------------------------
def summary_seeds(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-seed results of a summary.json (`runs.per_seed`, one dict per seed)."""
    return [dict(r) for r in summary["runs"]["per_seed"]]


def fastcifar_record(summary: dict[str, Any]) -> dict[str, Any]:
    """The one seed of a one-seed summary.json in this harness's terms. `run_seconds` stays None when the
    trainer does not report it (train_seconds is never put in its place)."""
    (run,) = summary_seeds(summary)
    tta = summary.get("tta")  # the trainer's TTA as fields: {"flip": True, "translate": N, "views": [...]}
    translate = tta["translate"] if tta else 0
    own = run.get("test_acc_tta")
    name = ("flip + translate " + str(translate) if translate else "flip") if tta and own is not None else None
    return {"seed": run.get("seed"), "acc": run["test_acc"], "acc_tta": own,
            "acc_flip_tta": own if name == "flip" else None, "tta": name,
            "run_seconds": run.get("run_seconds"), "train_seconds": run.get("train_seconds"),
            "trainer_wall_seconds": run.get("wall_seconds"), "compile_seconds": summary.get("compile_seconds"),
            "data_seconds": summary.get("data_seconds"), "flops": (summary.get("flops") or {}).get("per_run")}


def run_fastcifar_seed(argv: list[str], out_dir: Path) -> dict[str, Any]:
    """One seed through fastcifar.train.main in this process; its record from the summary.json it wrote."""
    import torch._dynamo

    from fastcifar import train

    # every seed compiles its own model under the same conditions: none inherits the graphs of the seeds
    # before it, and none meets dynamo's recompile limit (past it, dynamo falls back to eager silently).
    # Compilation is outside run_seconds; the inductor cache on disk keeps the later compiles short.
    torch._dynamo.reset()
    _, wall = timed_call(lambda: train.main(argv))
    record = fastcifar_record(json.loads((out_dir / "summary.json").read_text()))
    record.update(wall_seconds=wall, out_dir=str(out_dir))
    return record


# ------------------------------------------------------------------------------------------------------
# airbench
# ------------------------------------------------------------------------------------------------------
class AirbenchOutputError(Exception):
    """airbench's printed table did not give its total_time_seconds (another version, or a changed format)."""


class NonFiniteLoss(Exception):
    """A seed's training loss was not finite: the seed failed, whatever accuracy its model still gives."""


def require_airbench(device: str):
    """Import airbench, or raise UserError saying why it cannot run on `device` (a device type) here."""
    import torch

    if device not in ("cuda", "cpu") or (device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"--airbench runs on CUDA or on the CPU, not on {device}: airbench 0.1.8 builds its net with "
                        ".cuda(), loads its data with map_location=cuda and times with CUDA events (patched to the "
                        "host on the CPU); pass `-- --device cpu` to run both methods on the CPU")
    try:
        import airbench
    except ImportError as e:
        raise UserError(f"--airbench needs the airbench package ({e}): pip install fastcifar[bench] (airbench=="
                        f"{AIRBENCH_VERSION}) or install its wheel, or run without --airbench") from None
    if airbench_version() != AIRBENCH_VERSION:
        print(f"warning: airbench {airbench_version()} found; this harness was written for {AIRBENCH_VERSION} "
              f"(it parses its printed table)", file=sys.stderr)
    return airbench


def airbench_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("airbench")
    except metadata.PackageNotFoundError:
        return None


def write_airbench_data(data, root: Path) -> Path:
    """Our CifarData as airbench's `root/cifar10/{train,test}.pt`; returns the cifar10 directory."""
    import torch

    folder = root / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images = np.ascontiguousarray(getattr(data, f"{split}_images"), dtype=np.uint8)
        labels = np.asarray(getattr(data, f"{split}_labels"), dtype=np.int64)
        if split == "train":  # airbench whitens on train[:5000]: a class-sorted folder must not give it one class
            order = np.random.default_rng(0).permutation(len(labels))
            images, labels = images[order], labels[order]
        torch.save({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels),
                    "classes": list(data.classes)}, folder / f"{split}.pt")
    return folder


def parse_airbench_log(text: str) -> dict[str, Any]:
    """airbench 0.1.8's verbose table: the final 'eval' row's val_acc, tta_val_acc and total_time_seconds, and
    every row's train_loss (its last batch's loss in each epoch).

    Raises AirbenchOutputError when there is no final row: the harness never guesses airbench's time."""
    found, losses = None, []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != len(AIRBENCH_COLUMNS) or not (cells[1] == "eval" or cells[1].isdigit()):
            continue
        try:
            losses.append(float(cells[AIRBENCH_COLUMNS.index("train_loss")]))
            if cells[1] == "eval":
                found = {k: float(cells[AIRBENCH_COLUMNS.index(k)]) for k in
                         ("val_acc", "tta_val_acc", "total_time_seconds")}
        except ValueError:
            continue
    if found is None:
        last = [line for line in text.splitlines() if line.strip()][-3:]
        raise AirbenchOutputError(
            f"no final '| eval |' row with a numeric total_time_seconds in airbench's output (this harness reads "
            f"airbench {AIRBENCH_VERSION}'s printed table, columns {', '.join(AIRBENCH_COLUMNS)}, and does not fall "
            f"back to wall time); its last lines: {last}")
    return {**found, "train_losses": losses}


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy (airbench reports its time only by printing it)."""

    def __init__(self, stream):
        self.stream, self.buffer_text = stream, io.StringIO()

    def write(self, s: str) -> int:
        self.buffer_text.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def working_dir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class HostClockEvent:
    """torch.cuda.Event for airbench on the CPU: record() reads the host clock, elapsed_time() in ms."""

    def __init__(self, enable_timing: bool = False):
        self.seconds: float | None = None

    def record(self, stream=None) -> None:
        self.seconds = time.perf_counter()

    def elapsed_time(self, end: "HostClockEvent") -> float:
        return 1000.0 * (end.seconds - self.seconds)


def lookahead_update(state, net, decay: float) -> None:
    """airbench's LookaheadState.update for every float dtype: its own averages fp16 and fp32 tensors only and
    would skip the bf16 weights that stand in for its fp16 ones on the CPU."""
    for ema, param in zip(state.net_ema.values(), net.state_dict().values()):
        if param.is_floating_point():
            ema.lerp_(param, 1 - decay)
            param.copy_(ema)


@contextlib.contextmanager
def airbench_on_cpu(airbench, dtype):
    """airbench 0.1.8's own code on the CPU, computing what it computes on a GPU: where it uses fp16 (its net's
    `.half()`, its loader's `images.half()`) it gets `dtype` (bf16 where the CPU computes in it natively; None:
    fp32); its BatchNorm stays fp32, as it makes it, and its whitening fp32 (no autocast: that would make its
    fp32 patch covariance a bf16 matmul, whose negative eigenvalues give NaN filters). Its .cuda() calls stay
    on the CPU, its loader loads there and its CUDA events read the host clock."""
    import torch
    from unittest import mock

    low = dtype or torch.float32
    loader_init = airbench.utils.CifarLoader.__init__
    patches = [(torch.cuda, "Event", HostClockEvent), (torch.cuda, "synchronize", lambda *args, **kwargs: None),
               (torch.nn.Module, "cuda", lambda self, *args, **kwargs: self),
               (torch.nn.Module, "half", lambda self: self.to(low)),
               (torch.Tensor, "half", lambda self, *args, **kwargs: self.to(low, *args, **kwargs)),
               (loader_init, "__defaults__", loader_init.__defaults__[:-1] + ("cpu",)),
               (airbench.utils.LookaheadState, "update", lookahead_update)]
    with contextlib.ExitStack() as stack:
        for target, name, value in patches:
            stack.enter_context(mock.patch.object(target, name, value))
        yield


def airbench_flops(airbench, num_train: int, num_test: int) -> int:
    """airbench94's work per run, counted as fastcifar.flops counts ours: one image's training step (its
    whitening filters frozen) x the images its 9.9 epochs of batch-1024 steps see, plus one image's forward
    x 6 TTA views (tta_level 2) x the test images."""
    from fastcifar.flops import forward_flops, train_step_flops

    hyp = airbench.lib_airbench94.hyp
    batch = hyp["opt"]["batch_size"]
    steps = math.ceil((num_train // batch) * hyp["opt"]["train_epochs"])  # drop_last, as its loader does
    net = airbench.make_net94()
    return train_step_flops(net) * steps * batch + forward_flops(net) * 6 * num_test


class Airbench:
    """airbench94 on our images, one seed at a time: `prepare()` writes its data files and runs its one-step
    warm-up (cuDNN autotuning, lazy init: outside every timing); `run_seed()` trains and evaluates one seed.

    `out` holds the version, the warm-up seconds and the scratch directory."""

    def __init__(self, airbench, data, work_dir: Path, out: dict[str, Any], context=contextlib.nullcontext):
        self.airbench, self.data, self.work_dir, self.out = airbench, data, work_dir, out
        self.context = context  # entered around every call into airbench: airbench_on_cpu on the CPU
        self.test_loader = None
        out.update(version=airbench_version(), work_dir=str(work_dir))

    def prepare(self) -> None:
        write_airbench_data(self.data, self.work_dir)
        with self.context():
            self.out["flops_per_run"] = airbench_flops(self.airbench, len(self.data.train_labels),
                                                       len(self.data.test_labels))
        with working_dir(self.work_dir), self.context():
            _, self.out["warmup_seconds"] = timed_call(self.airbench.warmup94)
            self.test_loader = self.airbench.CifarLoader("cifar10", train=False, batch_size=2000)

    def run_seed(self, index: int, seed: int) -> dict[str, Any]:
        import torch

        if self.test_loader is None:
            self.prepare()
        torch.manual_seed(seed)  # airbench draws from the global generators and seeds nothing
        tee = _Tee(sys.stdout)
        with working_dir(self.work_dir), contextlib.redirect_stdout(tee), self.context():
            model, wall = timed_call(lambda: self.airbench.train94(run=index, verbose=True))
            accs = [self.airbench.evaluate(model, self.test_loader, tta_level=level) for level in (0, 1, 2)]
        logged = parse_airbench_log(tee.buffer_text.getvalue())
        if not all(math.isfinite(loss) for loss in logged["train_losses"]):
            raise NonFiniteLoss(f"airbench's train_loss was not finite (per epoch: {logged['train_losses']})")
        return {"seed": seed, "acc": accs[0], "acc_flip_tta": accs[1], "acc_tta": accs[2],
                "tta": "flip+translate (tta_level 2)", "flops": self.out.get("flops_per_run"),
                "run_seconds": logged["total_time_seconds"],
                "train_seconds": None, "wall_seconds": wall, "logged": logged}


# ------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------
def environment(argv: Sequence[str]) -> dict[str, Any]:
    from fastcifar import runtime

    return {**runtime.environment(), "host": platform.node(), "python_executable": sys.executable,
            "command": shlex.join(["python", "bench/speedrun.py", *argv])}


def own_tta(records: Sequence[dict[str, Any]]) -> str | None:
    return next((r["tta"] for r in records if r.get("tta") and not r.get("error")), None)


def build_report(env: dict, args: argparse.Namespace, data_info: dict, results: dict[str, dict]) -> dict[str, Any]:
    """Everything as data: per-seed records of each method, their statistics, the table and notes."""
    fast, ab = results.get(FASTCIFAR), results.get(AIRBENCH)
    report: dict[str, Any] = {**env, **data_info, "preset": args.preset, "threshold": args.threshold, "clock": CLOCK,
                              "order": "interleaved seed by seed, fastcifar first on even seeds" if ab else
                                       "fastcifar seeds in order", "fastcifar": fast, "airbench": ab, "notes": []}
    rows = []
    for label, out in ((f"fastcifar[{args.preset}]", fast), (AIRBENCH, ab)):
        if out and out["runs"]:
            rows.append((label, method_stats(out["runs"], args.threshold, own_tta(out["runs"]))))
    report["methods"] = names = dict(rows)
    fast_stats = names.get(f"fastcifar[{args.preset}]")
    if fast_stats and fast_stats["run_seconds_missing"]:
        report["notes"].append(
            f"fastcifar's summary.json has no run_seconds for {fast_stats['run_seconds_missing']} of "
            f"{fast_stats['finished']} finished seeds (a summary written before the trainer reported airbench's "
            "clock): 'run s' and the run ratio are left empty; 'steps s' (train_seconds) is not comparable to "
            "airbench94's total_time_seconds")
    medians = [_median(s["run_seconds"]) for s in names.values()]
    report["time_ratio_fastcifar_over_airbench"] = (
        medians[0] / medians[1] if len(rows) == 2 and all(medians) and not fast_stats["run_seconds_missing"] else None)
    report["table"] = format_table(rows, reference=AIRBENCH if AIRBENCH in names else None) if rows else ""
    return report


def footer(report: dict[str, Any]) -> str:
    lines = [f"device {report['device']}, torch {report['torch']}, data {report.get('data_source')} (first load "
             f"{report['data_first_load_seconds']:.1f} s); order: {report['order']}",
             "run s = device events around on-device data preparation + whitening init + training steps + final "
             "eval with own TTA (airbench94's clock; fastcifar: summary run_seconds, airbench94: its printed "
             "total_time_seconds); steps s = fastcifar's training steps only; wall s = host clock around each "
             "per-seed call (fastcifar's includes setup and compilation)"]
    fast = report["fastcifar"]
    compiles = [r["compile_seconds"] for r in (fast or {}).get("runs", []) if r.get("compile_seconds") is not None]
    if compiles:
        lines.append(f"fastcifar: warm-up/compile {compiles[0]:.1f} s on its first seed, median "
                     f"{float(np.median(compiles)):.1f} s per seed (in wall s, not in run s or steps s)")
    if report["airbench"] and report["airbench"].get("warmup_seconds") is not None:
        lines.append(f"airbench94: warmup94 {report['airbench']['warmup_seconds']:.1f} s once, before its first "
                     "seed (in no column)")
    if report.get("time_ratio_fastcifar_over_airbench"):
        lines.append(f"run ratio = median run s / airbench94's: fastcifar/airbench = "
                     f"{report['time_ratio_fastcifar_over_airbench']:.2f}")
    lines += [f"WARNING: {n}" for n in report["notes"]]
    lines += [f"error: {e}" for e in report.get("errors") or []]
    return "\n".join(lines)


def _raise_stopped(signum, frame):
    raise Stopped(f"signal {signum}", 130 if signum == signal.SIGINT else 143)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    from fastcifar.runtime import amp_dtype, select_device

    config = args.train_config
    device = select_device(config.device)  # the trainer's; airbench runs on the same device
    airbench = require_airbench(device.type) if args.airbench else None  # fail before any training
    env = environment(argv)
    out_dir = Path(args.out_dir or f"runs/speedrun-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")

    import torch

    from fastcifar.data import load_cifar10

    t0 = time.perf_counter()
    data = load_cifar10(args.data_dir)  # decodes (and caches) once; each seed's trainer then reads the cache
    data_info = {"data_source": data.source, "data_dir": args.data_dir,
                 "data_first_load_seconds": time.perf_counter() - t0,
                 "train_images": len(data.train_labels), "test_images": len(data.test_labels)}
    results: dict[str, dict[str, Any]] = {FASTCIFAR: {"runs": [], "out_dir": str(out_dir)}}
    scratch = runner = None
    if airbench is not None:
        scratch = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="airbench-"))
        results[AIRBENCH] = {"runs": []}
        context = contextlib.nullcontext
        if device.type == "cpu":  # in fastcifar's precision on this CPU, as the comparison needs
            dtype = amp_dtype(device, config.amp, config.amp_dtype)
            results[AIRBENCH]["cpu_precision"] = str(dtype or torch.float32)
            context = lambda: airbench_on_cpu(airbench, dtype)  # noqa: E731
        runner = Airbench(airbench, data, scratch, results[AIRBENCH], context)
    errors: list[str] = []
    seed_errors = (UserError, NonFiniteLoss, torch.cuda.OutOfMemoryError)  # this seed only; anything else stops its method

    def save() -> dict[str, Any]:
        report = build_report(env, args, data_info, results)
        report["errors"] = errors
        if args.json:
            from fastcifar.atomic import write_json

            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_json(args.json, report)
        return report

    def run_one(method: str, index: int) -> None:
        seed = args.seed + index
        if method == FASTCIFAR:
            seed_dir = out_dir / f"seed-{seed}"
            record = run_fastcifar_seed(train_argv(args, seed, seed_dir, extra), seed_dir)
        else:
            torch.cuda.empty_cache()
            record = runner.run_seed(index, seed)
        results[method]["runs"].append(record)

    old = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            old[s] = signal.signal(s, _raise_stopped)
        except ValueError:  # not the main thread
            pass
    code = 0
    try:
        for method, index in schedule(args.runs, args.airbench_runs if airbench is not None else 0):
            if results[method].get("error"):
                continue  # this method stopped on an error that every seed would repeat
            try:
                run_one(method, index)
            except SystemExit as e:  # the trainer stopped on SIGINT/SIGTERM after checkpointing
                if e.code not in (130, 143):
                    raise
                raise Stopped(f"exit {e.code}", e.code) from None
            except seed_errors as e:
                message = f"{type(e).__name__}: {first_line(e)}"
                results[method]["runs"].append({"seed": args.seed + index, "error": message})
                errors.append(f"{method} seed {args.seed + index}: {message}")
                code = 1
            except (Stopped, KeyboardInterrupt):
                raise
            except Exception as e:  # a bug or a changed airbench: the next seeds would fail the same way
                traceback.print_exc()
                results[method]["error"] = f"{type(e).__name__}: {first_line(e)}"
                errors.append(f"{method} stopped at seed {args.seed + index}: {results[method]['error']}")
                code = 1
            save()
    except Stopped as e:
        errors.append(f"stopped early ({e}); results are partial")
        code = e.code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if scratch is not None and not args.work_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    report = save()
    print("\n" + report["table"] + "\n" + footer(report), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="speedrun"))
