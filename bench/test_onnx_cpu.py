"""CPU inference speed of the full-width (64) ResNet-9: eager PyTorch, the best PyTorch CPU path, onnxruntime
and OpenVINO on the exported fp32 and int8 files, at batch 1 (latency) and batch 256 (throughput), with the
achieved multiply-accumulates per second next to the CPU's peak for its instruction set.

    python -m pytest bench/test_onnx_cpu.py --benchmark-json=/tmp/onnx_bench.json   # ~2 min on 2 idle cores
    python bench/test_onnx_cpu.py /tmp/onnx_bench.json                              # table, ratios, % of peak

Backends (all with the same thread count, one per core, in each result's extra_info):
  torch-fp32     eager, NCHW, fp32: the baseline
  torch-best     BN folded into the convs, channels_last, bf16 autocast where the CPU has native bf16
                 (AVX512_BF16 or AMX), fp32 elsewhere
  torch-compile  torch-best under torch.compile (compiled outside the timed region; FASTCIFAR_BENCH_COMPILE=0
                 skips it)
  ort-fp32/int8  onnxruntime CPU on the exported files (export.backends, latency or throughput mode)
  ov-fp32/int8   OpenVINO CPU on the same files (skipped when not installed); ov-fp32 runs bf16 where the CPU
                 has it, ov-fp32-f32 forces f32 there to show what bf16 buys (only on such CPUs)
  ...-tta        the same runtime on the file exported with `--tta flip-translate1` (the speedrun recipe's TTA:
                 6 views in one batch), next to the plain file in the second table
Batch 1 runs latency mode only; batch 256 both modes. Weights are random (speed does not depend on them);
int8 is calibrated on random images. Inputs are prepared outside the timed call. Run it on an idle machine:
with another busy process on the two cores, onnxruntime's spin-waiting threads lose up to half their speed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fastcifar.runtime import cpu_native_bf16

ROUNDS = {1: 50, 256: 5}  # eager fp32 takes ~1.3 s per batch of 256 on 2 cores
# (backend, mode, batch); torch has no modes: "latency" stands for its one way of running
CASES = [(b, "latency", 1) for b in ("torch-fp32", "torch-best", "torch-compile", "ort-fp32", "ort-int8",
                                     "ov-fp32", "ov-fp32-f32", "ov-int8")]
CASES += [(b, "latency", 256) for b in ("torch-fp32", "torch-best", "torch-compile")]
CASES += [(b, m, 256) for b in ("ort-fp32", "ort-int8", "ov-fp32", "ov-fp32-f32", "ov-int8")
          for m in ("latency", "throughput")]
# the TTA files: batch-1 latency and batch-256 throughput, to set beside the plain files
CASES += [(f"{b}-tta", m, n) for b in ("ort-fp32", "ort-int8", "ov-fp32", "ov-int8")
          for m, n in (("latency", 1), ("throughput", 256))]
ORDER = [c[0] for c in CASES[:8]] + [f"{b}-tta" for b in ("ort-fp32", "ort-int8", "ov-fp32", "ov-int8")]
TTA = (True, 1)  # flip + translate 1, the speedrun preset's: 6 views, so 6 model images per input image

# Multiply-accumulates per cycle per core, for a core with two 512-bit FMA units (Xeon Scalable), from
# Intel's figures for Sapphire Rapids in operations per cycle (1 MAC = 2 operations): AVX-512 FP32 FMA 64,
# AVX512_BF16 128, AVX-512 VNNI int8 256, AMX BF16 1024, AMX int8 2048. Client cores and AMD Zen 4
# (double-pumped 256-bit units) have half the AVX-512 rates; the table then overstates the peak.
MACS_PER_CYCLE = {"fp32 AVX-512 FMA": 32, "bf16 AVX512_BF16": 64, "int8 AVX-512 VNNI": 128,
                  "bf16 AMX": 512, "int8 AMX": 1024}


def cpu_info() -> dict:
    """Model name, usable cores, flags and the clock from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": "unknown", "cores": os.cpu_count() or 1, "flags": set(), "ghz": None}
    first = text.split("\n\n")[0]
    field = lambda name: (re.search(rf"^{name}\s*:\s*(.*)$", first, re.M) or [None, ""])[1]  # noqa: E731
    named = re.search(r"@\s*([\d.]+)\s*GHz", field("model name"))
    ghz = float(named[1]) if named else (float(field("cpu MHz")) / 1000 if field("cpu MHz") else None)
    return {"model": f"{field('model name')} (family {field('cpu family')}, model {field('model')})",
            "cores": len(os.sched_getaffinity(0)), "flags": set(field("flags").split()), "ghz": ghz}


