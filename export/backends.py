"""Runtimes for an exported model: onnxruntime (always) and OpenVINO (`pip install fastcifar[openvino]`).

    python -m export.predict model.int8.onnx photos/ --backend openvino --mode throughput

torch-free, like `export.predict`. Latency mode runs a batch in one call on `threads` threads; throughput mode
splits it into slices run in parallel: onnxruntime from `threads` Python threads with one intra-op thread each
(it releases the GIL), OpenVINO through the plugin's optimal number of infer requests.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastcifar.errors import UserError, first_line, require

BACKENDS = ("onnxruntime", "openvino")
MODES = ("latency", "throughput")
PRECISIONS = ("auto", "f32")  # auto: the runtime's choice (OpenVINO: bf16 where the CPU has it)
INSTALL_OPENVINO = "pip install 'fastcifar[openvino]'"


def openvino_version() -> str | None:
    """The installed OpenVINO's release ("2026.4.1"), None when it cannot be imported."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version().split("-")[0]


def require_openvino() -> str:
    if (version := openvino_version()) is None:
        raise UserError(f"--backend openvino: OpenVINO is not installed; {INSTALL_OPENVINO} or use "
                        "--backend onnxruntime")
    return version


def installed_backends() -> list[str]:
    return [b for b in BACKENDS if b == "onnxruntime" or openvino_version() is not None]


@dataclass
class Runner:
    """`infer(x)`: logits for float32 (N, 3, 32, 32) inputs in [0, 1], all N at once, as `mode` says."""

    backend: str
    mode: str
    threads: int
    precision: str  # the precision the runtime computes the float parts in ("f32", "bf16")
    version: str
    infer: Callable[[np.ndarray], np.ndarray]


def make_runner(path: str | os.PathLike, backend: str = "onnxruntime", mode: str = "latency",
                threads: int | None = None, precision: str = "auto") -> Runner:
    """A Runner for the model at `path`; UserError for an uninstalled backend, the runtime's own error for an
    unreadable file (`runner_for` turns it into a UserError)."""
    # one thread per core we may use is what both runtimes default to (no sched_getaffinity on macOS, Windows)
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if backend == "openvino":
        return _openvino_runner(path, mode, threads, precision)
    return _onnxruntime_runner(path, mode, threads)


def _onnxruntime_runner(path: str | os.PathLike, mode: str, threads: int) -> Runner:
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    options.intra_op_num_threads = 1 if mode == "throughput" else threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    if mode == "latency" or threads == 1:
        def infer(x: np.ndarray) -> np.ndarray:
            return session.run(None, {name: x})[0]
    else:
        pool = ThreadPoolExecutor(threads, thread_name_prefix="fastcifar-ort")

        def infer(x: np.ndarray) -> np.ndarray:
            parts = np.array_split(x, min(threads, len(x)))
            return np.concatenate(list(pool.map(lambda part: session.run(None, {name: part})[0], parts)))
    return Runner("onnxruntime", mode, threads, "f32", ort.__version__, infer)


@functools.lru_cache(maxsize=1)
def _openvino_core():
    """One Core per process, kept: its CPU plugin stays loaded for the life of the process."""
    import openvino as ov

    return ov.Core()


def _openvino_runner(path: str | os.PathLike, mode: str, threads: int, precision: str) -> Runner:
    version = require_openvino()
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    config: dict[Any, Any] = {hints.performance_mode: getattr(hints.PerformanceMode, mode.upper()),
                              props.inference_num_threads: threads}
    if precision == "f32":
        config[hints.inference_precision] = ov.Type.f32
    compiled = _openvino_core().compile_model(str(path), "CPU", config)
    used = compiled.get_property(hints.inference_precision).get_type_name()  # "f32", "bf16", "f16"
    if mode == "latency":
        def infer(x: np.ndarray) -> np.ndarray:
            return compiled({0: x})[0].copy()
    else:
        count = int(compiled.get_property(props.optimal_number_of_infer_requests))
        requests = [compiled.create_infer_request() for _ in range(count)]

        def infer(x: np.ndarray) -> np.ndarray:
            # plain requests, no Python callbacks: with an AsyncInferQueue callback (and a Core per runner), a
            # later SIGINT in the same process crashes it
            running = list(zip(requests, np.array_split(x, min(count, len(x)))))
            for request, part in running:
                request.start_async({0: part})
            for request, _ in running:
                request.wait()
            return np.concatenate([request.get_output_tensor(0).data.copy() for request, _ in running])
    return Runner("openvino", mode, threads, used, version, infer)


# --- the verification record -----------------------------------------------------------------------------

def record_path(model: str | os.PathLike) -> Path:
    """model.onnx -> model.onnx.verified.json, next to it."""
    return Path(f"{os.fspath(model)}.verified.json")


def file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()  # a model is tens of MiB at most


def read_record(model: str | os.PathLike) -> dict[str, Any] | None:
    """The export's verification record of `model`, None when absent, unreadable or for other bytes."""
    try:
        record = json.loads(record_path(model).read_text())
        return record if record.get("sha256") == file_digest(model) else None
    except (OSError, ValueError, AttributeError):
        return None


def choose_backend(model: str | os.PathLike) -> tuple[str, str]:
    """(backend, why) for `--backend auto`: OpenVINO when installed and verified for this file by the
    export with this OpenVINO version; onnxruntime otherwise."""
    if (version := openvino_version()) is None:
        return "onnxruntime", f"OpenVINO is not installed ({INSTALL_OPENVINO} for the faster runtime)"
    if (record := read_record(model)) is None:
        return "onnxruntime", (f"no verification record for this file ({record_path(model).name}): export it "
                               "with `python -m export.onnx --data-dir ...` to verify OpenVINO")
    result = record.get("backends", {}).get("openvino", {})
    if not result.get("verified"):
        return "onnxruntime", f"OpenVINO not verified by the export: {result.get('reason', 'not checked')}"
    if result.get("version") != version:
        return "onnxruntime", (f"OpenVINO was verified with version {result.get('version')}, this is {version}: "
                               "export again to verify it")
    return "openvino", f"verified by the export: test accuracy {100 * result['accuracy']:.2f}%"


def runner_for(model: str | os.PathLike, backend: str, mode: str, threads: int | None,
               precision: str = "auto") -> tuple[Runner, str]:
    """(runner, why) for a backend choice including `auto`; UserError for an unreadable model."""
    backend, why = choose_backend(model) if backend == "auto" else (backend, "asked for")
    try:
        return make_runner(model, backend, mode, threads, precision), why
    except UserError:
        raise
    except Exception as e:  # each runtime raises its own types for unreadable files
        raise UserError(f"invalid ONNX model ({model}) for {backend}: {first_line(e)}") from e
