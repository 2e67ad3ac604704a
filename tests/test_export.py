"""ONNX export and the torch-free predictor, on a tiny model trained for a few steps on learnable data (and
random tiny models where no data is involved).

    python -m pytest tests/test_export.py
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export import onnx as export_onnx_cli
from export.backends import make_runner, record_path
from export.onnx import MAX_LOGIT_DIFF, compare, fold_batchnorm, int8_path, main, reference_logits
from export.predict import run_batches
from export_helpers import CLEAR_MARGIN, DECIDED_SHARE, TIE_MARGIN, decided, label_images, lead, run_export
from fastcifar.checkpoint import ModelInfo, load_model, save_model
from fastcifar.data import CLASSES
from fastcifar.errors import run_cli
from fastcifar.model import ModelConfig, ResNet9


MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def randomize_batchnorm(model: nn.Module, seed: int, negative: bool = False) -> nn.Module:
    """Trained-looking BN statistics, so folding and normalization are really exercised; `negative` gives
    some channels a negative scale, which must not be folded through a max-pool."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=g) * 0.2)
            if negative:
                bn.weight[::3] *= -1
    return model.eval()


def tiny_model(width: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(ResNet9(ModelConfig(width=width, logit_scale=1.0)), seed)


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `python -m export.onnx argv` in-process: (exit code, stdout, stderr)."""
    code = run_cli(main, argv, prog="export.onnx")
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module", autouse=True)
def private_cache(workdir):
    """Decoded-data caches go to the test's directory, never the real home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTCIFAR_HOME", str(workdir / "home"))
        yield


# --- the export itself -----------------------------------------------------------------------------------

@pytest.mark.parametrize("negative", [False, True])
def test_fold_batchnorm_is_exact(negative):
    model = randomize_batchnorm(ResNet9(ModelConfig(width=8, logit_scale=1.0)), seed=1, negative=negative)
    folded = fold_batchnorm(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert n_bn == (3 if negative else 0)  # with negative scales, the three pooled blocks keep their BN
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_parity_at_batch_1_7_256(exported, checkpoint):
    """Random images hold near-ties, which logits within the 1e-3 bound may break either way (by the CPU's
    rounding): the classes must agree on every other image (export_helpers.TIE_MARGIN)."""
    model, info = load_model(checkpoint)
    runner = make_runner(exported)  # one onnxruntime session: the batch axis must really be dynamic
    images = np.random.default_rng(0).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    reference = reference_logits(model, info, images)
    clear = decided(reference, TIE_MARGIN)
    assert clear.mean() >= DECIDED_SHARE  # few near-ties
    for n in (1, 7, 256):
        got = run_batches(runner, images[:n], batch_size=n)
        assert got.shape == (n, 10)
        assert np.abs(got - reference[:n]).max() <= 1e-3
        np.testing.assert_array_equal(got.argmax(1)[clear[:n]], reference[:n].argmax(1)[clear[:n]])


def test_parity_agreement_leaves_out_only_near_ties():
    """Sabotage: compare() counting every image (a near-tie that falls the other way within the logit bound
    fails the export) or none (a different class on a clear image passes)."""
    half = MAX_LOGIT_DIFF / 2
    expected = np.array([[1.0, 1.0 - half, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    tie_swapped = expected.copy()
    tie_swapped[0] = [1.0 - half, 1.0, 0.0]  # every logit within the bound
    parity = compare(tie_swapped, expected, tie=2 * MAX_LOGIT_DIFF)
    assert parity.ok and (parity.agreement, parity.ties) == (1.0, 1) and "1 near-ties not counted" in str(parity)
    clear_swapped = expected.copy()
    clear_swapped[1] = [0.0, 2.0, 0.0]
    parity = compare(clear_swapped, expected, tie=2 * MAX_LOGIT_DIFF)
    assert not parity.ok and parity.agreement == 0.5
    assert compare(tie_swapped, expected).agreement == pytest.approx(2 / 3)  # tie 0: every image counts


def test_the_dynamo_exporter_gives_logging_back(monkeypatch):
    """Sabotage: logging.disable(WARNING) around the dynamo export left in place, or replaced by NOTSET (the
    caller's own setting lost), on success or when the exporter raises."""

    def exporter_fails(*args, **kwargs):
        assert not logging.getLogger("torch.onnx").isEnabledFor(logging.WARNING)  # quiet while it runs
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", exporter_fails)
    monkeypatch.setattr(logging.root.manager, "disable", logging.DEBUG)  # the caller's own setting
    with pytest.raises(RuntimeError, match="unsupported operator"):
        export_onnx_cli._export_dynamo(nn.Identity(), torch.rand(2, 3, 32, 32), None)
    assert logging.root.manager.disable == logging.DEBUG


def test_int8_calibration_metadata_is_what_the_reader_fed(tmp_path, monkeypatch):
    """onnxruntime's quantizer replaced by one that drains the reader: the metadata must count and average the
    images it was really fed (200: three batches of 64 and a partial one). Sabotage: a reader that drops the
    partial last batch while the metadata still says 200."""
    import onnxruntime.quantization as quantization

    fed = []

    def quantize_static(model_in, model_out, reader, **kwargs):
        while (feed := reader.get_next()) is not None:
            fed.append(feed[export_onnx_cli.INPUT_NAME])
        shutil.copyfile(model_in, model_out)

    monkeypatch.setattr(quantization, "quant_pre_process", lambda src, dst, **kw: shutil.copyfile(src, dst))
    monkeypatch.setattr(quantization, "quantize_static", quantize_static)
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input"], ["logits"])], "g",
                                   [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, None)],
                                   [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "fp32.onnx"))
    images = np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    used = export_onnx_cli.quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", images)
    seen = np.concatenate(fed)
    assert used["images"] == len(seen) == 200
    assert used["pixel_mean"] == round(float(seen.mean(dtype=np.float64)), 4)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "int8.onnx")).metadata_props}
    assert json.loads(meta["calibration"]) == used and "on 200 images (random images)" in meta["quantization"]


