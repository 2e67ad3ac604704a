"""CPU inference speed of the full-width (64) ResNet-9: PyTorch eager fp32 and bf16 autocast against
onnxruntime fp32 and int8, at batch 1 (latency) and batch 256 (throughput).

    python -m pytest bench/test_onnx_cpu.py --benchmark-json=/tmp/onnx_bench.json   # ~40 s on 2 idle cores
    python bench/test_onnx_cpu.py /tmp/onnx_bench.json                              # table and ratios

Weights are random (speed does not depend on them); int8 is calibrated on random images. Both runtimes
use the same thread count, torch's default (one per physical core), stated in each result's extra_info.
Inputs are prepared outside the timed call, so only inference is timed. Run it on an idle machine: with
another busy process on the two cores, onnxruntime's spin-waiting threads lose up to half their speed
(measured: int8 at batch 256 went from 244 to 470 ms) while eager PyTorch barely changes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

BATCHES = (1, 256)
BACKENDS = ("torch-fp32", "torch-bf16", "ort-fp32", "ort-int8")
ROUNDS = {1: 50, 256: 5}  # eager fp32 takes ~1.3 s per batch of 256 on 2 cores


@pytest.fixture(scope="module")
def model():
    import torch

    from fastcifar.model import resnet9

    torch.manual_seed(0)
    return resnet9(width=64).eval()


@pytest.fixture(scope="module")
def onnx_files(model, tmp_path_factory) -> dict[str, Path]:
    """fp32 and int8 exports, made once for the module."""
    from export.onnx import export_onnx, quantize_int8
    from fastcifar.checkpoint import ModelInfo
    from fastcifar.data import CLASSES

    tmp = tmp_path_factory.mktemp("onnx_bench")
    info = ModelInfo(model.config, list(CLASSES), [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])
    fp32, int8 = tmp / "model.onnx", tmp / "model.int8.onnx"
    export_onnx(model, info, fp32)
    calib = np.random.default_rng(1).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    quantize_int8(fp32, int8, calib)
    return {"ort-fp32": fp32, "ort-int8": int8}


def threads() -> int:
    import torch

    return torch.get_num_threads()  # torch defaults to the physical core count


def make_runner(backend: str, batch: int, model, onnx_files: dict[str, Path]) -> Callable[[], object]:
    """A no-argument callable running one batch of `backend` on a fixed input."""
    import torch

    x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
    if backend.startswith("ort-"):
        from export.predict import make_session

        session = make_session(onnx_files[backend], threads=threads())
        return lambda: session.run(None, {"input": x})
    tensor = torch.from_numpy(x)
    if backend == "torch-bf16":
        def run_bf16():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model(tensor)
        return run_bf16

    def run_fp32():
        with torch.inference_mode():
            return model(tensor)
    return run_fp32


@pytest.mark.benchmark(group="onnx-cpu")
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inference(benchmark, model, onnx_files, backend, batch):
    run = make_runner(backend, batch, model, onnx_files)
    benchmark.pedantic(run, rounds=ROUNDS[batch], warmup_rounds=2, iterations=1)
    benchmark.extra_info.update(backend=backend, batch=batch, torch_threads=threads(),
                                ort_intra_op_threads=threads(),
                                images_per_s=round(batch / benchmark.stats.stats.mean, 1))


def summarize(path: str) -> str:
    """A table of a --benchmark-json file, with speedups (of the means) over torch-fp32 at each batch size."""
    with open(path) as f:
        benchmarks = json.load(f)["benchmarks"]
    runs = {(b["extra_info"]["backend"], b["extra_info"]["batch"]): b for b in benchmarks}
    lines = [f"{'backend':<12} {'batch':>5} {'mean ms':>9} {'min ms':>9} {'images/s':>9} {'vs torch-fp32':>13}"]
    for (backend, batch), b in sorted(runs.items(), key=lambda kv: (kv[0][1], BACKENDS.index(kv[0][0]))):
        base = runs.get(("torch-fp32", batch))
        ratio = f"{base['stats']['mean'] / b['stats']['mean']:.2f}x" if base else "-"
        lines.append(f"{backend:<12} {batch:>5} {1000 * b['stats']['mean']:>9.2f} {1000 * b['stats']['min']:>9.2f} "
                     f"{b['extra_info']['images_per_s']:>9.0f} {ratio:>13}")
    first = next(iter(runs.values()))["extra_info"]
    lines.append(f"threads: torch {first['torch_threads']}, onnxruntime intra-op {first['ort_intra_op_threads']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "/tmp/onnx_bench.json"))
