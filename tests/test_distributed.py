"""torchrun: two CPU processes with gloo at batch B train exactly like one process at batch 2B.

Exactness needs one change in both runs: BatchNorm normalizes over each rank's own B images (--sync-bn
needs CUDA), which makes the two set-ups genuinely different. Both runs therefore go through
tests/per_sample_norm_train.py, which is `fastcifar.train` with each BatchNorm2d replaced by a per-sample
norm; everything torchrun changes (the rank's shard of the shared permutation and augmentations, DDP's
gradient averaging, the schedule's steps from the global batch, the reduced evaluation, one writer) is
fastcifar's own code. A shard that ignores its rank, or gradients that are not averaged, fail here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastcifar.augment import DeviceLoader
from fastcifar.checkpoint import load_checkpoint, load_model
from fastcifar.config import TrainConfig
from fastcifar.data import load_cifar10
from fastcifar.distributed import Dist
from fastcifar.errors import UserError
from fastcifar.evaluate import evaluate
from per_sample_norm_train import PerSampleNorm
from synthetic import write_learnable_dataset


REPO = Path(__file__).resolve().parent.parent
TRAIN = str(Path(__file__).resolve().parent / "per_sample_norm_train.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"
COMMON = ["--width", "4", "--device", "cpu", "--epochs", "2", "--lr", "0.05", "--no-plots", "--no-tta", "--no-amp"]
# fp32, one thread per process, lr 0.05 and 10 steps, all pinned here: the two runs differ only in the order
# in which the 32 per-sample gradients are summed (two means of 16, all-reduced and halved, vs one mean of
# 32), a few ulps per step, which leaves the weights ~1e-7 apart on AVX2 and AVX-512 CPUs alike (with two
# threads too). 1e-4 leaves three orders of magnitude for other rounding; a shard that ignores its rank or
# a run without DDP moves some weight by more than 1e-3.
TOLERANCE = 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    data = write_learnable_dataset(tmp_path / "data", train_per_class=16, test_per_class=5)
    env = {**os.environ, "FASTCIFAR_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    ddp = run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", TRAIN, "--data-dir", str(data), *COMMON,
               "--batch-size", "16", "--out-dir", str(tmp_path / "ddp")])
    run([sys.executable, TRAIN, "--data-dir", str(data), *COMMON, "--batch-size", "32", "--out-dir",
         str(tmp_path / "one")])

    # one run directory, written once, one voice on stdout
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        ["config.json", "metrics.csv", "summary.json", "model.safetensors", "checkpoint.pt"])
    assert ddp.stdout.count("seed 0: test acc") == 1
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2

    ddp_w = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    one_w = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert ddp_w.keys() == one_w.keys()
    diffs = {k: float((ddp_w[k] - one_w[k]).abs().max()) for k in one_w}
    assert max(diffs.values()) < TOLERANCE, max(diffs.items(), key=lambda kv: kv[1])
    ddp_run = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["run"]
    assert len(ddp_run["lrs"]) == 10 and ddp_run["images"] == 10 * 32  # 160 images / global batch 32, x 2

    # sharded, reduced evaluation == evaluating the saved model on the whole test split in one process
    monkeypatch.setattr(torch.nn, "BatchNorm2d", PerSampleNorm)
    model, info = load_model(tmp_path / "ddp")
    cifar = load_cifar10(data, cache_dir=tmp_path / "home")
    loader = DeviceLoader(cifar.test_images, cifar.test_labels, mean=info.mean, std=info.std, batch_size=64,
                       train=False)
    assert evaluate(model, loader, torch.device("cpu"), None)["acc"] == pytest.approx(summary["test_acc"])


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def local_rank(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"LOCAL_RANK=")]
    return int(values[0]) if values else None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists() or
                    (shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists()),
                    reason="needs torchrun and Linux /proc")
def test_sigterm_to_one_rank_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    data = write_learnable_dataset(tmp_path / "data", train_per_class=16, test_per_class=2)
    env = {**os.environ, "FASTCIFAR_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                             "-m", "fastcifar.train", "--data-dir", str(data), *COMMON, "--epochs", "200",
                             "--batch-size", "16", "--out-dir", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)  # an epoch has finished: both ranks are in the loop
        ranks = {local_rank(pid): pid for pid in child_pids(proc.pid)}
        os.kill(ranks[1], signal.SIGTERM)
        _, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    stops = re.findall(r"stopped by signal (\d+) after step (\d+)", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-2000:]  # both ranks, the same step
    assert stops[0][0] == str(int(signal.SIGTERM))
    steps_per_epoch = 160 // (2 * 16)
    # the checkpoint of the last epoch finished before the stopped step
    assert load_checkpoint(out / "checkpoint.pt")["run"]["epoch"] == (int(stops[0][1]) - 1) // steps_per_epoch


def test_the_batch_size_check_counts_the_images_of_one_process():
    """Sabotage: check_batch_size comparing with all training images instead of one rank's share (under torchrun
    a rank would then get no full batch and train zero steps)."""
    from fastcifar.recipe import check_batch_size

    check_batch_size(TrainConfig(batch_size=50), 100, Dist(world_size=2))
    with pytest.raises(UserError, match="--batch-size"):
        check_batch_size(TrainConfig(batch_size=51), 100, Dist(world_size=2))


def test_the_process_group_is_destroyed_on_the_way_out_of_a_failed_run(monkeypatch):
    """torchrun's variables give this rank and world size; the group goes even when the run raises. Sabotage:
    process_group without its finally (a process that trains again, as tune and compare do, would find the old
    default group: init_process_group refuses a second one)."""
    from fastcifar import distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="boom"):
        with distributed.process_group(torch.device("cpu")) as (d, device):
            assert (d.rank, d.world_size, d.enabled, device) == (1, 2, True, torch.device("cpu"))
            raise UserError("boom")
    assert calls == [("init", "gloo"), ("destroy",)]


def reduce_on_rank(rank: int, init_file: str) -> None:
    """One of two gloo ranks: rank r contributes r + 1 (1 and 2)."""
    import torch.distributed

    from fastcifar.distributed import all_reduce

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        d = Dist(rank=rank, world_size=2)
        assert all_reduce(torch.tensor([rank + 1.0]), d).item() == 3.0
        assert all_reduce(torch.tensor([rank + 1.0]), d, "max").item() == 2.0
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes
def test_all_reduce_sums_or_takes_the_max_over_the_ranks_and_is_a_no_op_alone(tmp_path):
    """Sabotage: all_reduce ignoring its `op` (the epoch's first non-finite step would be summed over the ranks)."""
    from fastcifar.distributed import all_reduce

    assert all_reduce(torch.tensor([5.0]), Dist(), "max").item() == 5.0  # no process group needed
    torch.multiprocessing.spawn(reduce_on_rank, args=(str(tmp_path / "store"),), nprocs=2)


@pytest.mark.parametrize("preset", ["speedrun", "airbench94"])
def test_the_presets_grad_stop_is_refused_under_torchrun_before_any_data_is_read(preset, tmp_path, monkeypatch):
    """DDP cannot drop a parameter mid-run: the presets' --whiten-bias-stop grad is one line naming the flag to
    use, before the data set is loaded (a refused run costs nothing); --whiten-bias-stop lr passes that check."""
    import fastcifar.data
    from fastcifar.config import PRESETS
    from fastcifar.train import setup

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the torchrun check")

    monkeypatch.setattr(fastcifar.data, "load_cifar10", no_data)
    config = TrainConfig(**PRESETS[preset], out_dir=str(tmp_path / "run"), device="cpu")
    with pytest.raises(UserError, match="--whiten-bias-stop grad under torchrun.*--whiten-bias-stop lr"):
        setup(config, resume=False, dist=Dist(world_size=2), device=torch.device("cpu"))
    config.whiten_bias_stop = "lr"
    with pytest.raises(AssertionError, match="data loaded before"):
        setup(config, resume=False, dist=Dist(world_size=2), device=torch.device("cpu"))
