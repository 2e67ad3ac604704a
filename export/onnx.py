"""Export a trained fastcifar model to ONNX for CPU inference, verified against PyTorch on every export.

    python -m export.onnx --checkpoint runs/default --out model.onnx
    python -m export.onnx --checkpoint runs/default --out model.onnx --int8 \
        --data-dir ../shared/data/cifar10-png.tar.gz          # also model.int8.onnx, calibrated on 512 images
    python -m export.predict model.onnx cat.png               # torch-free inference

The graph takes what torchvision's `to_tensor` or `cv2.dnn.blobFromImage(img, 1/255, swapRB=True)` give:
input `input`, float32 NCHW RGB in [0, 1], any batch size; it normalizes with the training mean/std inside
and returns `logits` (N, classes). Class names, mean/std, the input layout, the run's test accuracy and the
fastcifar version are in the model's metadata_props.

Every export is checked before it replaces anything, and fails (exit 2, nothing replaced) when a check fails:

* `onnx.checker` (full check);
* parity: onnxruntime fed raw [0, 1] images against an independent reference, the unwrapped PyTorch model on
  images normalized separately from the checkpoint's mean/std (max |logit difference| <= 1e-3, top-1
  agreement >= 99.9% over the images whose top two logits lie more than 2e-3 apart: nearer ties may fall
  either way within the logit bound), on real test images with `--data-dir`, random images otherwise; a
  graph without its normalization, or with the wrong one, fails here;
* with `--data-dir`: the ONNX fp32 accuracy on the whole test split within 0.3 points of the accuracy stored
  with the checkpoint (both without TTA);
* with `--int8`: an int8 accuracy drop vs fp32 above `--max-int8-drop` (default 1.0 point).

The other installed runtimes (OpenVINO, see `export.backends`; `--backend` chooses) run every file too;
their test accuracy, top-1 agreement with onnxruntime and inference precision are printed and written to
`<file>.verified.json` (the file's SHA-256 included). A runtime within `--max-int8-drop` points of
onnxruntime's accuracy on the same file (which passed the gates above) is marked verified, and only then does
`export.predict --backend auto` use it; one that is not is reported and the export still succeeds. Each
runtime is checked in the precision `--backend auto` runs it in (OpenVINO: bf16 on CPUs with AVX512_BF16 or
AMX, f32 elsewhere; recorded as `precision`): a check pinned to f32 would vouch for arithmetic that predict
does not do there. The files are written under temporary names and
renamed only after all checks pass (with `--int8`: both files' checks), so a failed export never leaves a
partial file or replaces a good one; the records follow the models.

`--int8` adds `<stem>.int8.onnx`: onnxruntime static quantization (QDQ, uint8 activations, per-channel
int8 weights, MinMax calibration on `--calib-images` training images; bench/RESULTS.md has what the
alternatives measured); the `calibration` metadata says what was really used.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from torch import nn

from export.backends import (BACKENDS, INSTALL_OPENVINO, Runner, file_digest, installed_backends, make_runner,
                             openvino_version, record_path)
from export.predict import run_batches, to_input
from fastcifar import __version__
from fastcifar.atomic import atomic_path, write_json
from fastcifar.checkpoint import ModelInfo, load_model, unwrap
from fastcifar.errors import UserError, first_line, run_cli

if TYPE_CHECKING:
    from fastcifar.data import CifarData

INPUT_NAME, OUTPUT_NAME = "input", "logits"
INPUT_FORMAT = "NCHW float32 RGB [0,1], 32x32"
MAX_LOGIT_DIFF = 1e-3
MIN_AGREEMENT = 0.999
MAX_ACC_DIFF = 0.3  # points between ONNX fp32 and the checkpoint's stored accuracy (bf16 vs fp32 eval differ a bit)
DEFAULT_MAX_INT8_DROP = 1.0  # points of test accuracy int8 may lose against fp32 (--max-int8-drop)
CALIB_SEED = 1
PARITY_IMAGES = 1000  # enough for a 99.9% agreement bound to mean something, quick even at width 64
RANDOM_IMAGES = 256
MIN_OPSET = 7  # the oldest the TorchScript exporter writes; the dynamo one starts at 18 and converts down


class InferenceGraph(nn.Module):
    """The exported function: [0, 1] RGB NCHW -> normalize -> model -> logits."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


