"""torchrun: two CPU processes with gloo train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastcifar.augment import DeviceLoader
from fastcifar.checkpoint import load_model
from fastcifar.data import load_cifar10
from fastcifar.evaluate import evaluate
from synthetic import write_learnable_dataset

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--width", "8", "--device", "cpu", "--epochs", "2", "--lr", "0.1", "--no-plots", "--no-tta",
          "--label-smoothing", "0", "--no-amp"]


def relative_distance(a: dict, b: dict) -> float:
    keys = [k for k in a if k.endswith("weight") and a[k].ndim > 1]  # conv and linear weights
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in keys)
    den = sum(float(a[k].pow(2).sum()) for k in keys)
    return (num / den) ** 0.5


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    data = write_learnable_dataset(tmp_path / "data", train_per_class=16, test_per_class=5)
    env = {**os.environ, "FASTCIFAR_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    ddp = run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "fastcifar.train", "--data-dir", str(data),
               *COMMON, "--batch-size", "16", "--out-dir", str(tmp_path / "ddp")])
    run([sys.executable, "-m", "fastcifar.train", "--data-dir", str(data), *COMMON, "--batch-size", "32",
         "--out-dir", str(tmp_path / "one")])
    run([sys.executable, "-m", "fastcifar.train", "--data-dir", str(data), *COMMON, "--batch-size", "32",
         "--seed", "1", "--out-dir", str(tmp_path / "other-seed")])

    # one run directory, written once, one voice on stdout
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        ["config.json", "metrics.csv", "summary.json", "model.safetensors", "checkpoint.pt"])
    assert ddp.stdout.count("seed 0: test acc") == 1
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2

    # Same permutation, same augmentations, gradients averaged over the same 32 images per step. What
    # differs is BatchNorm: each rank normalizes over its 16 images (--sync-bn needs CUDA). Stated
    # tolerance: weights within 35% relative L2 of the single-process run, and at least 3x closer to it than
    # a run from another seed.
    ddp_w, one_w = load_file(str(tmp_path / "ddp" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    other_w = load_file(str(tmp_path / "other-seed" / "model.safetensors"))
    close, far = relative_distance(ddp_w, one_w), relative_distance(other_w, one_w)
    assert close < 0.35 and 3 * close < far, (close, far)

    # sharded, reduced evaluation == evaluating the saved model on the whole test split in one process
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


@pytest.mark.skipif(not Path("/proc/self/task").exists() or
                    (shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists()),
                    reason="needs torchrun and Linux /proc")
def test_sigterm_to_one_rank_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    import re
    import signal
    import time

    from fastcifar.checkpoint import load_checkpoint

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
    stops = re.findall(r"stopped by signal (\d+) at step (\d+) of epoch (\d+)", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-2000:]  # both ranks, the same step
    assert stops[0][0] == str(int(signal.SIGTERM))
    run = load_checkpoint(out / "checkpoint.pt")["run"]
    assert (run["epoch"], run["step_in_epoch"]) == (int(stops[0][2]) - 1, int(stops[0][1]))