def test_a_backend_that_cannot_run_the_file_is_recorded_not_raised(tmp_path, monkeypatch):
    """Sabotage: check_backends catching fewer exceptions than every runtime raises (a RuntimeError of OpenVINO's
    compiler would fail an export whose onnxruntime gates passed)."""
    from export.backends import Runner

    def cannot_compile(path, backend="onnxruntime", mode="latency", threads=None, precision="auto"):
        raise RuntimeError("Exception from src/inference/src/core.cpp: cannot compile")

    monkeypatch.setattr(export_onnx_cli, "make_runner", cannot_compile)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"graph")
    ort = Runner("onnxruntime", "latency", 1, "f32", "1.0", lambda x: np.zeros((len(x), 10), np.float32))
    record = export_onnx_cli.check_backends("model.onnx", model, ort, None, np.zeros((2, 32, 32, 3), np.uint8),
                                            None, ["onnxruntime", "openvino"], 1.0)
    openvino = record["backends"]["openvino"]
    assert not openvino["verified"] and openvino["reason"].startswith("failed: RuntimeError: Exception from")
    assert record["backends"]["onnxruntime"]["verified"] and record["file"] == "model.onnx"


@pytest.mark.parametrize("other_acc, verified", [(None, False), (0.5, True), (0.4, False)])
def test_another_backend_is_verified_only_within_the_limit_of_onnxruntimes_accuracy(tmp_path, monkeypatch,
                                                                                  other_acc, verified):
    """onnxruntime at 50%; the other backend's test accuracy measured (or not: no --data-dir) and held to 1 point
    of it. Sabotage: verified when no accuracy was measured, or the limit ignored."""
    from types import SimpleNamespace

    from export.backends import Runner

    images, labels = np.zeros((10, 32, 32, 3), np.uint8), np.zeros(10, np.int64)
    right = round(10 * (other_acc or 0))  # images the other backend classifies as their label, class 0
    logits = np.eye(10, dtype=np.float32)[(np.arange(10) >= right).astype(int)]
    monkeypatch.setattr(export_onnx_cli, "make_runner", lambda path, backend, mode: Runner(
        backend, mode, 1, "bf16", "2.0", lambda x: logits[:len(x)]))
    model = tmp_path / "model.onnx"
    model.write_bytes(b"graph")
    data = None if other_acc is None else SimpleNamespace(test_images=images, test_labels=labels, source="test")
    ort = Runner("onnxruntime", "latency", 1, "f32", "1.0", lambda x: logits[:len(x)])
    record = export_onnx_cli.check_backends("model.onnx", model, ort, 0.5, images, data, ["onnxruntime", "x"], 1.0)
    other = record["backends"]["x"]
    assert other["verified"] is verified and other["precision"] == "bf16" and other["accuracy"] == other_acc
    assert other["reason"].startswith("no --data-dir" if other_acc is None else "0.00" if verified else "10.00")