def cpu_peak(info: dict | None = None) -> dict[str, float]:
    """Peak multiply-accumulates per second of this CPU's usable cores for each instruction set it has, at
    the clock /proc/cpuinfo states (a VM's nominal TSC rate: all-core AVX-512 clocks may be lower, turbo
    higher, so take the figures as +-30%)."""
    info = info or cpu_info()
    flags, ghz = info["flags"], info["ghz"]
    if not ghz:
        return {}
    have = {"fp32 AVX-512 FMA": "avx512f" in flags, "bf16 AVX512_BF16": "avx512_bf16" in flags,
            "int8 AVX-512 VNNI": "avx512_vnni" in flags, "bf16 AMX": "amx_bf16" in flags,
            "int8 AMX": "amx_int8" in flags}
    return {isa: MACS_PER_CYCLE[isa] * info["cores"] * ghz * 1e9 for isa, ok in have.items() if ok}


def threads() -> int:
    import torch

    return torch.get_num_threads()  # torch defaults to the physical core count


@pytest.fixture(scope="module")
def model():
    import torch

    from fastcifar.model import ModelConfig, ResNet9

    torch.manual_seed(0)
    return ResNet9(ModelConfig(width=64)).eval()


def model_macs(model) -> int:
    """Multiply-accumulates of one 32x32 image through convolutions and the linear layer."""
    import torch
    from torch import nn

    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output[0].numel() * k
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return total


@pytest.fixture(scope="module")
def onnx_files(model, tmp_path_factory) -> dict[str, Path]:
    """fp32 and int8 exports, plain and with TTA, made once for the module."""
    from export.onnx import WithTTA, export_onnx, quantize_int8
    from fastcifar.checkpoint import ModelInfo
    from fastcifar.data import CLASSES

    tmp = tmp_path_factory.mktemp("onnx_bench")
    info = ModelInfo(model.config, list(CLASSES), [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])
    calib = np.random.default_rng(1).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    files = {}
    for suffix, graph in (("", model), ("-tta", WithTTA(model, *TTA))):
        fp32, int8 = tmp / f"model{suffix}.onnx", tmp / f"model{suffix}.int8.onnx"
        export_onnx(graph, info, fp32)
        quantize_int8(fp32, int8, calib)
        files.update({f"fp32{suffix}": fp32, f"int8{suffix}": int8})
    return files


def torch_runner(backend: str, model, x: np.ndarray) -> tuple[Callable[[], object], str]:
    import torch

    from export.onnx import fold_batchnorm

    tensor = torch.from_numpy(x)
    if backend == "torch-fp32":
        def run_fp32():
            with torch.inference_mode():
                return model(tensor)
        return run_fp32, "f32"
    net = fold_batchnorm(model).to(memory_format=torch.channels_last)
    tensor = tensor.contiguous(memory_format=torch.channels_last)
    bf16 = cpu_native_bf16()
    if backend == "torch-compile":
        if os.environ.get("FASTCIFAR_BENCH_COMPILE") == "0":
            pytest.skip("FASTCIFAR_BENCH_COMPILE=0")
        net = torch.compile(net)

    def run_best():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(tensor)
    run_best()  # compiles, outside the timed region
    return run_best, "bf16" if bf16 else "f32"


def make_runner(backend: str, mode: str, batch: int, model, onnx_files: dict[str, Path]
                ) -> tuple[Callable[[], object], str]:
    """(a no-argument callable running one batch of `backend` on a fixed input, the precision it computes in)."""
    x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
    if backend.startswith("torch-"):
        return torch_runner(backend, model, x)
    from export.backends import make_runner as runtime_runner, openvino_version

    runtime, file, *rest = backend.split("-")
    forced, file = "f32" in rest, file + ("-tta" if "tta" in rest else "")
    if runtime == "ov" and openvino_version() is None:
        pytest.skip("OpenVINO is not installed (pip install 'fastcifar[openvino]')")
    if forced and not cpu_native_bf16():
        pytest.skip("no bf16 on this CPU: ov-fp32 already runs in f32")
    runner = runtime_runner(onnx_files[file], "openvino" if runtime == "ov" else "onnxruntime", mode,
                            threads=threads(), precision="f32" if forced else "auto")
    precision = runner.precision if file.startswith("fp32") else f"int8 + {runner.precision}"
    return (lambda: runner.infer(x)), precision


