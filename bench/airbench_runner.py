"""airbench94 0.1.8 on fastcifar's images, one seed at a time: its data files, its own printed clock, its
run on the CPU, and a failed seed when its loss is not finite. bench/speedrun.py --airbench drives it:

    python bench/speedrun.py --data-dir ../shared/data/cifar10-png.tar.gz --runs 1 --airbench -- --device cpu

airbench's work per run, counted with fastcifar's counter but with the whitening bias trained all run: 0.359
PFLOP (airbench stops it after 3 epochs, which `--preset airbench94`'s count credits: 0.350;
`pip install -e ".[bench]"`):

    python -c "import airbench, bench.airbench_runner as r
    with r.airbench_on_cpu(airbench, None): print(r.airbench_flops(airbench, 50000, 10000) / 1e15)"
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fastcifar.errors import UserError

AIRBENCH_VERSION = "0.1.8"
AIRBENCH_COLUMNS = ("run", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds")


def timed_call(fn):
    """(fn(), host seconds it took), the device synchronized before and after so queued work is counted."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


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
    every row's train_loss (the last batch's loss of each epoch).

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
    from fastcifar.flops import per_image_flops

    hyp = airbench.lib_airbench94.hyp
    batch = hyp["opt"]["batch_size"]
    steps = math.ceil((num_train // batch) * hyp["opt"]["train_epochs"])  # drop_last, as its loader does
    net = airbench.make_net94()
    return per_image_flops(net, train=True) * steps * batch + per_image_flops(net) * 6 * num_test


class Airbench:
    """airbench94 on our images, one seed at a time: `prepare()` writes its data files and runs its one-step
    warm-up (lazy init, autotuning: outside every clock); `run_seed()` trains and evaluates one seed. `out`
    holds the version, the warm-up seconds and the scratch directory; `context` is entered around every call
    into airbench (airbench_on_cpu on the CPU)."""

    def __init__(self, airbench, data, work_dir: Path, out: dict[str, Any], context=contextlib.nullcontext):
        self.airbench, self.data, self.work_dir, self.out, self.context = airbench, data, work_dir, out, context
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
            logged = parse_airbench_log(tee.buffer_text.getvalue())
            if not all(math.isfinite(loss) for loss in logged["train_losses"]):
                raise NonFiniteLoss(f"airbench's train_loss was not finite (per epoch: {logged['train_losses']})")
            accs = [self.airbench.evaluate(model, self.test_loader, tta_level=level) for level in (0, 1, 2)]
        return {"seed": seed, "acc": accs[0], "acc_flip_tta": accs[1], "acc_tta": accs[2],
                "tta": "flip+translate (tta_level 2)", "flops": self.out.get("flops_per_run"),
                "run_seconds": logged["total_time_seconds"], "train_seconds": None, "wall_seconds": wall,
                "logged": logged}