# --- export ----------------------------------------------------------------------------------------------

def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each conv-[pool]-BN-ReLU block folded into conv(+bias)-ReLU-[pool].

    The exporters fold BN only when it directly follows the conv; our blocks pool first, which left three
    float BatchNormalization nodes that break the int8 graph into DequantizeLinear/BN/QuantizeLinear
    islands. Folding through the max-pool is exact when every BN scale is positive (max commutes with a
    positive per-channel affine map), and ReLU commutes with max-pool, so ReLU moves next to the conv where
    onnxruntime fuses it. Blocks with a non-positive scale are left as they are (bench/RESULTS.md: the
    speed it gains).
    """
    model = copy.deepcopy(model).eval()
    for block in model.modules():
        if not isinstance(block, nn.Sequential):
            continue
        kinds = [type(m) for m in block]
        if kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]:
            block[0], block[1] = _folded_conv(block[0], block[1]), nn.Identity()
        elif kinds == [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU] and (_bn_scale(block[2]) > 0).all():
            conv, pool = _folded_conv(block[0], block[2]), block[1]
            block[0], block[1], block[2], block[3] = conv, nn.ReLU(), pool, nn.Identity()
    return model


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)


@torch.no_grad()
def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = _bn_scale(bn)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       bias=True)
    folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    folded.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
    return folded


def export_onnx(model: nn.Module, info: ModelInfo, path: str | Path, opset: int | None = None) -> str:
    """Write the model as ONNX (weights inline, metadata set) to `path`; return the exporter and opset.

    Prefers the torch.export-based exporter (`dynamo=True`); falls back to the TorchScript one only if
    that raises, because the new one is the maintained path and gives a cleaner graph.
    """
    graph = InferenceGraph(fold_batchnorm(unwrap(model)), info.mean, info.std).eval()
    example = torch.rand(2, 3, 32, 32)  # batch 2: torch.export specializes a size-1 dimension
    try:
        proto, exporter = _export_dynamo(graph, example, opset), "torch.onnx dynamo"
    except Exception as first:  # the exporter raises many types; any of them means: try the other one
        print(f"dynamo exporter failed ({type(first).__name__}: {first_line(first)}); "
              "falling back to the TorchScript exporter", file=sys.stderr)
        try:
            proto, exporter = _export_torchscript(graph, example, opset), "torch.onnx TorchScript (legacy)"
        except Exception as second:
            raise UserError(f"ONNX export failed with both exporters (opset {opset or 'default'}): "
                            f"{type(second).__name__}: {first_line(second)}") from second
    set_metadata(proto, metadata(info, exporter=exporter))
    onnx.save(proto, str(path))
    return f"{exporter}, opset {opset_of(proto)}"


def _export_dynamo(graph: nn.Module, example: torch.Tensor, opset: int | None) -> onnx.ModelProto:
    # For an opset it cannot target, this exporter logs a traceback and keeps its own: we check instead.
    with _quiet_loggers("torch.onnx", "onnxscript"):
        program = torch.onnx.export(graph, (example,), None, dynamo=True, verbose=False, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    proto = program.model_proto
    if opset is not None and opset_of(proto) != opset:
        raise RuntimeError(f"asked for opset {opset}, got {opset_of(proto)}")
    return proto


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def opset_of(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _export_torchscript(graph: nn.Module, example: torch.Tensor, opset: int | None) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))  # "legacy exporter" notices
        torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def metadata(info: ModelInfo, **extra: str) -> dict[str, str]:
    """metadata_props: everything a consumer needs besides the graph."""
    return {"classes": json.dumps(info.classes), "mean": json.dumps(info.mean), "std": json.dumps(info.std),
            "input_format": INPUT_FORMAT, "output": "logits (N, classes); softmax gives probabilities",
            "test_acc": json.dumps(info.test_acc), "run_extra": json.dumps(info.extra),  # e.g. test_acc_tta
            "model_config": json.dumps(info.config.to_dict()),
            "fastcifar_version": __version__, **extra}


def set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = f"fastcifar ResNet-9 (width {json.loads(props['model_config'])['width']}); input " \
                       f"'{INPUT_NAME}' {INPUT_FORMAT}, output '{OUTPUT_NAME}'"


# --- verification ----------------------------------------------------------------------------------------

@dataclass
class Parity:
    images: int
    max_diff: float
    agreement: float  # top-1, over the images that are no near-tie in the reference
    ties: int = 0     # images left out of the agreement

    @property
    def ok(self) -> bool:
        return self.max_diff <= MAX_LOGIT_DIFF and self.agreement >= MIN_AGREEMENT

    def __str__(self) -> str:
        ties = f", {self.ties} near-ties not counted" if self.ties else ""
        return (f"max |logit difference| {self.max_diff:.2e} (limit {MAX_LOGIT_DIFF:g}), top-1 agreement "
                f"{100 * self.agreement:.2f}% (limit {100 * MIN_AGREEMENT:g}%) on {self.images} images{ties}")


def compare(got: np.ndarray, expected: np.ndarray, tie: float = 0.0) -> Parity:
    """Logits `got` against `expected`: the largest difference and the top-1 agreement over the images whose
    expected top two logits lie more than `tie` apart (all of them for tie 0)."""
    top_two = np.sort(expected, axis=1)[:, -2:]
    decided = top_two[:, 1] - top_two[:, 0] > tie
    same = got.argmax(1) == expected.argmax(1)
    agreement = float(same[decided].mean()) if decided.any() else 1.0
    return Parity(len(got), float(np.abs(got - expected).max()), agreement, int((~decided).sum()))


@torch.no_grad()
def reference_logits(model: nn.Module, info: ModelInfo, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The independent reference for uint8 (N, 32, 32, 3) images: the unwrapped, unfolded PyTorch model on
    images normalized right here from the checkpoint's mean/std. It shares no code with the exported graph
    (`InferenceGraph`, `fold_batchnorm`) nor with the ONNX side's input (`to_input`, raw [0, 1] pixels), so
    a graph that lost or changed its normalization cannot agree with it."""
    net = unwrap(model).eval()
    mean, std = np.asarray(info.mean, dtype=np.float32), np.asarray(info.std, dtype=np.float32)
    parts = []
    for i in range(0, len(images), batch_size):
        normalized = (images[i:i + batch_size].astype(np.float32) / 255 - mean) / std  # NHWC
        parts.append(net(torch.from_numpy(np.ascontiguousarray(normalized.transpose(0, 3, 1, 2)))).numpy())
    return np.concatenate(parts)


