"""Classify image files with an exported model: onnxruntime, Pillow and numpy only (no torch).

    python -m export.predict model.onnx cat.png dog.jpg
    python -m export.predict model.int8.onnx photos/*.jpg --top 3

One line per file: `file<TAB>class<TAB>probability` (softmax), or with `--top K` the K best as
`class probability` pairs. Class names come from the model's metadata (written by `export.onnx`). Images
that are not 32x32 are resized (bilinear, as a note on stderr); a file that cannot be read is reported on
stderr and the others are still classified. Exit code: 0, 1 if any file failed, 2 for usage errors (a
missing or invalid model file).

The helpers here (`make_session`, `to_input`, `run_batches`) are also what `export.onnx` verifies with, so
the checked path and the deployed path are the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

# fastcifar.errors is torch-free; tests/test_export.py checks this module stays so
from fastcifar.errors import UserError, first_line, run_cli

IMAGE_SIZE = 32
EXIT_SOME_FAILED = 1


def make_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """A CPU InferenceSession with all graph optimizations; `threads` sets intra-op threads (None: ORT's
    default, one per physical core)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> float32 (N, 3, H, W) in [0, 1], the layout the graph takes."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def run_batches(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits (N, classes) for uint8 (N, H, W, 3) images, in batches to bound memory."""
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: to_input(images[i:i + batch_size])})[0]
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def load_classifier(path: str | os.PathLike) -> tuple[ort.InferenceSession, list[str]]:
    """Session and class names of an exported model; UserError when missing or not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model not found ({path}): pass the .onnx file written by `python -m export.onnx`")
    try:
        session = make_session(path)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types for unreadable files
        raise UserError(f"invalid ONNX model ({path}): {first_line(e)}") from e
    meta = session.get_modelmeta().custom_metadata_map
    try:
        classes = json.loads(meta["classes"])
    except (KeyError, ValueError) as e:
        raise UserError(f"no class names in the metadata of {path}: export it with `python -m export.onnx`") from e
    return session, [str(c) for c in classes]


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 (32, 32, 3) RGB. Other sizes are resized (bilinear) with a note on stderr; OSError when the
    file is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except UnidentifiedImageError as e:
        raise OSError("not an image (expected PNG, JPEG, ...)") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated or damaged files
        raise OSError(str(e) or type(e).__name__) from e
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        print(f"note: {path}: resized {rgb.size[0]}x{rgb.size[1]} to {IMAGE_SIZE}x{IMAGE_SIZE} (bilinear)",
              file=sys.stderr)
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(rgb)


def format_prediction(name: str, probs: np.ndarray, classes: Sequence[str], top: int) -> str:
    order = np.argsort(-probs)[:top]
    if top == 1:
        return f"{name}\t{classes[order[0]]}\t{probs[order[0]]:.4f}"
    return name + "\t" + "\t".join(f"{classes[i]} {probs[i]:.4f}" for i in order)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.predict",
                                description="Classify image files with an ONNX model exported by export.onnx.")
    p.add_argument("model", help="the .onnx file (fp32 or int8)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size; resized to 32x32)")
    p.add_argument("--top", type=int, default=1, metavar="K", help="print the K most likely classes (default: 1)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    session, classes = load_classifier(args.model)
    if not 1 <= args.top <= len(classes):
        raise UserError(f"--top must be between 1 and {len(classes)}, got {args.top}")
    loaded: list[tuple[str, np.ndarray]] = []
    for name in args.images:
        try:
            loaded.append((name, read_image(name)))
        except OSError as e:
            print(f"export.predict: error: {name}: {e}", file=sys.stderr)
    if loaded:
        probs = softmax(run_batches(session, np.stack([image for _, image in loaded])))
        for (name, _), p in zip(loaded, probs):
            print(format_prediction(name, p, classes, args.top))
    return EXIT_SOME_FAILED if len(loaded) < len(args.images) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="export.predict"))
