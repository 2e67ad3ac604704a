"""Export a trained fastcifar model to ONNX for CPU inference, verified against PyTorch on every export.

    python -m export.onnx --checkpoint runs/default --out model.onnx

The graph takes what torchvision's `to_tensor` or `cv2.dnn.blobFromImage(img, 1/255, swapRB=True)` give:
input `input`, float32 NCHW RGB in [0, 1], any batch size; it normalizes with the training mean/std inside
and returns `logits` (N, classes); with `--tta`, the weighted mean over the trainer's TTA views (`tta_plan`).
Class names, mean/std, the TTA and the run's test accuracy are in the model's metadata_props. A file replaces
nothing until it passed every check (docs/export.md: the checks, int8, the `<file>.verified.json` record).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
import numpy as np
import torch
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

from export.backends import BACKENDS, Runner, file_digest, installed_backends, make_runner, record_path, \
    require_openvino
from export.predict import run_batches, to_input
from fastcifar import __version__
from fastcifar.atomic import atomic_path, write_json
from fastcifar.checkpoint import ModelInfo, load_model, unwrap
from fastcifar.data import CifarData, load_cifar10
from fastcifar.errors import UserError, first_line, require, run_cli
from fastcifar.evaluate import apply_view, describe_views, tta_logits, tta_plan

try:
    import onnx
except ModuleNotFoundError:  # main says, in one line, what to install
    onnx = None

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
TTA_CHOICES = ("off", "auto", "flip", *(f"flip-translate{t}" for t in range(1, 5)))  # TrainConfig's 0-4 pixels


class InferenceGraph(nn.Module):
    """The exported function: [0, 1] RGB NCHW -> normalize -> model -> logits."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


