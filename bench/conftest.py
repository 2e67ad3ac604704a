"""Shared fixtures of the pytest-benchmark suites in bench/ (groups: augment, train-step, onnx-cpu).

    pytest bench/ --benchmark-json=out.json                  # every group, full numbers in out.json
    pytest bench/test_augment_speed.py                       # one group (also: -k, --benchmark-group-by)
    pytest bench/ --benchmark-autosave                       # saves .benchmarks/<machine>/0001_<commit>_...json
    pytest bench/ --benchmark-autosave --benchmark-compare   # ... and compares with the latest saved run
    pytest bench/ --benchmark-compare=0001                   # compare with saved run 0001
    pytest-benchmark compare 0001 0002 --group-by=group      # two saved runs side by side (or pass JSON paths)

On a busy 2-core machine set OMP_NUM_THREADS=1: OpenMP threads spinning against other processes run several
times slower than one thread. Each result's extra_info records the thread count and the images per second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

_REPO = Path(__file__).resolve().parent.parent
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class BenchImages:
    images: np.ndarray  # uint8 (50000, 32, 32, 3), the training split
    labels: np.ndarray  # int64 (50000,)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str         # where the images came from, for extra_info


@pytest.fixture(scope="session")
def cifar_images() -> BenchImages:
    """The real CIFAR-10 training split ($FASTCIFAR_DATA, else ../shared/data/cifar10-png.tar.gz, through the
    decoded cache), else 50,000 random uint8 images of the same shape (speed does not depend on content)."""
    path = Path(os.environ.get("FASTCIFAR_DATA") or _REPO.parent / "shared/data/cifar10-png.tar.gz")
    if path.exists():
        from fastcifar.data import load_cifar10

        d = load_cifar10(path, download=False)
        return BenchImages(d.train_images, d.train_labels, d.mean, d.std, d.source)
    rng = np.random.default_rng(0)
    return BenchImages(rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 10, 50_000).astype(np.int64), CIFAR_MEAN, CIFAR_STD,
                       f"random uint8 (no CIFAR-10 at {path})")


_SUMMARY_LINES: list[str] = []


@pytest.fixture(scope="session")
def bench_summary() -> list[str]:
    """Lines a benchmark module adds for the end of the run (a table of its own numbers)."""
    return _SUMMARY_LINES


def pytest_terminal_summary(terminalreporter) -> None:
    for line in _SUMMARY_LINES:
        terminalreporter.write_line(line)