@pytest.mark.benchmark(group="onnx-cpu")
@pytest.mark.parametrize("backend, mode, batch", CASES, ids=[f"{b}-{m}-{n}" for b, m, n in CASES])
def test_inference(benchmark, model, onnx_files, backend, mode, batch):
    run, precision = make_runner(backend, mode, batch, model, onnx_files)
    benchmark.pedantic(run, rounds=ROUNDS[batch], warmup_rounds=2, iterations=1)
    info = cpu_info()
    benchmark.extra_info.update(backend=backend, mode=mode, batch=batch, precision=precision, threads=threads(),
                                images_per_s=round(batch / benchmark.stats.stats.mean, 1),
                                macs_per_image=model_macs(model) * (6 if backend.endswith("-tta") else 1),
                                cpu=info["model"], cpu_ghz=info["ghz"],
                                peak_macs_per_s=cpu_peak(info))


def summarize(path: str) -> str:
    """A table of a --benchmark-json file: speed (of the means) over torch-fp32 at each batch size, and the
    achieved MAC/s as a share of the peak of the instruction set the backend's precision runs on."""
    with open(path) as f:
        benchmarks = json.load(f)["benchmarks"]
    runs = {(b["extra_info"]["backend"], b["extra_info"]["mode"], b["extra_info"]["batch"]): b for b in benchmarks}
    first = next(iter(runs.values()))["extra_info"]
    peaks = first["peak_macs_per_s"]
    lines = [f"{'backend':<14} {'mode':<10} {'batch':>5} {'precision':<12} {'mean ms':>9} {'images/s':>9} "
             f"{'vs torch-fp32':>13} {'GMAC/s':>8} {'% of peak':>16}"]
    for (backend, mode, batch), b in sorted(runs.items(), key=lambda kv: (kv[0][2], ORDER.index(kv[0][0]), kv[0][1])):
        extra = b["extra_info"]
        base = runs.get(("torch-fp32", "latency", batch))
        ratio = f"{base['stats']['mean'] / b['stats']['mean']:.2f}x" if base else "-"
        achieved = extra["images_per_s"] * extra["macs_per_image"]
        isa = _peak_isa(extra["precision"], peaks)
        share = f"{100 * achieved / peaks[isa]:.0f}% {isa.split()[-1]}" if isa else "-"
        lines.append(f"{backend:<14} {mode:<10} {batch:>5} {extra['precision']:<12} {1000 * b['stats']['mean']:>9.2f} "
                     f"{extra['images_per_s']:>9.0f} {ratio:>13} {achieved / 1e9:>8.0f} {share:>16}")
    lines.append(f"CPU: {first['cpu']}, {first['threads']} threads, clock {first['cpu_ghz']} GHz (/proc/cpuinfo); "
                 f"model {first['macs_per_image'] / 1e6:.0f} M MACs per image")
    lines.append("peak GMAC/s: " + ", ".join(f"{isa} {v / 1e9:.0f}" for isa, v in peaks.items()))
    return "\n".join(lines + ["", tta_table(runs)])


def tta_table(runs: dict) -> str:
    """Plain file beside TTA file per runtime: batch-1 latency (ms) and batch-256 throughput (images/s)."""
    lines = [f"{'file':<10} {'plain ms (1)':>12} {'TTA ms (1)':>11} {'plain img/s (256)':>18} "
             f"{'TTA img/s (256)':>16} {'TTA cost':>9}"]
    for plain in ("ort-fp32", "ort-int8", "ov-fp32", "ov-int8"):
        cells = [runs.get((name, mode, batch)) for name in (plain, f"{plain}-tta")
                 for mode, batch in (("latency", 1), ("throughput", 256))]
        if None in cells:
            continue
        ms = [1000 * c["stats"]["mean"] for c in cells[::2]]
        ips = [c["extra_info"]["images_per_s"] for c in cells[1::2]]
        lines.append(f"{plain:<10} {ms[0]:>12.2f} {ms[1]:>11.2f} {ips[0]:>18.0f} {ips[1]:>16.0f} "
                     f"{ips[0] / ips[1]:>8.1f}x")
    return "\n".join(lines)


def _peak_isa(precision: str, peaks: dict[str, float]) -> str | None:
    """The fastest instruction set this CPU has for the precision a backend computes its convolutions in."""
    kind = "int8" if precision.startswith("int8") else precision.replace("f32", "fp32")
    candidates = [isa for isa in peaks if isa.startswith(kind)]
    return max(candidates, key=peaks.get, default=None)


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "/tmp/onnx_bench.json"))
