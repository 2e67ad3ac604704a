"""Classify image files with an exported model: onnxruntime or OpenVINO, Pillow and numpy only (no torch).

    python -m export.predict model.onnx cat.png dog.jpg

One line per file: `file<TAB>class<TAB>probability` (softmax), or with `--top K` the K best as
`class probability` pairs; class names come from the model's metadata. A file that cannot be read is
reported on stderr and the others are still classified. Exit code: 0, 1 if any file failed, 2 for usage
errors (a missing or invalid model file, a bad flag). `to_input` and `run_batches` are also what
`export.onnx` verifies with, so the checked path and the deployed path are the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.backends import BACKENDS, MODES, PRECISIONS, Runner, runner_for
# fastcifar.errors is torch-free; tests/test_predict.py checks this module stays so
from fastcifar.errors import UserError, first_line, require, run_cli

IMAGE_SIZE = 32
EXIT_SOME_FAILED = 1
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> float32 (N, 3, H, W) in [0, 1], the layout the graph takes."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def run_batches(runner: Runner, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits (N, classes) for uint8 (N, H, W, 3) images, in batches to bound memory."""
    return np.concatenate([runner.infer(to_input(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def read_metadata(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """(class names, metadata_props) of a model written by export.onnx; UserError when the file is missing, not
    ONNX or without class names."""
    if not Path(path).is_file():
        raise UserError(f"model not found ({path}): pass the .onnx file written by `python -m export.onnx`")
    onnx = require("onnx", "onnx", "export.predict")
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        raise UserError(f"invalid ONNX model ({path}): {first_line(e)}") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        return [str(c) for c in json.loads(meta["classes"])], meta
    except (KeyError, ValueError) as e:
        raise UserError(f"no class names in the metadata of {path}: export it with `python -m export.onnx`") from e


def tta_note(meta: dict[str, str]) -> str | None:
    """What stderr says of a model that averages TTA views inside (`export.onnx --tta`); None for a plain one."""
    views = json.loads(meta.get("tta_views", "{}"))
    if len(views) < 2:
        return None
    weights = ", ".join(f"{name} {weight:g}" for name, weight in views.items())
    return (f"note: {meta['tta']} inside the model: each image's logits are the weighted mean of {len(views)} "
            f"views ({weights})")


def expand_images(names: Sequence[str]) -> list[str]:
    """Files as given; a folder stands for the image files in it and its subfolders (by suffix, sorted), so
    a folder of class folders (the layout training reads) is classified whole."""
    files: list[str] = []
    for name in names:
        folder = Path(name)
        if folder.is_dir():
            found = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"no image files in the folder {folder} or below it "
                                f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        else:
            files.append(name)
    return files


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


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.predict", description=__doc__.splitlines()[0])
    p.add_argument("model", help="the .onnx file (fp32 or int8)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of them (any size; resized "
                   "to 32x32)")
    p.add_argument("--top", type=int, default=1, metavar="K", help="print the K most likely classes (default: 1)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="runtime (default: auto = OpenVINO when installed and verified for this file by export.onnx)")
    p.add_argument("--mode", choices=("auto", *MODES), default="auto",
                   help="latency or throughput settings (default: auto = latency for one image, throughput for more)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per inference call (default: 256)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: one per core)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="OpenVINO: f32 forbids its bf16 inference on CPUs that have bf16 (default: auto)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    names = expand_images(args.images)
    mode = args.mode if args.mode != "auto" else ("latency" if len(names) == 1 else "throughput")
    classes, meta = read_metadata(args.model)
    runner, why = runner_for(args.model, args.backend, mode, args.threads, args.precision)
    if not 1 <= args.top <= len(classes):
        raise UserError(f"--top must be between 1 and {len(classes)}, got {args.top}")
    print(f"note: {runner.backend} {runner.version} ({runner.mode}, {runner.threads} threads, {runner.precision}): "
          f"{why}", file=sys.stderr)
    if (note := tta_note(meta)) is not None:
        print(note, file=sys.stderr)
    loaded: list[tuple[str, np.ndarray]] = []
    for name in names:
        try:
            loaded.append((name, read_image(name)))
        except OSError as e:
            print(f"export.predict: error: {name}: {e}", file=sys.stderr)
    if loaded:
        probs = softmax(run_batches(runner, np.stack([image for _, image in loaded]), args.batch_size))
        pair = "\t" if args.top == 1 else " "  # `class<TAB>probability`, or K `class probability` columns
        for (name, _), p in zip(loaded, probs):
            print(name, *(f"{classes[i]}{pair}{p[i]:.4f}" for i in np.argsort(-p)[:args.top]), sep="\t")
    return EXIT_SOME_FAILED if len(loaded) < len(names) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="export.predict"))
