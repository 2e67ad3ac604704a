"""What the tests of bench/speedrun.py and bench/airbench_runner.py share: bench/speedrun.py loaded as a module,
airbench's printed table, a fake airbench for the CPU, tiny CifarData sets and a small real airbench94."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent

# What airbench 0.1.8's train94(verbose=True) printed for one (CPU-patched) run.
AIRBENCH_LOG = """\
------------------------------------------------------------------------------------------------------
|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |
------------------------------------------------------------------------------------------------------
|       0  |      0  |      2.3047  |     0.0977  |   0.1980  |               |              1.3253  |
|          |      1  |      2.3047  |     0.1367  |   0.1740  |               |              2.4674  |
|          |   eval  |      2.3047  |     0.1367  |   0.9412  |       0.9440  |              3.4662  |
------------------------------------------------------------------------------------------------------
"""


def _load_speedrun():
    spec = importlib.util.spec_from_file_location("speedrun", REPO / "bench" / "speedrun.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speedrun = _load_speedrun()


def synthetic_data():
    from fastcifar.data import CLASSES, CifarData

    rng = np.random.default_rng(0)
    return CifarData(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), np.arange(40) % 10,
                     rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), np.arange(20) % 10,
                     list(CLASSES), (0.5,) * 3, (0.25,) * 3, "synthetic")


class FakeAirbench:
    """Stands in for airbench 0.1.8 on a CPU: reads ./cifar10/*.pt like CifarLoader, prints its table."""

    def __init__(self):
        self.calls: list[str] = []

    class CifarLoader:
        def __init__(self, path, train=True, batch_size=500, **kwargs):
            data = torch.load(os.path.join(path, "train.pt" if train else "test.pt"))
            assert data["images"].dtype == torch.uint8 and data["images"].shape[1:] == (32, 32, 3)
            assert data["labels"].dtype == torch.int64 and len(data["labels"]) == len(data["images"])
            assert len(data["classes"]) == 10
            self.images, self.labels = data["images"], data["labels"]

    class lib_airbench94:  # noqa: N801 (airbench's module name)
        hyp = {"opt": {"batch_size": 10, "train_epochs": 2}}

    @staticmethod
    def make_net94():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, bias=False), torch.nn.Flatten(),
                                   torch.nn.Linear(2 * 30 * 30, 10, bias=False))

    def warmup94(self):
        self.CifarLoader("cifar10")
        self.calls.append("warmup")

    def train94(self, run=0, verbose=True):
        self.CifarLoader("cifar10")
        self.calls.append(f"train{run}")
        print(AIRBENCH_LOG.replace("3.4662", f"{3.0 + run:.4f}"))
        return object()

    def evaluate(self, model, loader, tta_level=0):
        return (0.93, 0.94, 0.945)[tta_level]


def learnable_data(per_class: int = 100):
    """CifarData whose class is its colour (tests/synthetic.py): learnt to well above chance in a few steps."""
    from fastcifar.data import CLASSES, CifarData
    from synthetic import learnable_images

    train, test = learnable_images(per_class, seed=0), learnable_images(20, seed=1)
    return CifarData(*train, *test, list(CLASSES), (0.5,) * 3, (0.25,) * 3, "learnable")


def small_airbench(monkeypatch):
    """airbench94 at widths 16, batch 50: 20 steps an epoch on `learnable_data`, seconds on a CPU."""
    import airbench.lib_airbench94 as lib94

    for block in ("block1", "block2", "block3"):
        monkeypatch.setitem(lib94.hyp["net"]["widths"], block, 16)
    monkeypatch.setitem(lib94.hyp["opt"], "batch_size", 50)
