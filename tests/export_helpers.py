"""What the export tests share: a tiny model trained for a few steps on learnable data, and the export
command run in-process with its output captured.

    from export_helpers import train_tiny, run_export
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from fastcifar.errors import run_cli
from synthetic import write_learnable_dataset


def learnable_data(root: Path) -> Path:
    """Image folders whose class is a colour plus noise: 10 classes x 20 train and 10 test PNGs."""
    return write_learnable_dataset(root, train_per_class=20, test_per_class=10)


def train_tiny(run: Path, data: Path) -> Path:
    """model.safetensors of a width-8 model trained by fastcifar.train for 40 steps on `data`, its test
    accuracy stored from an fp32 evaluation (--no-amp), so the ONNX figure may agree with it to the image."""
    from fastcifar.train import main as train_main

    assert train_main(["--data-dir", str(data), "--out-dir", str(run), "--width", "8", "--batch-size", "20",
                       "--epochs", "4", "--device", "cpu", "--no-amp", "--no-plots", "--no-tta"]) == 0
    return run / "model.safetensors"


def run_export(*argv: str) -> tuple[int, str, str]:
    """`python -m export.onnx argv` in-process: (exit code, stdout, stderr)."""
    from export.onnx import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(main, list(argv), prog="export.onnx")
    return code, out.getvalue(), err.getvalue()