def check_file(path: str | Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise UserError(f"exported model fails onnx.checker: {first_line(e, 300)}") from e


def verify(model: nn.Module, info: ModelInfo, path: str | Path, images: np.ndarray) -> Parity:
    """Check the file at `path` and compare onnxruntime, fed raw [0, 1] images, with `reference_logits`.

    Raises UserError with the figures when a bound is missed.
    """
    check_file(path)
    # Logits within MAX_LOGIT_DIFF of the reference may swap the top two classes where those lie within twice
    # that: random images hold such near-ties, and which way they fall depends on the CPU's rounding. On any
    # other image a different class means a logit moved by more than the limit.
    parity = compare(run_batches(make_runner(path), images), reference_logits(model, info, images),
                     tie=2 * MAX_LOGIT_DIFF)
    if not parity.ok:
        raise UserError(f"ONNX output does not match PyTorch: {parity}; nothing was written")
    return parity


def check_accuracy(acc: float, info: ModelInfo, images: int) -> str:
    """Fail unless the ONNX fp32 test accuracy is within MAX_ACC_DIFF points of the checkpoint's stored one
    (both without TTA: `test_acc` is the plain figure, `test_acc_tta` the TTA one). Returns the report."""
    if info.test_acc is None:
        return "the checkpoint stores no test accuracy: accuracy gate skipped"
    diff = 100 * abs(acc - info.test_acc)
    if diff > MAX_ACC_DIFF:
        raise UserError(f"ONNX fp32 test accuracy {_percent(acc)} differs from the checkpoint's {_percent(info.test_acc)} "
                        f"(no TTA) by {diff:.2f} points (limit {MAX_ACC_DIFF}) on {images} test images: the graph "
                        "is wrong or --data-dir is not the data the model was evaluated on; nothing was written")
    return f"within {diff:.2f} points of the checkpoint's {_percent(info.test_acc)} (limit {MAX_ACC_DIFF}, no TTA)"


def accuracy(runner: Runner, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """(accuracy, logits) of `runner` on uint8 NHWC images."""
    logits = run_batches(runner, images)
    return float((logits.argmax(1) == labels).mean()), logits


@dataclass
class BackendCheck:
    """One file under one backend, as recorded in `<file>.verified.json` for `--backend auto`."""

    backend: str
    version: str
    precision: str  # what the runtime computed the float parts in
    verified: bool
    reason: str
    accuracy: float | None = None  # on the whole test split; None without --data-dir
    agreement_with_onnxruntime: float | None = None  # top-1, on the parity images

    def __str__(self) -> str:
        acc = f"test accuracy {_percent(self.accuracy)}, " if self.accuracy is not None else ""
        agree = (f"top-1 agreement with onnxruntime {100 * self.agreement_with_onnxruntime:.2f}%, "
                 if self.agreement_with_onnxruntime is not None else "")
        return (f"{self.backend} {self.version} ({self.precision}): {acc}{agree}"
                f"{'verified' if self.verified else 'NOT verified'} ({self.reason})")


def check_other_backend(path: Path, backend: str, check_images: np.ndarray, ort_check_logits: np.ndarray,
                        data: CifarData | None, reference_acc: float | None, max_diff: float) -> BackendCheck:
    """Run `path` under `backend` in its default precision: verified when its test accuracy is within
    `max_diff` points of `reference_acc` (onnxruntime's on this file); never raises, a failure is recorded
    instead."""
    try:
        runner = make_runner(path, backend, "throughput")
        logits = run_batches(runner, check_images)
        acc = accuracy(runner, data.test_images, data.test_labels)[0] if data is not None else None
    except Exception as e:  # a runtime that cannot read or run the file is reported, not fatal
        return BackendCheck(backend, "?", "?", False, f"failed: {type(e).__name__}: {first_line(e)}")
    agreement = compare(logits, ort_check_logits).agreement
    check = BackendCheck(backend, runner.version, runner.precision, False, "", acc, agreement)
    if acc is None or reference_acc is None:
        check.reason = "no --data-dir: test accuracy not measured" if acc is None else "no reference accuracy"
    else:
        diff = 100 * abs(acc - reference_acc)
        check.verified = diff <= max_diff
        check.reason = (f"{diff:.2f} points from onnxruntime's {_percent(reference_acc)} on this file, limit "
                        f"{max_diff} (--max-int8-drop)")
    return check


def verification_record(path: Path, checks: list[BackendCheck], data: CifarData | None) -> dict:
    return {"file": path.name, "sha256": file_digest(path), "fastcifar_version": __version__,
            "test_data": data.source if data is not None else None,
            "test_images": len(data.test_labels) if data is not None else 0,
            "backends": {c.backend: asdict(c) for c in checks}}


def check_backends(path: Path, ort_acc: float | None, ort_check_logits: np.ndarray, check_images: np.ndarray,
                   data: CifarData | None, backends: Sequence[str], max_diff: float) -> dict:
    """Report `path` under every backend in `backends` and return its verification record. onnxruntime was
    gated already (parity, accuracy); the others are only recorded."""
    import onnxruntime as ort

    checks = [BackendCheck("onnxruntime", ort.__version__, "f32", True,
                           "passed the export's gates" if ort_acc is not None else "parity only (no --data-dir)",
                           ort_acc)]
    for backend in backends:
        if backend != "onnxruntime":
            checks.append(check_other_backend(path, backend, check_images, ort_check_logits, data, ort_acc,
                                              max_diff))
    for check in checks:
        print(f"  {check}")
    return verification_record(path, checks, data)


# --- int8 ------------------------------------------------------------------------------------------------

def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib_images: np.ndarray, *,
                  source: str = "random images", quant_format: str = "QDQ", activation_type: str = "QUInt8",
                  reduce_range: bool = False, calibrate_method: str = "MinMax", per_channel: bool = True) -> dict:
    """Static int8 quantization of the fp32 model with onnxruntime, calibrated on uint8 NHWC images. The
    defaults are the fastest accurate choice measured (bench/RESULTS.md); metadata is copied from fp32."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    with tempfile.TemporaryDirectory(prefix="fastcifar-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference (meant for transformers) cannot follow ReduceMax -> Reshape in our graph;
        # ONNX's own shape inference, which quantization needs, still runs.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        reader = _CalibrationReader(calib_images)
        quantize_static(str(prepared), str(out_path), reader,
                        quant_format=QuantFormat[quant_format], per_channel=per_channel,
                        reduce_range=reduce_range, activation_type=QuantType[activation_type],
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod[calibrate_method])
    calibration = {"method": calibrate_method, "images": reader.images, "pixel_mean": round(reader.pixel_mean, 4),
                   "source": source}
    props = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
    props["quantization"] = (f"onnxruntime static int8: {quant_format}, activations {activation_type}, "
                             f"per-channel weights {per_channel}, reduce_range {reduce_range}, "
                             f"{calibrate_method} calibration on {reader.images} images ({source})")
    props["calibration"] = json.dumps(calibration)
    proto = onnx.load(str(out_path))
    set_metadata(proto, props)
    onnx.save(proto, str(out_path))
    return calibration


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol: get_next() -> feed dict, None when done. Counts what it
    handed out, so the metadata states what calibration really saw."""

    def __init__(self, images: np.ndarray, batch_size: int = 64):
        self._batches = iter([{INPUT_NAME: to_input(images[i:i + batch_size])}
                              for i in range(0, len(images), batch_size)])
        self.images, self._pixel_sum = 0, 0.0

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._batches, None)
        if feed is not None:
            self.images += len(feed[INPUT_NAME])
            self._pixel_sum += float(feed[INPUT_NAME].mean(dtype=np.float64)) * len(feed[INPUT_NAME])
        return feed

    @property
    def pixel_mean(self) -> float:
        return self._pixel_sum / max(self.images, 1)