class WithTTA(nn.Module):
    """`model` averaged over the TTA views of `tta_plan(flip, translate)`: all views in one batch (one model call
    of N x views images), then the weighted sum of their logits."""

    def __init__(self, model: nn.Module, flip: bool, translate: int):
        super().__init__()
        self.net, self.views = model, tta_plan(flip, translate)
        self.label = describe_views({"flip": flip, "translate": translate})
        self.register_buffer("weights", torch.tensor([v.weight for v in self.views]).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(torch.cat([apply_view(x, view) for view in self.views]))
        return (logits.unflatten(0, (len(self.views), -1)) * self.weights).sum(0)


# --- export ----------------------------------------------------------------------------------------------

def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each conv-[pool]-BN-ReLU block folded into conv(+bias)-ReLU-[pool].

    The exporters fold BN only when it directly follows the conv, and the float BN nodes left after our pools
    split the int8 graph into DequantizeLinear/BN/QuantizeLinear islands (bench/RESULTS.md: the speed this
    gains). Folding through the max-pool is exact when every BN scale is positive (max commutes with a positive
    per-channel affine map), and ReLU commutes with max-pool, so ReLU moves next to the conv where onnxruntime
    fuses it; blocks with a non-positive scale are left as they are.
    """
    model = copy.deepcopy(model).eval()
    for block in model.modules():
        kinds = [type(m) for m in block] if isinstance(block, nn.Sequential) else []
        if kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]:
            block[0], block[1] = fuse_conv_bn_eval(block[0], block[1]), nn.Identity()
        elif kinds == [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU] and (block[2].weight > 0).all():
            # the BN scale weight / sqrt(var + eps) has the weight's sign
            conv, pool = fuse_conv_bn_eval(block[0], block[2]), block[1]
            block[0], block[1], block[2], block[3] = conv, nn.ReLU(), pool, nn.Identity()
    return model


def export_onnx(model: nn.Module, info: ModelInfo, path: str | Path, opset: int | None = None) -> str:
    """Write the model (a `WithTTA` for a graph with TTA) as ONNX (weights inline, metadata set) to `path`;
    return the exporter and opset. Prefers the torch.export-based exporter (`dynamo=True`); falls back to the
    TorchScript one only if that raises: the new one is the maintained path and gives a cleaner graph."""
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
    onnx.helper.set_model_props(proto, {  # everything a consumer needs besides the graph
        "classes": json.dumps(info.classes), "mean": json.dumps(info.mean), "std": json.dumps(info.std),
        "input_format": INPUT_FORMAT, "output": "logits (N, classes); softmax gives probabilities",
        "test_acc": json.dumps(info.test_acc), "run_extra": json.dumps(info.extra),  # e.g. test_acc_tta
        "model_config": json.dumps(asdict(info.config)), "fastcifar_version": __version__, "exporter": exporter,
        "tta": getattr(model, "label", "plain"),  # and the views with their weights:
        "tta_views": json.dumps({v.name: v.weight for v in getattr(model, "views", tta_plan(False))})})
    proto.doc_string = f"fastcifar ResNet-9 (width {info.config.width}); input '{INPUT_NAME}' {INPUT_FORMAT}, " \
                       f"output '{OUTPUT_NAME}'"
    onnx.save(proto, str(path))
    return f"{exporter}, opset {opset_of(proto)}"


def _export_dynamo(graph: nn.Module, example: torch.Tensor, opset: int | None) -> onnx.ModelProto:
    # For an opset it cannot target, this exporter logs a warning and a traceback and keeps its own opset:
    # the check below says so in one line instead.
    quiet_before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        program = torch.onnx.export(graph, (example,), None, dynamo=True, verbose=False, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    finally:
        logging.disable(quiet_before)
    proto = program.model_proto
    if opset is not None and opset_of(proto) != opset:
        raise RuntimeError(f"asked for opset {opset}, got {opset_of(proto)}")
    return proto


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
    expected top two logits lie more than `tie` apart (an exact tie never counts)."""
    decided = np.ptp(np.sort(expected, axis=1)[:, -2:], axis=1) > tie
    agreement = float((got.argmax(1) == expected.argmax(1))[decided].mean()) if decided.any() else 1.0
    return Parity(len(got), float(np.abs(got - expected).max()), agreement, int((~decided).sum()))


@torch.no_grad()
def reference_logits(model: nn.Module, info: ModelInfo, images: np.ndarray, batch_size: int = 256,
                     tta: tuple[bool, int] = (False, 0)) -> np.ndarray:
    """The independent reference for uint8 (N, 32, 32, 3) images: the unwrapped, unfolded PyTorch model on images
    normalized here from the checkpoint's mean/std, with `tta` (flip, translate) averaged by the trainer's own
    `tta_logits`. It shares no code with the exported graph (`InferenceGraph`, `WithTTA`, `fold_batchnorm`) nor
    its input (`to_input`), so a graph that lost or changed its normalization, a view or a weight cannot agree."""
    mean, std = np.asarray(info.mean, dtype=np.float32), np.asarray(info.std, dtype=np.float32)
    normalized = torch.from_numpy(((images.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2))
    net, (flip, translate) = unwrap(model).eval(), tta
    return torch.cat([tta_logits(net, batch.contiguous(), translate) if flip else net(batch.contiguous())
                      for batch in normalized.split(batch_size)]).numpy()


def check_file(path: str | Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise UserError(f"exported model fails onnx.checker: {first_line(e, 300)}") from e


def verify(model: nn.Module, info: ModelInfo, path: str | Path, images: np.ndarray,
           tta: tuple[bool, int]) -> Parity:
    """`check_file`, then onnxruntime on raw [0, 1] images against `reference_logits` (same TTA); UserError if off."""
    check_file(path)
    # Logits within MAX_LOGIT_DIFF of the reference may swap the top two classes where those lie within twice
    # that: random images hold such near-ties, and which way they fall depends on the CPU's rounding. On any
    # other image a different class means a logit moved by more than the limit.
    parity = compare(run_batches(make_runner(path), images), reference_logits(model, info, images, tta=tta),
                     tie=2 * MAX_LOGIT_DIFF)
    if not parity.ok:
        raise UserError(f"ONNX output does not match PyTorch: {parity}; nothing was written")
    return parity


def check_accuracy(acc: float, info: ModelInfo, images: int, tta: tuple[bool, int] = (False, 0),
                   own_tta: tuple[bool, int] | None = (False, 0)) -> str:
    """Fail unless the ONNX fp32 test accuracy is within MAX_ACC_DIFF points of the checkpoint's stored one with
    the same TTA: `test_acc` without, `test_acc_tta` with the run's own TTA `own_tta` (None: unknown); there is
    none for another TTA. Returns the report."""
    label = describe_views({"flip": tta[0], "translate": tta[1]}) if tta[0] else "no TTA"
    stored = info.test_acc if not tta[0] else (info.extra.get("test_acc_tta") if tta == own_tta else None)
    if stored is None:
        return f"the checkpoint stores no test accuracy{f' with {label}' if tta[0] else ''}: accuracy gate skipped"
    diff = 100 * abs(acc - stored)
    if diff > MAX_ACC_DIFF:
        raise UserError(f"ONNX fp32 test accuracy {_percent(acc)} differs from the checkpoint's "
                        f"{_percent(stored)} ({label}) by {diff:.2f} points (limit {MAX_ACC_DIFF}) on {images} "
                        "test images: the graph is wrong or --data-dir is not the data the model was evaluated on; "
                        "nothing was written")
    return f"within {diff:.2f} points of the checkpoint's {_percent(stored)} (limit {MAX_ACC_DIFF}, {label})"


def checkpoint_tta(info: ModelInfo, checkpoint: str | Path) -> tuple[bool, int] | None:
    """(flip, translate) of the TTA whose accuracy the checkpoint stores as test_acc_tta; None when unknown (a
    model file whose metadata has no `tta`, without its run's summary.json next to it)."""
    if info.extra.get("test_acc_tta") is None:
        return False, 0
    if (tta := info.extra.get("tta")) is None:
        folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        try:
            tta = json.loads((folder / "summary.json").read_text())["tta"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return (True, int(tta["translate"])) if tta and tta["flip"] else (False, 0)


def requested_tta(choice: str, own: tuple[bool, int] | None) -> tuple[bool, int]:
    """(flip, translate) for a --tta choice (TTA_CHOICES); `own` is the checkpoint's (`checkpoint_tta`)."""
    if choice == "auto":
        if own is None:
            raise UserError("--tta auto: the checkpoint does not say which TTA its run used (a model file written "
                            "before fastcifar stored it, without its run's summary.json): pass --tta off, flip or "
                            "flip-translateN")
        return own
    return choice != "off", int(choice.removeprefix("flip-translate")) if "translate" in choice else 0


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


def check_backends(name: str, path: Path, ort: Runner, ort_acc: float | None, check_images: np.ndarray,
                   data: CifarData | None, backends: Sequence[str], max_diff: float) -> dict:
    """The verification record of the file `name` (still at its temporary `path`, `ort` running it) under each of
    `backends`, printed. A backend other than onnxruntime (gated already) is verified when its test accuracy is
    within `max_diff` points of `ort_acc`; one that cannot run the file is recorded as failed, never raised."""
    ort_logits = run_batches(ort, check_images)
    checks = [BackendCheck("onnxruntime", ort.version, "f32", True,
                           "passed the export's gates" if ort_acc is not None else "parity only (no --data-dir)",
                           ort_acc)]
    for backend in (b for b in backends if b != "onnxruntime"):
        try:
            runner = make_runner(path, backend, "throughput")
            agreement = compare(run_batches(runner, check_images), ort_logits).agreement
            acc = accuracy(runner, data.test_images, data.test_labels)[0] if data is not None else None
        except Exception as e:  # each runtime raises its own types
            checks.append(BackendCheck(backend, "?", "?", False, f"failed: {type(e).__name__}: {first_line(e)}"))
            continue
        diff = 100 * abs(acc - ort_acc) if acc is not None else None
        reason = ("no --data-dir: test accuracy not measured" if diff is None else f"{diff:.2f} points from "
                  f"onnxruntime's {_percent(ort_acc)} on this file, limit {max_diff} (--max-int8-drop)")
        checks.append(BackendCheck(backend, runner.version, runner.precision, diff is not None and diff <= max_diff,
                                   reason, acc, agreement))
    print(f"{name} under {', '.join(backends)}:", *checks, sep="\n  ")
    return {"file": name, "sha256": file_digest(path), "fastcifar_version": __version__,
            "test_data": data.source if data is not None else None,
            "test_images": len(data.test_labels) if data is not None else 0,
            "backends": {c.backend: asdict(c) for c in checks}}


# --- int8 ------------------------------------------------------------------------------------------------

def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib_images: np.ndarray, *,
                  source: str = "random images") -> dict:
    """Static int8 quantization of the fp32 model with onnxruntime, calibrated on uint8 NHWC images, with the
    settings that measured fastest while accurate (bench/RESULTS.md); the metadata says what it used."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    feeds = ({INPUT_NAME: to_input(calib_images[i:i + 64])} for i in range(0, len(calib_images), 64))

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    with tempfile.TemporaryDirectory(prefix="fastcifar-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference (meant for transformers) cannot follow ReduceMax -> Reshape in our graph;
        # ONNX's own shape inference, which quantization needs, still runs.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        # onnxruntime warns "Axis 1 is out-of-range for weight '...' with rank 1" for each 1-D weight (the scale of
        # a batch norm fold_batchnorm left) and quantizes it per tensor, as it must: noise to the reader
        per_tensor = lambda record: "is out-of-range for weight" not in record.getMessage()  # noqa: E731
        logging.root.addFilter(per_tensor)
        try:
            quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            logging.root.removeFilter(per_tensor)
    calibration = {"method": "MinMax", "images": len(calib_images),
                   "pixel_mean": round(float(calib_images.mean()) / 255, 4), "source": source}
    proto = onnx.load(str(out_path))
    onnx.helper.set_model_props(proto, {
        **{p.key: p.value for p in proto.metadata_props}, "calibration": json.dumps(calibration),
        "quantization": f"onnxruntime static int8: QDQ, activations QUInt8, per-channel weights True, reduce_range "
                        f"False, MinMax calibration on {len(calib_images)} images ({source})"})
    onnx.save(proto, str(out_path))
    return calibration


# --- command line ----------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run directory or model.safetensors")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--int8", action="store_true", help="also write <stem>.int8.onnx (needs --data-dir)")
    p.add_argument("--calib-images", type=int, default=512, metavar="N",
                   help="training images to calibrate int8 on (default: 512)")
    p.add_argument("--max-int8-drop", type=float, default=DEFAULT_MAX_INT8_DROP, metavar="POINTS",
                   help="fail when int8 test accuracy is this many points below fp32; also how far another backend may "
                        "be from onnxruntime's accuracy on the same file to be verified (default: %(default)s)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="runtimes to check besides onnxruntime (always the gate): auto = every installed one, "
                        "openvino = OpenVINO too (an error when absent), onnxruntime = none (default: auto)")
    p.add_argument("--data-dir", metavar="PATH", help="CIFAR-10 (see fastcifar.data): real test images for the "
                   "check and accuracy, training images for calibration (default: random images, no int8)")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: the exporter's)")
    p.add_argument("--tta", choices=TTA_CHOICES, default="off", help="test-time augmentation inside the graph, as the "
                   "trainer averages it: auto = the checkpoint's own (its accuracy with TTA is then the file's), "
                   "flip, flip-translateN = flip + views shifted by N pixels (default: off)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def int8_path(out: Path) -> Path:
    """model.onnx -> model.int8.onnx, next to it."""
    return out.with_name(f"{out.stem if out.suffix == '.onnx' else out.name}.int8.onnx")


def _check_args(args: argparse.Namespace) -> Path:
    for module in ("onnx", "onnxruntime"):
        require(module, "onnx")
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
    if args.backend == "openvino":
        require_openvino()
    return out


def _sample(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed random subset: the splits are sorted by class, so a prefix would be one class only."""
    keep = np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False)
    return images[np.sort(keep)]


def _percent(acc: float) -> str:
    return f"{100 * acc:.2f}%"  # fastcifar.train stores a fraction


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    out = _check_args(args)
    backends = ["onnxruntime"] if args.backend == "onnxruntime" else installed_backends()
    model, info = load_model(args.checkpoint)
    own_tta = checkpoint_tta(info, args.checkpoint)
    tta = requested_tta(args.tta, own_tta)
    data = load_cifar10(args.data_dir, download=False) if args.data_dir is not None else None
    check_images = (_sample(data.test_images, PARITY_IMAGES, seed=0) if data is not None else
                    np.random.default_rng(0).integers(0, 256, (RANDOM_IMAGES, 32, 32, 3), dtype=np.uint8))
    records: dict[Path, dict] = {}
    with atomic_path(out) as tmp:
        graph = WithTTA(unwrap(model), *tta) if tta[0] else model
        inside = f"; {graph.label} inside: {len(graph.views)} views averaged" if tta[0] else ""
        print(f"exported with {export_onnx(graph, info, tmp, args.opset)}{inside}")
        print(f"parity with PyTorch ({'test' if data is not None else 'random'} images{', same TTA' * tta[0]}): "
              f"{verify(model, info, tmp, check_images, tta)}")
        ort = make_runner(tmp)
        acc = logits = None
        if data is not None:
            acc, logits = accuracy(ort, data.test_images, data.test_labels)
            print(f"accuracy on the {len(data.test_labels)} test images: onnx fp32 {_percent(acc)}, "
                  f"{check_accuracy(acc, info, len(data.test_labels), tta, own_tta)}")
        records[out] = check_backends(out.name, tmp, ort, acc, check_images, data, backends, args.max_int8_drop)
        if args.int8:
            path = int8_path(out)
            records[path] = _export_int8(tmp, path, data, acc, logits, args, backends, check_images)
    for path, record in records.items():  # after the models: a record names its file's SHA-256
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
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
        record = check_backends(out.name, tmp, ort, acc, check_images, data, backends, args.max_int8_drop)
        record["calibration"] = used
    return record


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="export.onnx"))
