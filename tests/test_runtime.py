"""runtime: the AMP dtype (native bf16 only, --amp-dtype) and the signal guard under torchrun.

    pytest -q tests/test_runtime.py
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from fastcifar import runtime
from fastcifar.config import parse_config
from fastcifar.distributed import Dist
from fastcifar.errors import UserError
from fastcifar.runtime import amp_dtype
from fastcifar.train import main
from synthetic import write_learnable_dataset


CUDA = torch.device("cuda", 0)


def emulating_gpu(monkeypatch, major: int) -> None:
    """A CUDA device of compute capability `major`.x that (like torch) reports emulated bf16 as supported."""
    def is_bf16_supported(including_emulation: bool = True):
        return major >= 8 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))


@pytest.mark.parametrize("major, expected", [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_auto_picks_bf16_only_where_the_gpu_computes_in_it(monkeypatch, major, expected):
    emulating_gpu(monkeypatch, major)
    assert amp_dtype(CUDA, True) == amp_dtype(CUDA, True, "auto") == expected


def test_an_explicit_amp_dtype_wins_and_no_amp_means_none(monkeypatch):
    emulating_gpu(monkeypatch, 9)
    assert amp_dtype(CUDA, True, "fp16") == torch.float16
    assert amp_dtype(CUDA, True, "bf16") == torch.bfloat16
    assert amp_dtype(torch.device("cpu"), True, "fp16") == torch.float16
    assert amp_dtype(torch.device("cpu"), True, "bf16") == torch.bfloat16
    assert amp_dtype(CUDA, False, "fp16") is None


@pytest.mark.parametrize("flags, expected", [
    ("flags\t\t: fpu avx2 avx512f avx512_vnni", None),           # AVX-512 without BF16: fp32 is faster
    ("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni", torch.bfloat16),
    ("flags\t\t: fpu avx512f amx_bf16 amx_tile", torch.bfloat16),
    ("Features\t: fp asimd bf16 i8mm", torch.bfloat16),            # Arm
    ("model name\t: bf16 in the name only", None),
])
def test_auto_on_the_cpu_uses_bf16_only_with_bf16_instructions(tmp_path, monkeypatch, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{flags}\n")
    monkeypatch.setattr(runtime, "CPUINFO", str(cpuinfo))
    assert runtime.cpu_native_bf16() is (expected is not None)
    assert amp_dtype(torch.device("cpu"), True) == expected
    assert runtime.cpu_native_bf16(str(tmp_path / "missing")) is False


@pytest.mark.slow
def test_amp_dtype_flag_reaches_training_fp16_through_a_grad_scaler(tmp_path, monkeypatch):
    steps = []

    class CountingScaler(torch.amp.GradScaler):
        def step(self, optimizer, *args, **kwargs):
            steps.append(self.get_scale())
            return super().step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    autocasts = []
    monkeypatch.setattr("fastcifar.train.autocast", lambda device, dtype: (autocasts.append(dtype),
                                                                           runtime.autocast(device, dtype))[1])
    data = write_learnable_dataset(tmp_path / "data", train_per_class=8, test_per_class=2)
    out = tmp_path / "run"
    assert main(["--data-dir", str(data), "--out-dir", str(out), "--device", "cpu", "--width", "4", "--batch-size",
                 "16", "--epochs", "1", "--no-plots", "--amp-dtype", "fp16"]) == 0
    assert steps and set(autocasts) == {torch.float16}
    assert json.loads((out / "config.json").read_text())["amp_dtype"] == "fp16"
    with pytest.raises(UserError, match="--amp-dtype"):
        parse_config(["--amp-dtype", "fp8"])


def _guarded_steps(rank: int, world_size: int, init_file: str, results: str) -> None:
    """One rank of a 2-process gloo group: steps until the guard stops it; rank 1 gets SIGTERM at step 5."""
    import os

    import torch.distributed as dist

    from fastcifar.runtime import SignalGuard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        with SignalGuard(Dist(rank=rank, world_size=world_size), every=4) as guard:
            for step in range(1, 200):
                grads = torch.ones(1)
                dist.all_reduce(grads)  # what DDP does each step: the ranks move together
                if rank == 1 and step == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                if guard.stop_requested():
                    break
        Path(results, f"rank{rank}.json").write_text(json.dumps({"step": step, "signum": guard.signum}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_after_the_same_step(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_guarded_steps, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    stopped = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert stopped[0]["step"] == stopped[1]["step"]
    assert 5 < stopped[0]["step"] <= 5 + 2 * 4  # the vote started at step 8 is read at step 12
    assert stopped[1]["signum"] == signal.SIGTERM and stopped[0]["signum"] == signal.SIGTERM


def test_each_vote_is_read_one_period_after_it_started(monkeypatch):
    """Under torchrun the flag is voted on asynchronously: started at one check, read at the next, over the host
    group of the guard's device (a gloo group beside NCCL, so the vote's CPU tensor never touches the GPU).
    Sabotage: the guard's group dropped (None: the default group, NCCL under CUDA)."""
    from fastcifar import distributed

    started, groups, host = [], [], object()

    class RecordingVote:
        def __init__(self, flag, group=None):
            self.flag = flag
            started.append(flag)
            groups.append(group)

        def result(self):
            return self.flag

    monkeypatch.setattr(runtime, "FlagVote", RecordingVote)
    monkeypatch.setattr(runtime, "host_group", lambda device: host if device == torch.device("cuda:1") else None)
    guard = runtime.SignalGuard(distributed.Dist(rank=0, world_size=2), torch.device("cuda:1"), every=3)
    with guard:
        results = [guard.stop_requested() for _ in range(6)]
        guard.signum = 15  # signalled after step 6
        results += [guard.stop_requested() for _ in range(6)]
    assert started == [False, False, True]  # votes started at steps 3, 6, 9
    assert groups == [host] * 3
    assert results.index(True) == 11 and results.count(True) == 1  # the step-9 vote, read at step 12


