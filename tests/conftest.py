"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

# The tests train tiny models: one thread is as fast as two and immune to the ~6x slowdown that OpenMP
# spin-waiting suffers when other processes share the two cores. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def real_cifar_path() -> Path:
    """The real CIFAR-10 archive: $FASTCIFAR_DATA, else ../shared/data/cifar10-png.tar.gz next to the repo."""
    return Path(os.environ.get("FASTCIFAR_DATA") or REPO_ROOT.parent / "shared/data/cifar10-png.tar.gz")


@pytest.fixture(scope="session")
def train_seed() -> int:
    """The --seed of the models the tests train and then assert on (add an offset where one test trains
    several): FASTCIFAR_TEST_SEED, default 0. Another CPU's rounding (or thread count) trains another model, as
    another seed does, so `FASTCIFAR_TEST_SEED=N pytest` for a few N checks that no assertion on a trained model
    holds by the luck of one CPU (tests/README.md)."""
    value = os.environ.get("FASTCIFAR_TEST_SEED", "0")
    if not value.isdigit():
        raise pytest.UsageError(f"FASTCIFAR_TEST_SEED must be a non-negative integer, got {value!r}")
    return int(value)


@pytest.fixture(autouse=True, scope="session")
def cpu_bf16_from_environment(tmp_path_factory):
    """FASTCIFAR_TEST_CPU_BF16=1: this CPU reports AVX-512 BF16, so `--amp-dtype auto` trains and evaluates in
    bf16 (emulated where the CPU lacks it: slower) as on Zen 4 or a Xeon with AMX: the same bf16 inputs and
    outputs, not the native chips' exact sums. In this pytest process only: subprocess tests run as the CPU is.
    Tests that set the CPU flags themselves still do."""
    if os.environ.get("FASTCIFAR_TEST_CPU_BF16") != "1":
        yield
        return
    from fastcifar import runtime

    cpuinfo = tmp_path_factory.mktemp("cpuinfo") / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime, "CPUINFO", str(cpuinfo))
        yield


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's real cache (~/.cache/fastcifar)."""
    monkeypatch.setenv("FASTCIFAR_HOME", str(tmp_path / "home"))


@pytest.fixture
def one_line_error(capsys):
    """Call it after a command failed: asserts stderr holds exactly one line and returns that line."""
    def read() -> str:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]
    return read


@pytest.fixture(scope="session")
def napping():
    """napping(fn, seconds_of) is fn that first sleeps seconds_of(*args, **kwargs): a known delay for a clock to see."""
    import time

    def napping(fn, seconds_of):
        def wrapped(*args, **kwargs):
            time.sleep(seconds_of(*args, **kwargs))
            return fn(*args, **kwargs)
        return wrapped
    return napping


@pytest.fixture(scope="session")
def smoothed_cross_entropy():
    """An independent reference for the training loss (numpy, float64): call it with (logits, labels, smoothing)."""
    import numpy as np

    def smoothed_cross_entropy(logits: np.ndarray, labels: np.ndarray, smoothing: float) -> float:
        """Label-smoothed cross-entropy written out in float64: the target puts 1 - s + s/K on the label and s/K on
        every other class, and the loss is the mean over the batch of -sum(target * log_softmax)."""
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        classes = logits.shape[1]
        target = np.full(logits.shape, smoothing / classes)
        target[np.arange(len(labels)), labels] += 1 - smoothing
        return float(-(target * log_probs).sum(axis=1).mean())

    return smoothed_cross_entropy


@pytest.fixture(scope="session")
def real_cifar(tmp_path_factory):
    """The real CIFAR-10 as `CifarData`, decoded once per session into a private cache; skips if absent."""
    from fastcifar.data import load_cifar10

    path = real_cifar_path()
    if not path.exists():
        pytest.skip(f"real CIFAR-10 not found at {path} (set FASTCIFAR_DATA)")
    return load_cifar10(path, download=False, cache_dir=tmp_path_factory.mktemp("real_cifar_cache"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory, train_seed):
    """The export tests' data, trained model and export (export_helpers.shared_export: made once per session)."""
    from export_helpers import shared_export

    return shared_export(tmp_path_factory, train_seed)


@pytest.fixture(scope="module")
def tiny_data(shared) -> Path:
    return shared.data


@pytest.fixture(scope="module")
def test_split(shared, tmp_path_factory):
    """The export tests' data as `CifarData` (the splits tiny_data holds), decoded into a private cache."""
    from fastcifar.data import load_cifar10

    return load_cifar10(shared.data, download=False, cache_dir=tmp_path_factory.mktemp("export-data-cache"))


@pytest.fixture(scope="module")
def checkpoint(shared) -> Path:
    return shared.checkpoint


@pytest.fixture(scope="module")
def export_output(shared) -> tuple[Path, str]:
    """model.onnx (fp32; model.int8.onnx next to it, calibrated on 16 images) and what the export printed."""
    return shared.onnx, shared.stdout


@pytest.fixture(scope="module")
def exported(export_output) -> Path:
    return export_output[0]


# tests import their helpers (tests/synthetic.py) as top-level modules
import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