class Bf16Model(nn.Module):
    """The model under CPU bf16 autocast, as AMP evaluates it on a CPU with bf16 (emulated elsewhere: the same
    rounding, slower)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


@pytest.mark.slow
def test_int8_and_bf16_move_no_clearly_decided_class(checkpoint, exported, test_split):
    """Why the tests may compare int8 and bf16 classes (OpenVINO, AMX) on the images that fp32 decides by
    CLEAR_MARGIN (export_helpers): most images the tests read are decided so, and on those the int8 file and
    bf16 arithmetic keep fp32's class with a lead of at least half the margin."""
    model, info = load_model(checkpoint)
    int8 = make_runner(int8_path(exported))
    for name, images in {"test split": test_split.test_images, **label_images()}.items():
        fp32 = reference_logits(model, info, images)
        clear = decided(fp32, CLEAR_MARGIN)
        assert clear.mean() >= DECIDED_SHARE, name
        classes = fp32.argmax(1)[clear]
        assert lead(run_batches(int8, images[clear]), classes).min() >= CLEAR_MARGIN / 2, name
        assert lead(reference_logits(Bf16Model(model), info, images[clear]), classes).min() >= CLEAR_MARGIN / 2, name


@pytest.mark.slow
def test_graph_interface_and_metadata(exported, checkpoint):
    _, info = load_model(checkpoint)
    proto = onnx.load(str(exported))
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [3, 32, 32]
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == list(CLASSES)
    assert json.loads(meta["mean"]) == pytest.approx(info.mean) and json.loads(meta["std"]) == pytest.approx(info.std)
    assert meta["input_format"].startswith("NCHW float32 RGB [0,1]")
    assert json.loads(meta["test_acc"]) == info.test_acc
    assert meta["fastcifar_version"] and meta["exporter"].startswith("torch.onnx")
    assert not list(exported.parent.glob(".*.tmp"))  # no temporary files left behind


@pytest.mark.slow
def test_each_verification_record_names_its_final_file(exported):
    """The files are checked under temporary names. Sabotage: the record naming the temporary file it checked."""
    from export.backends import record_path

    for path in (exported, int8_path(exported)):
        assert json.loads(record_path(path).read_text())["file"] == path.name


