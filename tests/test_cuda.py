"""What only a CUDA GPU exercises, through the command line (`fastcifar.train.main`) on a tiny data set:
torch.compile (default, and reduce-overhead = CUDA graphs) with evaluation and TTA, fp16 + GradScaler, the
fused optimizers, channels_last on and off, and the one-line out-of-memory error.

    pytest -m cuda -q tests/test_cuda.py       # bench/gpu.sh runs this first on the GPU machine (<= 60 s)

Without CUDA every test here is skipped with that reason; the CPU suite covers the rest. The fast tests
come first, the compiling ones last, so a cut-off run loses the slowest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from synthetic import write_learnable_dataset

from fastcifar.errors import run_cli

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (torch.cuda.is_available() is False here); "
                                        "bench/gpu.sh runs these on the GPU machine")]

TINY_CUDA = ["--device", "cuda", "--width", "8", "--epochs", "1", "--batch-size", "32", "--no-plots",
             "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("cuda_data"), train_per_class=16, test_per_class=4)


def train(tmp_path: Path, data: Path, *flags: str) -> dict:
    """Train through the command line; its summary.json."""
    from fastcifar import train as train_module

    out = tmp_path / "run"
    assert run_cli(train_module.main, ["--data-dir", str(data), "--out-dir", str(out), *TINY_CUDA, *flags]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # Five steps learn too little to assert on (on the CPU even twenty leave some seeds at 0.3 on these 40
    # images, chance 0.1): these runs pin the GPU wiring; test_train.py asserts what training learns.
    assert 0.0 <= summary["test_acc"] <= 1.0 and math.isfinite(summary["train_seconds"])
    return summary


@pytest.mark.slow
def test_fp16_trains_with_a_grad_scaler_where_bf16_is_unsupported(tmp_path, tiny_data, monkeypatch):
    steps = []

    class CountingScaler(torch.amp.GradScaler):
        def step(self, optimizer, *args, **kwargs):
            steps.append(self.get_scale())
            return super().step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # an older GPU, as far as we know
    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    train(tmp_path, tiny_data, "--no-compile")
    assert steps and all(math.isfinite(s) and s > 0 for s in steps)  # every step went through the scaler


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, lr", [("sgd", "0.4"), ("adam", "0.001")])
def test_the_fused_optimizers_train(tmp_path, tiny_data, monkeypatch, optimizer, lr):
    made = []
    base = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]

    class Recording(base):
        def __init__(self, params, **kwargs):
            made.append(kwargs.get("fused"))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, base.__name__, Recording)
    train(tmp_path, tiny_data, "--no-compile", "--optimizer", optimizer, "--lr", lr)
    assert made == [True]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["--channels-last", "--no-channels-last"])
def test_both_memory_layouts_train_and_evaluate(tmp_path, tiny_data, layout):
    summary = train(tmp_path, tiny_data, "--no-compile", layout)
    assert summary["test_acc_tta"] is not None


def test_out_of_memory_is_one_line_naming_the_flags_to_lower(tmp_path, tiny_data, monkeypatch, capsys):
    from fastcifar import train as train_module

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", out_of_memory)  # the first training step's loss
    code = run_cli(train_module.main, ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "run"), *TINY_CUDA,
                                       "--no-compile"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "out of memory on cuda" in err[0] and "--batch-size" in err[0] and "--width" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])  # reduce-overhead: CUDA graphs
def test_compiled_training_evaluates_with_tta(tmp_path, tiny_data, mode):
    summary = train(tmp_path, tiny_data, "--compile", "--compile-mode", mode, "--tta-translate", "1")
    assert summary["compile_seconds"] > 0 and summary["test_acc_tta"] is not None
    assert summary["tta"]["flip"] and summary["tta"]["translate"] == 1
    assert summary["compile_seconds"] > 0 and summary["runs"]["per_seed"][0]["run_seconds"] > 0
