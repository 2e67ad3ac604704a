"""export.backends: the OpenVINO backend is verified by the export, chosen by `--backend auto` only when
verified, and the onnxruntime-only path when OpenVINO is absent (simulated here by making its import fail, so
one environment covers both).

    python -m pytest tests/test_backends.py
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from export import backends
from export import onnx as export_onnx_cli
from export.backends import Runner, choose_backend, make_runner, openvino_version, record_path
from export.onnx import int8_path
from export.predict import main as predict_main
from export.predict import run_batches
from export_helpers import CLEAR_MARGIN, DECIDED_SHARE, TIE_MARGIN, assert_same_classes_where_decided, decided, \
    label_images, run_export
from fastcifar.errors import run_cli

HAS_OPENVINO = openvino_version() is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO is not installed "
                                    "(pip install 'fastcifar[openvino]'); its absence is tested below")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino")


@pytest.fixture
def no_openvino(monkeypatch) -> None:
    """`import openvino` raises ImportError, as when it is not installed."""
    for name in [m for m in sys.modules if m == "openvino" or m.startswith("openvino.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "openvino", None)


def predict(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(predict_main, list(argv), prog="export.predict")
    return code, out.getvalue(), err.getvalue()


def image_folder(root: Path, count: int = 12) -> Path:
    from PIL import Image

    root.mkdir(exist_ok=True)
    images = label_images()["predict's photos"]
    for i in range(count):
        Image.fromarray(images[i]).save(root / f"{i:02d}.png")
    return root


def fake_openvino(monkeypatch, scramble: bool) -> None:
    """OpenVINO "installed" and verified by the export through onnxruntime's logits, scrambled (rolled by one
    class) or not: tests the export's reporting without OpenVINO itself."""
    real = export_onnx_cli.make_runner

    def runner(path, backend="onnxruntime", mode="latency", threads=None, precision="auto"):
        ort = real(path, "onnxruntime", mode, threads)
        if backend == "onnxruntime":
            return ort
        infer = (lambda x: np.roll(ort.infer(x), 1, axis=1)) if scramble else ort.infer
        return Runner(backend, mode, ort.threads, "f32", "fake-1.0", infer)
    monkeypatch.setattr(export_onnx_cli, "make_runner", runner)
    monkeypatch.setattr(export_onnx_cli, "installed_backends", lambda: ["onnxruntime", "openvino"])


# --- with OpenVINO ---------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_openvino
def test_export_verifies_both_files_under_openvino(export_output, test_split):
    """OpenVINO runs each file in its default precision (bf16 on CPUs with AMX or AVX512_BF16), which may flip
    the near-ties of a model trained in this run, never a class onnxruntime decides by CLEAR_MARGIN: its
    accuracy and agreement may differ from onnxruntime's by the share of the other test images only (the
    parity images are the whole test split here)."""
    out, stdout = export_output
    for path in (out, int8_path(out)):
        record = json.loads(record_path(path).read_text())
        assert record["sha256"] == backends.file_digest(path) and record["test_images"] == 100
        ov, ort = record["backends"]["openvino"], record["backends"]["onnxruntime"]
        assert ov["verified"], ov["reason"]
        assert ov["version"] == openvino_version() and ov["precision"] in ("f32", "bf16")
        clear = decided(run_batches(make_runner(path, "onnxruntime"), test_split.test_images), CLEAR_MARGIN)
        assert clear.mean() >= DECIDED_SHARE
        assert abs(ov["accuracy"] - ort["accuracy"]) <= 1 - clear.mean() + 1e-9
        assert ov["agreement_with_onnxruntime"] >= clear.mean() - 1e-9
    assert f"openvino {openvino_version()} (" in stdout and "test accuracy" in stdout
    assert json.loads(record_path(int8_path(out)).read_text())["calibration"]["images"] == 16