# --- command line ----------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run directory or model.safetensors")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--int8", action="store_true", help="also write <stem>.int8.onnx (needs --data-dir)")
    p.add_argument("--calib-images", type=int, default=512, metavar="N",
                   help="training images to calibrate int8 on (default: 512)")
    p.add_argument("--max-int8-drop", type=float, default=DEFAULT_MAX_INT8_DROP, metavar="POINTS",
                   help="fail when int8 test accuracy is this many points below fp32; also how far another "
                        "backend may be from the checkpoint's accuracy to be verified (default: %(default)s)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="runtimes to check besides onnxruntime (always the gate): auto = every installed one, "
                        "openvino = OpenVINO too (an error when absent), onnxruntime = none (default: auto)")
    p.add_argument("--data-dir", metavar="PATH", help="CIFAR-10 (see fastcifar.data): real test images for the "
                   "check and accuracy, training images for calibration (default: random images, no int8)")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: the exporter's)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def int8_path(out: Path) -> Path:
    """model.onnx -> model.int8.onnx, next to it."""
    return out.with_name(f"{out.stem if out.suffix == '.onnx' else out.name}.int8.onnx")


def _check_args(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"output directory does not exist ({out.parent}): create it or pass another --out")
    if out.is_dir():
        raise UserError(f"--out is a directory ({out}): pass a file name such as {out / 'model.onnx'}")
    if args.int8 and args.data_dir is None:
        raise UserError("--int8 needs calibration data: pass --data-dir")
    newest = onnx.defs.onnx_opset_version()
    if args.opset is not None and not MIN_OPSET <= args.opset <= newest:
        raise UserError(f"--opset must be between {MIN_OPSET} and {newest} (this onnx), got {args.opset}")
    if args.calib_images < 1:
        raise UserError(f"--calib-images must be >= 1, got {args.calib_images}")
    if not 0 <= args.max_int8_drop <= 100:  # NaN fails too
        raise UserError(f"--max-int8-drop must be between 0 and 100 accuracy points, got {args.max_int8_drop}")
    if args.backend == "openvino" and openvino_version() is None:
        raise UserError(f"--backend openvino: OpenVINO is not installed; {INSTALL_OPENVINO} or pass "
                        "--backend onnxruntime")
    return out