@pytest.mark.slow
def test_int8_export(exported, tiny_data):
    path = int8_path(exported)
    assert path.name == "model.int8.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert {n.op_type for n in proto.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == list(CLASSES) and "on 16 images (training split" in meta["quantization"]
    logits = run_batches(make_runner(path), np.zeros((3, 32, 32, 3), dtype=np.uint8))
    assert logits.shape == (3, 10) and np.isfinite(logits).all()


@pytest.mark.slow
def test_the_shared_model_trains_with_the_sessions_seed(checkpoint, train_seed):
    """Sabotage: export_helpers.train_tiny without --seed (FASTCIFAR_TEST_SEED=N would then check nothing new)."""
    assert json.loads((checkpoint.parent / "config.json").read_text())["seed"] == train_seed


@pytest.mark.slow
def test_export_reports_accuracy(export_output, checkpoint):
    _, stdout = export_output
    _, info = load_model(checkpoint)
    assert info.test_acc > 0.5  # the few steps did learn: the gates below compare real accuracies
    assert "on 100 images" in stdout  # parity on the (whole, tiny) test split
    assert "accuracy on the 100 test images: onnx fp32" in stdout
    assert f"of the checkpoint's {100 * info.test_acc:.2f}% (limit 0.3, no TTA)" in stdout


@pytest.mark.slow
def test_export_names_every_file_it_wrote_with_the_models_sizes(export_output):
    """Sabotage: a "wrote FILE (N MiB)" or "wrote RECORD" line dropped from main."""
    onnx_file, stdout = export_output
    wrote = [line for line in stdout.splitlines() if line.startswith("wrote ")]
    expected = []
    for model in (onnx_file, int8_path(onnx_file)):
        expected += [f"wrote {model} ({model.stat().st_size / 2**20:.1f} MiB)", f"wrote {record_path(model)}"]
    assert wrote == expected
    assert all(Path(line.split()[1]).is_file() for line in wrote)


@pytest.mark.slow
def test_unreachable_opset_falls_back_to_torchscript(workdir, checkpoint, capsys):
    out = workdir / "opset13.onnx"
    code, stdout, stderr = cli(["--checkpoint", str(checkpoint), "--out", str(out), "--opset", "13"], capsys)
    assert code == 0, stderr
    assert "falling back to the TorchScript exporter" in stderr
    assert "exported with torch.onnx TorchScript (legacy), opset 13" in stdout
    assert next(o.version for o in onnx.load(str(out)).opset_import if o.domain == "") == 13


# --- bad input: one line, exit 2, nothing written -------------------------------------------------------

def _bad_checkpoints(root: Path) -> dict[str, Path]:
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    mismatched = root / "mismatched.safetensors"
    small = tiny_model(width=8)
    save_model(mismatched, small, ModelInfo(ResNet9(ModelConfig(width=16)).config, list(CLASSES), MEAN, STD))
    return {"missing": root / "nope", "corrupt": corrupt, "mismatched": mismatched}


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("missing", "checkpoint not found"),
    ("corrupt", "corrupt checkpoint"),
    ("mismatched", "weights do not match the stated model (width 16)"),
    ("missing-dir", "output directory does not exist"),
    ("int8-without-data", "--int8 needs calibration data: pass --data-dir"),
    ("opset", "--opset must be between 7 and"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, checkpoint, capsys, case, message):
    (tmp_path / "in").mkdir()
    bad = _bad_checkpoints(tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["--checkpoint", str(bad.get(case, checkpoint)), "--out", str(out_dir / "model.onnx")]
    if case == "missing-dir":
        argv[-1] = str(out_dir / "missing" / "model.onnx")
    argv += {"int8-without-data": ["--int8"], "opset": ["--opset", "99"]}.get(case, [])
    code, stdout, stderr = cli(argv, capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("export.onnx: error: ") and message in stderr
    assert "Traceback" not in stderr + stdout
    assert list(out_dir.rglob("*")) == []


@pytest.mark.slow
def test_failed_check_keeps_the_previous_file(workdir, checkpoint, exported, capsys, monkeypatch, reuse_export):
    out = workdir / "keep" / "model.onnx"
    out.parent.mkdir()
    out.write_bytes(exported.read_bytes())
    before = out.read_bytes()
    real = export_onnx_cli.reference_logits
    monkeypatch.setattr(export_onnx_cli, "reference_logits", lambda *a, **k: real(*a, **k) + 0.01)
    code, _, stderr = cli(["--checkpoint", str(checkpoint), "--out", str(out)], capsys)
    assert code == 2 and "does not match PyTorch" in stderr and stderr.count("\n") == 1
    assert "max |logit difference| 1.00e-02" in stderr
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]


# --- the export refuses a wrong model: each gate, and the sabotage it catches ------------------------------

@pytest.fixture
def reuse_export(monkeypatch, exported) -> None:
    """The gates after the exporter see the module's fp32 export again: the same graph, without the
    exporter's seconds."""
    def copy(model, info, path, opset=None):
        shutil.copyfile(exported, path)
        return "a copy of the module's export"
    monkeypatch.setattr(export_onnx_cli, "export_onnx", copy)


def previous_file(path: Path) -> bytes:
    """A stand-in for an earlier good export at `path`, which a failed export must leave alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"previous export")
    return path.read_bytes()


def assert_refused(code: int, stderr: str, message: str, files: dict[Path, bytes]) -> None:
    assert code == 2 and stderr.startswith("export.onnx: error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr, stderr
    for path, before in files.items():
        assert path.read_bytes() == before
    folder = next(iter(files)).parent
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob("*.verified.json"))


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["none", "swapped mean and std"])
def test_a_graph_with_wrong_normalization_fails_the_export(workdir, checkpoint, tiny_data, monkeypatch,
                                                           normalization):
    """The parity reference normalizes on its own, so a graph that skips or garbles it cannot pass."""
    wrong = {"none": lambda self, x: self.model(x),
             "swapped mean and std": lambda self, x: self.model((x - self.std) / self.mean)}[normalization]
    monkeypatch.setattr(export_onnx_cli.InferenceGraph, "forward", wrong)
    out = workdir / f"wrong-norm-{normalization.replace(' ', '-')}" / "model.onnx"
    before = previous_file(out)
    code, _, stderr = run_export("--checkpoint", str(checkpoint), "--out", str(out), "--data-dir", str(tiny_data))
    assert_refused(code, stderr, "ONNX output does not match PyTorch", {out: before})


def with_stored_accuracy(checkpoint: Path, test_acc: float, path: Path) -> Path:
    model, info = load_model(checkpoint)
    info.test_acc = test_acc
    save_model(path, model, info)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("offset, passes", [(+0.002, True), (-0.0025, True), (+0.004, False), (-0.2, False)])
def test_accuracy_must_match_the_checkpoint_within_0_3_points(workdir, exported, checkpoint, tiny_data,
                                                              test_split, reuse_export, offset, passes):
    """A stored accuracy 0.2-0.25 points off passes, 0.4 points off fails and keeps the previous file."""
    onnx_acc = float((run_batches(make_runner(exported), test_split.test_images).argmax(1)
                      == test_split.test_labels).mean())
    folder = workdir / f"acc-gate{offset:+}"
    folder.mkdir()
    edited = with_stored_accuracy(checkpoint, onnx_acc + offset, folder / "model.safetensors")
    out = folder / "model.onnx"
    before = previous_file(out)
    code, stdout, stderr = run_export("--checkpoint", str(edited), "--out", str(out), "--data-dir", str(tiny_data),
                                      "--backend", "onnxruntime")
    if passes:
        assert code == 0, stderr
        assert f"within {100 * abs(offset):.2f} points of the checkpoint's" in stdout
    else:
        assert_refused(code, stderr, f"by {100 * abs(offset):.2f} points (limit 0.3)", {out: before})


def zero_calibration(monkeypatch) -> None:
    """Sabotage: calibration sees black images only."""
    real = export_onnx_cli.quantize_int8
    monkeypatch.setattr(export_onnx_cli, "quantize_int8",
                        lambda fp32, out, calib, **kw: real(fp32, out, np.zeros_like(calib), **kw))


@pytest.mark.slow
def test_int8_drop_above_the_limit_fails_and_replaces_nothing(workdir, checkpoint, tiny_data, monkeypatch,
                                                              reuse_export):
    zero_calibration(monkeypatch)
    out = workdir / "int8-gate" / "model.onnx"
    before = {out: previous_file(out), int8_path(out): previous_file(int8_path(out))}
    code, _, stderr = run_export("--checkpoint", str(checkpoint), "--out", str(out), "--data-dir", str(tiny_data),
                                 "--int8", "--calib-images", "16", "--backend", "onnxruntime")
    assert_refused(code, stderr, "points below fp32", before)
    assert "(limit --max-int8-drop 1.0)" in stderr


@pytest.mark.slow
def test_max_int8_drop_is_the_limit_and_metadata_says_what_calibration_saw(workdir, checkpoint, tiny_data,
                                                                         monkeypatch, reuse_export):
    zero_calibration(monkeypatch)
    out = workdir / "int8-lenient" / "model.onnx"
    out.parent.mkdir()
    code, stdout, stderr = run_export("--checkpoint", str(checkpoint), "--out", str(out), "--data-dir",
                                      str(tiny_data), "--int8", "--calib-images", "10000", "--max-int8-drop", "100",
                                      "--backend", "onnxruntime")
    assert code == 0, stderr
    assert "only 200 training images: calibrating on all of them, not 10000" in stdout
    meta = {p.key: p.value for p in onnx.load(str(int8_path(out))).metadata_props}
    calibration = json.loads(meta["calibration"])
    assert calibration["images"] == 200 and calibration["pixel_mean"] == 0.0  # the zeros, not the request
    assert "training split of" in calibration["source"]


@pytest.mark.slow
def test_calibration_metadata_of_a_normal_export(exported, test_split):
    meta = {p.key: p.value for p in onnx.load(str(int8_path(exported))).metadata_props}
    calibration = json.loads(meta["calibration"])
    assert calibration["images"] == 16 and calibration["method"] == "MinMax"
    train_mean = float(test_split.train_images.mean()) / 255
    assert abs(calibration["pixel_mean"] - train_mean) < 0.1  # real training images, not zeros


# --- export.predict --------------------------------------------------------------------------------------


