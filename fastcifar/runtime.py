"""Where a run executes: device choice, precision, backends, a device-synchronized timer and the clocks a run
reports, out-of-memory and signal handling, and one description of the machine for every report.

    python -c "from fastcifar.runtime import environment; print(environment())"
    python -c "import json; from fastcifar.runtime import CLOCKS; print(json.dumps(CLOCKS, indent=1))"
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import time
from typing import Any, Iterator, Mapping

import torch

from fastcifar import __version__
from fastcifar.config import TrainConfig
from fastcifar.distributed import Dist, FlagVote, host_group
from fastcifar.errors import UserError

CPUINFO = "/proc/cpuinfo"
# CPU features that compute in bf16: AVX-512 BF16 and AMX on x86, the BF16 extension on Arm ("Features")
CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def select_device(name: str) -> torch.device:
    """`auto` (cuda, then mps, then cpu), `cpu`, `mps`, `cuda` or `cuda:N` (a name config.validate accepted)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, ok in available.items() if ok))
    device = torch.device(name)
    if not available[device.type]:
        raise UserError(f"invalid --device ({name}): not available on this machine; use --device cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"invalid --device ({name}): this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), numbered from 0")
    return device


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def cpu_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bf16 (Linux's flags; False where they cannot be read). Without it bf16
    autocast is emulated, which is slower than fp32 (bench/RESULTS.md), so auto AMP stays in fp32 there."""
    try:
        with open(cpuinfo or CPUINFO) as f:
            lines = [line for line in f if line.startswith(("flags", "Features"))]
    except OSError:
        return False
    return any(CPU_BF16_FLAGS & set(line.partition(":")[2].split()) for line in lines)


def amp_dtype(device: torch.device, amp: bool, choice: str = "auto") -> torch.dtype | None:
    """The autocast dtype (None: fp32): auto prefers bf16, which needs no loss scaling, where the device
    computes in it natively; other GPUs get fp16 (+ GradScaler)."""
    if not amp:
        return None
    if choice != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_native_bf16() else None
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


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
            return
        if self.device.type == "mps":
            torch.mps.synchronize()
        self.seconds = time.perf_counter() - self.start_wall


# The clocks of summary.json, timed by Timer, and what each covers: the one definition docs/ and bench/ refer to.
RUN_SECONDS_PARTS = ("prep_seconds", "init_seconds", "train_seconds", "final_eval_seconds")
SEED_CLOCKS = {  # per seed: the last seed's at the top of summary.json, a list under `runs`, each `runs.per_seed`
    "run_seconds": f"airbench94's clock, the speedrun figure: {' + '.join(RUN_SECONDS_PARTS)}. Not in it: the "
                   "per-epoch evaluations, reading and decoding files, the host-to-device upload, building the net, "
                   "compilation and warm-up",
    "train_seconds": "the training steps alone, the epoch's random draws included",
    "wall_seconds": "the host clock of the seed, from its start (the first seed's: the setup's) to its model and "
                    "plots written; a resumed seed adds on to the checkpoint's",
    "prep_seconds": "the on-device preparation (normalize, pad, mirrored copy) of both loaders' uint8 images, "
                    "measured once and counted in every seed; 0 with the albumentations pipeline",
    "init_seconds": "the seed's fresh initialization, whitening included",
    "final_eval_seconds": "the final evaluation whose accuracy is reported: the TTA one with --tta, else the plain one",
    "eval_seconds": "the per-epoch evaluations",
}
SESSION_CLOCKS = {  # once per invocation, at the top of summary.json; none is in run_seconds
    "data_seconds": "reading and decoding the data set",
    "upload_seconds": "the host-to-device copy of the uint8 images",
    "compile_seconds": "the warm-up that holds every compilation and CUDA-graph recording; null without one",
}
CLOCKS = {**SEED_CLOCKS, **SESSION_CLOCKS}  # in seconds: CUDA events on a GPU, perf_counter elsewhere


def run_seconds(seed_clocks: Mapping[str, float]) -> float:
    return sum(seed_clocks[name] for name in RUN_SECONDS_PARTS)


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """The machine and software a result came from: the one description summary.json and the benchmarks use.
    `device` (default: the GPU if any) is the GPU's model name, or the processor and thread count."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    processor = platform.processor() or platform.machine()
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{device.type} ({processor}, {torch.get_num_threads()} threads)")
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "fastcifar": __version__, "cpu": f"{processor}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@contextlib.contextmanager
def out_of_memory_is_one_line(config: TrainConfig, device: torch.device) -> Iterator[None]:
    """Running out of device memory is a one-line UserError naming the flags that size the run."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of memory on {device} at --batch-size {config.batch_size}, --width {config.width}: "
                        "lower --batch-size or --width (and --resume the run if it wrote a checkpoint)") from None


class StopRequested(Exception):
    """Raised inside an epoch after SIGINT/SIGTERM, once the current step has finished: the epoch is
    abandoned and the checkpoint of the last finished one is kept."""


class SignalGuard:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half. Under torchrun
    the ranks must stop after the same step (or the next all-reduce would hang): every `every` steps each rank
    reads the FlagVote it started `every` steps before and starts the next; all stop where a vote says some
    rank was signalled, at most 2 * `every` steps after the signal. Alone it costs nothing."""

    def __init__(self, dist: Dist, device: torch.device = torch.device("cpu"), every: int = 8):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self.dist, self.every = dist, every
        self.steps = 0                      # steps checked so far: the same count on every rank
        self._vote: FlagVote | None = None  # the vote in flight
        self._group = host_group(device) if dist.enabled else None

    def stop_requested(self) -> bool:
        """Called once after every step, on every rank."""
        self.steps += 1
        if not self.dist.enabled:
            return self.signum is not None
        if self.steps % self.every:
            return False
        agreed = self._vote is not None and self._vote.result()
        self._vote = None if agreed else FlagVote(self.signum is not None, self._group)
        if agreed:
            self.signum = self.signum or signal.SIGTERM
        return agreed

    def __enter__(self) -> "SignalGuard":
        with contextlib.suppress(ValueError):  # not the main thread: signals keep their handlers
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        if self._vote is not None:  # every rank started it: finish it before the process group goes
            self._vote.result()
        for s, h in self._old.items():
            signal.signal(s, h)