def checked_backends(choice: str) -> list[str]:
    """The backends `--backend` asks the export to check, onnxruntime first."""
    return ["onnxruntime"] if choice == "onnxruntime" else installed_backends()


def _sample(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed random subset: the splits are sorted by class, so a prefix would be one class only."""
    keep = np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False)
    return images[np.sort(keep)]


def _percent(acc: float | None) -> str:
    if acc is None:
        return "not stored"
    return f"{100 * acc:.2f}%"  # fastcifar.train stores a fraction


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    out = _check_args(args)
    backends = checked_backends(args.backend)
    model, info = load_model(args.checkpoint)
    data = None
    if args.data_dir is not None:
        from fastcifar.data import load_cifar10

        data = load_cifar10(args.data_dir, download=False)
    check_images = (_sample(data.test_images, PARITY_IMAGES, seed=0) if data is not None else
                    np.random.default_rng(0).integers(0, 256, (RANDOM_IMAGES, 32, 32, 3), dtype=np.uint8))
    records: dict[Path, dict] = {}
    with atomic_path(out) as tmp:
        print(f"exported with {export_onnx(model, info, tmp, args.opset)}")
        print(f"parity with PyTorch ({'test' if data is not None else 'random'} images): "
              f"{verify(model, info, tmp, check_images)}")
        ort = make_runner(tmp)
        acc = logits = None
        if data is not None:
            acc, logits = accuracy(ort, data.test_images, data.test_labels)
            print(f"accuracy on the {len(data.test_labels)} test images: onnx fp32 {_percent(acc)}, "
                  f"{check_accuracy(acc, info, len(data.test_labels))}")
        print(f"{out.name} under {', '.join(backends)}:")
        records[out] = check_backends(tmp, acc, run_batches(ort, check_images), check_images, data, backends,
                                      args.max_int8_drop)
        if args.int8:
            path = int8_path(out)
            records[path] = _export_int8(tmp, path, data, acc, logits, args, backends, check_images)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    for path, record in records.items():  # after the models: a record names its file's SHA-256
        record["file"] = path.name  # it was checked under its temporary name
        write_json(record_path(path), record)
        print(f"wrote {record_path(path)}")
    return 0


def _export_int8(fp32_tmp: Path, out: Path, data: CifarData, fp32_acc: float, fp32_logits: np.ndarray,
                 args: argparse.Namespace, backends: Sequence[str], check_images: np.ndarray) -> dict:
    """Quantize, check, gate on the accuracy drop and report; the file is renamed into place only if all of it
    succeeds (and the caller's fp32 file only after that). Returns the int8 file's verification record."""
    calib = _sample(data.train_images, args.calib_images, seed=CALIB_SEED)
    if len(calib) < args.calib_images:
        print(f"note: only {len(calib)} training images: calibrating on all of them, not {args.calib_images}")
    with atomic_path(out) as tmp:
        used = quantize_int8(fp32_tmp, tmp, calib, source=f"training split of {data.source}, random sample "
                             f"(seed {CALIB_SEED})")
        check_file(tmp)
        ort = make_runner(tmp)
        acc, logits = accuracy(ort, data.test_images, data.test_labels)
        drop = 100 * (fp32_acc - acc)
        agreement = compare(logits, fp32_logits).agreement
        print(f"int8 accuracy: {_percent(acc)}, drop vs fp32 {drop:+.2f} points (limit --max-int8-drop "
              f"{args.max_int8_drop}); top-1 agreement with fp32 {100 * agreement:.2f}%; calibrated on "
              f"{used['images']} images (mean pixel {used['pixel_mean']:.3f})")
        if drop > args.max_int8_drop:
            raise UserError(f"int8 test accuracy {_percent(acc)} is {drop:.2f} points below fp32 {_percent(fp32_acc)} "
                            f"(limit --max-int8-drop {args.max_int8_drop}): calibrate on more --calib-images or "
                            "raise the limit; nothing was written")
        print(f"{out.name} under {', '.join(backends)}:")
        record = check_backends(tmp, acc, run_batches(ort, check_images), check_images, data, backends,
                                args.max_int8_drop)
        record["calibration"] = used
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return record


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="export.onnx"))