@pytest.mark.slow
@needs_openvino
def test_auto_uses_openvino_only_with_a_valid_record(export_output, tmp_path):
    out, _ = export_output
    model = tmp_path / "model.int8.onnx"
    model.write_bytes(int8_path(out).read_bytes())
    assert choose_backend(model)[0] == "onnxruntime"  # no record
    record = json.loads(record_path(int8_path(out)).read_text())
    record_path(model).write_text(json.dumps(record))
    assert choose_backend(model)[0] == "openvino"
    record["backends"]["openvino"]["verified"] = False
    record_path(model).write_text(json.dumps(record))
    assert choose_backend(model)[0] == "onnxruntime"
    record["backends"]["openvino"].update(verified=True, version="2020.1")
    record_path(model).write_text(json.dumps(record))
    assert "export again" in choose_backend(model)[1]
    record["backends"]["openvino"]["version"] = openvino_version()
    record_path(model).write_text(json.dumps(record))
    model.write_bytes(model.read_bytes() + b"\0")  # another file under the same name
    assert choose_backend(model)[0] == "onnxruntime"


@pytest.mark.slow
@needs_openvino
@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_openvino_runs_like_onnxruntime(export_output, mode):
    """fp32 in f32: the same logits; both files: the same classes on the images onnxruntime decides by a margin
    (export_helpers), most of these images like the data."""
    out, _ = export_output
    images = label_images()["openvino vs onnxruntime"]
    for path in (out, int8_path(out)):
        ort = run_batches(make_runner(path, "onnxruntime", mode, threads=2), images, batch_size=16)
        ov_runner = make_runner(path, "openvino", mode, threads=2, precision="f32")
        assert ov_runner.precision == "f32"
        ov = run_batches(ov_runner, images, batch_size=16)
        assert ov.shape == (37, 10)
        if path == out:
            np.testing.assert_allclose(ov, ort, atol=1e-4)
        margin = TIE_MARGIN if path == out else CLEAR_MARGIN  # int8: two runtimes' rounding of activations
        assert_same_classes_where_decided(ov, ort, margin, path.name)


@pytest.mark.slow
@needs_openvino
def test_predict_auto_picks_the_verified_openvino(export_output, tmp_path):
    out, _ = export_output
    folder = image_folder(tmp_path / "photos")
    code, stdout, stderr = predict(str(int8_path(out)), str(folder))
    assert code == 0, stderr
    assert len(stdout.splitlines()) == 12
    assert f"note: openvino {openvino_version()} (throughput," in stderr and "verified by the export" in stderr
    code, stdout_ort, stderr = predict(str(int8_path(out)), str(folder), "--backend", "onnxruntime")
    assert code == 0 and "note: onnxruntime" in stderr
    ov_classes, ort_classes = (np.array([line.split("\t")[1] for line in s.splitlines()]) for s in (stdout, stdout_ort))
    reference = run_batches(make_runner(int8_path(out), "onnxruntime"), label_images()["predict's photos"])
    clear = decided(reference, CLEAR_MARGIN)  # the near-ties of a model trained in this run may fall either way
    assert clear.mean() >= DECIDED_SHARE
    np.testing.assert_array_equal(ov_classes[clear], ort_classes[clear])
    code, _, stderr = predict(str(out), str(folder / "00.png"))  # one image: latency mode
    assert code == 0 and "(latency," in stderr


# --- the export's report, with a stand-in OpenVINO ---------------------------------------------------------

@pytest.fixture
def reuse_export(monkeypatch, export_output) -> None:
    out, _ = export_output
    monkeypatch.setattr(export_onnx_cli, "export_onnx",
                        lambda model, info, path, opset=None: path.write_bytes(out.read_bytes()) and "a copy")


@pytest.mark.slow
@pytest.mark.parametrize("scramble", [False, True])
def test_a_backend_off_the_checkpoint_is_reported_and_not_used(workdir, checkpoint, tiny_data, monkeypatch,
                                                              reuse_export, scramble):
    fake_openvino(monkeypatch, scramble)
    out = workdir / f"fake-{scramble}" / "model.onnx"
    out.parent.mkdir()
    code, stdout, stderr = run_export("--checkpoint", str(checkpoint), "--out", str(out), "--data-dir", str(tiny_data))
    assert code == 0, stderr  # reported, not fatal: onnxruntime passed its gates
    result = json.loads(record_path(out).read_text())["backends"]["openvino"]
    assert result["verified"] is not scramble
    assert ("NOT verified" in stdout) is scramble
    if scramble:
        assert result["agreement_with_onnxruntime"] < 0.5
        monkeypatch.setattr(backends, "openvino_version", lambda: "fake-1.0")
        backend, why = choose_backend(out)
        assert backend == "onnxruntime" and "not verified" in why


