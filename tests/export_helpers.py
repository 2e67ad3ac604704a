"""What the export tests share: a tiny model trained on learnable data until it decides every image the
tests read clearly, and the export command run in-process with its output captured. Their fixtures on it
(shared, tiny_data, checkpoint, export_output, exported) are in conftest.py.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fastcifar.errors import run_cli
from synthetic import learnable_images, write_learnable_dataset

# The export tests compare classes and accuracies to the image (100 test images: one is a point), which holds
# on every CPU only when no image is near a tie. Each image they read is decided by the fp32 model with its
# top two logits at least CLEAR_MARGIN apart, and by the int8 file and by bf16 arithmetic (Zen 4, AMX:
# PyTorch and OpenVINO) still by half of it (test_export.py checks all three), so neither the rounding of
# another CPU nor another runtime can change a class.
CLEAR_MARGIN = 1.0


def learnable_data(root: Path) -> Path:
    """Image folders whose class is a colour plus noise: 10 classes x 20 train and 10 test PNGs."""
    return write_learnable_dataset(root, train_per_class=20, test_per_class=10)


def train_tiny(run: Path, data: Path) -> Path:
    """model.safetensors of a width-8 model trained by fastcifar.train for 160 steps on `data` until it decides
    every image by CLEAR_MARGIN. fp32 (--no-amp) on every CPU, its test accuracy stored from that fp32
    evaluation; the recipe values that shape its logits pinned, so a change of the defaults leaves it alone."""
    from fastcifar.train import main as train_main

    recipe = ["--width", "8", "--batch-size", "20", "--epochs", "16", "--lr", "0.4", "--label-smoothing", "0.2",
              "--logit-scale", "0.125"]
    assert train_main(["--data-dir", str(data), "--out-dir", str(run), *recipe, "--device", "cpu", "--no-amp",
                       "--no-plots", "--no-tta"]) == 0
    return run / "model.safetensors"


def label_images() -> dict[str, np.ndarray]:
    """The images, besides the test split, whose predicted classes the export tests compare across runtimes."""
    return {"openvino vs onnxruntime": learnable_images(4, seed=5)[0][:37],
            "predict's photos": learnable_images(2, seed=3)[0][:12]}


def lead(logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per image, how far the logit of its class in `classes` lies above the best other one (negative: another
    class wins)."""
    rows = np.arange(len(logits))
    others = logits.copy()
    others[rows, classes] = -np.inf
    return logits[rows, classes] - others.max(axis=1)


def run_export(*argv: str) -> tuple[int, str, str]:
    """`python -m export.onnx argv` in-process: (exit code, stdout, stderr)."""
    from export.onnx import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(main, list(argv), prog="export.onnx")
    return code, out.getvalue(), err.getvalue()


@dataclass
class SharedExport:
    data: Path        # the learnable image folders
    checkpoint: Path  # the trained model.safetensors
    onnx: Path        # model.onnx, with model.int8.onnx (16 calibration images) and their records next to it
    stdout: str       # what the export printed


def shared_export(tmp_path_factory) -> SharedExport:
    """Data, trained model and export made once per test session (test_export.py, test_backends.py and
    test_predict.py share them: training and exporting are most of their time). Read-only for the tests."""
    root = tmp_path_factory.getbasetemp() / "export-shared"
    log = root / "export-stdout.txt"
    if not log.exists():
        root.mkdir(exist_ok=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FASTCIFAR_HOME", str(root / "home"))
            data = learnable_data(root / "data")
            checkpoint = train_tiny(root / "run", data)
            (root / "out").mkdir()
            code, stdout, stderr = run_export("--checkpoint", str(checkpoint), "--out", str(root / "out" / "model.onnx"),
                                              "--int8", "--data-dir", str(data), "--calib-images", "16")
        assert code == 0, stderr
        log.write_text(stdout)
    return SharedExport(root / "data", root / "run" / "model.safetensors", root / "out" / "model.onnx", log.read_text())
