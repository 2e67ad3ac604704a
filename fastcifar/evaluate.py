"""Evaluate a saved model on the test split: plain, flip TTA, and flip + translate TTA.

    python -m fastcifar.evaluate --checkpoint runs/default --data-dir ../shared/data/cifar10-png.tar.gz
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from fastcifar.config import ArgumentParser
from fastcifar.errors import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fastcifar.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run directory or its model.safetensors")
    parser.add_argument("--data-dir", help="data source, as for training (default: the cache)")
    parser.add_argument("--tta-translate", type=int, default=1, help="pixels of the translated TTA views")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fastcifar.augment import GpuLoader
    from fastcifar.checkpoint import load_model
    from fastcifar.data import load_cifar10
    from fastcifar.train import amp_dtype, evaluate, select_device

    args = get_args_parser().parse_args(argv)
    device = select_device(args.device)
    model, info = load_model(args.checkpoint, device)
    model = model.to(memory_format=torch.channels_last)
    data = load_cifar10(args.data_dir)
    dtype = amp_dtype(device, args.amp)
    loader = GpuLoader(data.test_images, data.test_labels, mean=info.mean, std=info.std,
                       batch_size=args.batch_size, train=False, device=device, dtype=dtype or torch.float32)
    views = [("plain", False, 0), ("flip TTA", True, 0), (f"flip + translate {args.tta_translate} TTA", True,
                                                           args.tta_translate)]
    for name, tta, shift in views:
        acc = evaluate(model, loader, device, dtype, tta=tta, tta_translate=shift)["acc"]
        print(f"{name:<28} {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.evaluate"))