# --- without OpenVINO --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_without_openvino_auto_is_onnxruntime(no_openvino, export_output, tmp_path):
    out, _ = export_output
    assert openvino_version() is None
    backend, why = choose_backend(out)
    assert backend == "onnxruntime" and "pip install" in why
    code, stdout, stderr = predict(str(out), str(image_folder(tmp_path / "photos", 3)))
    assert code == 0 and len(stdout.splitlines()) == 3 and "note: onnxruntime" in stderr


@pytest.mark.slow
def test_without_openvino_asking_for_it_is_a_usage_error(no_openvino, export_output, workdir, checkpoint, tmp_path):
    out, _ = export_output
    image = image_folder(tmp_path / "photos", 1) / "00.png"
    code, stdout, stderr = predict(str(out), str(image), "--backend", "openvino")
    assert code == 2 and stderr.count("\n") == 1 and "OpenVINO is not installed" in stderr and not stdout
    target = tmp_path / "model.onnx"
    code, _, stderr = run_export("--checkpoint", str(checkpoint), "--out", str(target), "--backend", "openvino")
    assert code == 2 and stderr.count("\n") == 1 and "pip install" in stderr
    assert list(tmp_path.glob("*.onnx*")) == []


@pytest.mark.slow
def test_without_openvino_the_export_records_onnxruntime_only(no_openvino, workdir, checkpoint, tiny_data,
                                                              reuse_export):
    out = workdir / "no-openvino" / "model.onnx"
    out.parent.mkdir()
    code, stdout, stderr = run_export("--checkpoint", str(checkpoint), "--out", str(out), "--data-dir", str(tiny_data))
    assert code == 0, stderr
    assert list(json.loads(record_path(out).read_text())["backends"]) == ["onnxruntime"]
    assert "model.onnx under onnxruntime:" in stdout


# --- the verification record, without an export ---------------------------------------------------------

def test_auto_picks_openvino_only_for_the_verified_bytes_and_the_version_that_verified_them(tmp_path, monkeypatch):
    """A hand-written record stands for the export's. Sabotage: the sha256 check dropped from read_record (an
    edited file keeps its old verdict); the version check or the `verified` flag ignored in choose_backend."""
    model = tmp_path / "model.onnx"
    model.write_bytes(b"graph bytes")
    sha = hashlib.sha256(b"graph bytes").hexdigest()
    monkeypatch.setattr(backends, "openvino_version", lambda: "2025.1")

    def record(verified: bool, version: str, digest: str = sha) -> None:
        openvino = {"verified": verified, "version": version, "accuracy": 0.9, "reason": "logits differ"}
        record_path(model).write_text(json.dumps({"sha256": digest, "backends": {"openvino": openvino}}))

    assert record_path(model).name == "model.onnx.verified.json"
    assert choose_backend(model)[0] == "onnxruntime"  # no record yet
    record(True, "2025.1")
    assert choose_backend(model) == ("openvino", "verified by the export: test accuracy 90.00%")
    record(True, "2024.6")
    assert choose_backend(model)[0] == "onnxruntime"
    record(False, "2025.1")
    assert choose_backend(model) == ("onnxruntime", "OpenVINO not verified by the export: logits differ")
    record(True, "2025.1", digest=hashlib.sha256(b"other bytes").hexdigest())
    assert choose_backend(model)[0] == "onnxruntime"
    monkeypatch.setattr(backends, "openvino_version", lambda: None)
    record(True, "2025.1")
    assert choose_backend(model)[0] == "onnxruntime"


# --- runners, without an export ---------------------------------------------------------------------------

def identity_onnx(path: Path) -> Path:
    """A one-node graph (logits = the input, flattened): enough for a runner to load and run."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3072])
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"])], "identity", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_a_runner_defaults_to_one_thread_per_usable_core_and_says_why_it_runs(tmp_path, monkeypatch, mode):
    """Three usable cores of many: three threads. Sabotage: make_runner's default off by one; runner_for's
    reason for an explicit --backend ("asked for") lost."""
    monkeypatch.setattr(backends.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    model = identity_onnx(tmp_path / "identity.onnx")
    runner, why = backends.runner_for(model, "onnxruntime", mode, None)
    assert why == "asked for"
    assert (runner.backend, runner.mode, runner.threads, runner.precision) == ("onnxruntime", mode, 3, "f32")
    x = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(runner.infer(x), x.reshape(5, -1))
    assert make_runner(model, "onnxruntime", mode, threads=2).threads == 2