def test_mps_auto_amp_is_fp16():
    """Sabotage: amp_dtype's last line returning bf16 (auto on MPS and other devices is fp16)."""
    mps = torch.device("mps")
    assert runtime.amp_dtype(mps, True) == torch.float16
    assert runtime.amp_dtype(mps, True, "bf16") == torch.bfloat16
    assert runtime.amp_dtype(mps, False) is None


def test_the_guard_finishes_its_vote_in_flight_before_the_process_group_goes(monkeypatch):
    """Sabotage: SignalGuard.__exit__ not waiting for the vote it started (every rank started it; a process
    group destroyed under it can hang or abort)."""

    read = []

    class Vote:
        def __init__(self, flag, group=None):
            self.flag = flag

        def result(self):
            read.append(self.flag)
            return self.flag

    monkeypatch.setattr(runtime, "FlagVote", Vote)
    monkeypatch.setattr(runtime, "host_group", lambda device: None)
    with runtime.SignalGuard(Dist(rank=0, world_size=2), every=1) as guard:
        assert guard.stop_requested() is False  # starts a vote, reads none
        assert read == []
    assert read == [False]


def test_the_guard_gives_back_the_signal_handlers_it_found():
    """Sabotage: SignalGuard.__exit__ not restoring the handlers (after an in-process train(), as tune and compare
    run it, Ctrl-C would only set the finished guard's flag instead of interrupting)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with runtime.SignalGuard(Dist()) as guard:
        assert signal.getsignal(signal.SIGINT) == guard._handle
    assert {s: signal.getsignal(s) for s in before} == before


def test_out_of_memory_during_training_is_one_line_on_any_device(monkeypatch, capsys):
    """The CUDA test's wiring on the CPU. Sabotage: train() without out_of_memory_is_one_line around the run."""
    import fastcifar.train as train_module
    from fastcifar.errors import run_cli

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_module, "setup", out_of_memory)
    assert run_cli(main, ["--device", "cpu", "--batch-size", "64", "--width", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory on cpu at --batch-size 64, --width 8" in err[0], err


def test_run_seconds_sums_exactly_the_parts_its_definition_names():
    """Sabotage: run_seconds() adding eval_seconds (or dropping a part); CLOCKS' run_seconds text naming other
    parts than the ones summed."""
    clocks = {name: float(2 ** i) for i, name in enumerate(runtime.CLOCKS)}  # each clock a distinct bit
    parts = ("prep_seconds", "init_seconds", "train_seconds", "final_eval_seconds")
    assert runtime.run_seconds(clocks) == sum(clocks[name] for name in parts)
    assert " + ".join(parts) in runtime.CLOCKS["run_seconds"]
    assert set(runtime.CLOCKS) == {*runtime.SEED_CLOCKS, *runtime.SESSION_CLOCKS}
