"""Evaluation: test-time augmentation (flip, translate) and the evaluation loop, plus a command line that
evaluates a saved model on the test split plain, with flip TTA and with flip + translate TTA.

    python -m fastcifar.evaluate --checkpoint runs/default --data-dir ../shared/data/cifar10-png.tar.gz
    python -m fastcifar.evaluate --checkpoint runs/default --json      # the same numbers as data
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastcifar.augment import IGNORE_LABEL, DeviceLoader
from fastcifar.checkpoint import load_model
from fastcifar.config import ArgumentParser, TrainConfig, validate
from fastcifar.data import load_cifar10
from fastcifar.distributed import Dist, all_reduce, gather_interleaved
from fastcifar.errors import run_cli
from fastcifar.runtime import amp_dtype, autocast, environment, select_device

ACCURACY_UNIT = "fraction"  # every accuracy in a dict or the JSON: correct / total (the console shows percentages)


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images translated by (dy, dx) pixels, the uncovered border filled by reflection."""
    pad = max(abs(dy), abs(dx))
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    return padded[..., pad - dy:pad - dy + x.shape[-2], pad - dx:pad - dx + x.shape[-1]]


@dataclass(frozen=True)
class View:
    """One TTA view: the image, mirrored when `flip`, then shifted `shift` pixels down and right, logits x `weight`."""
    name: str
    flip: bool
    shift: int
    weight: float


def tta_plan(flip: bool, translate: int = 0) -> list[View]:
    """The TTA views and weights that evaluation, the trainer's warm-up and export.onnx's graph all use. Without
    `flip`, the image alone; with it, the image and its mirror 1:1 and, with `translate`, that pair at half weight
    and the other half spread over both shifted by +translate and by -translate (airbench's TTA level 2)."""
    if not flip:
        return [View("identity", False, 0, 1.0)]
    pair = 0.5 if translate else 1.0
    views = [View("identity", False, 0, pair / 2), View("flip", True, 0, pair / 2)]
    return views + [View(f"{'flip+' * mirror}shift{t:+d}", mirror, t, 0.125)
                    for t in ((translate, -translate) if translate else ()) for mirror in (False, True)]


def tta_views(flip: bool, translate: int) -> list[str]:
    """The names of the views whose logits are averaged (`tta_plan`)."""
    return [view.name for view in tta_plan(flip, translate)]


def apply_view(x: torch.Tensor, view: View) -> torch.Tensor:
    x = x.flip(3) if view.flip else x
    return shift(x, view.shift, view.shift) if view.shift else x


def tta_inputs(x: torch.Tensor, translate: int = 0) -> list[torch.Tensor]:
    """The batches tta_logits runs the model on, in `tta_plan`'s order. All come in `x`'s dtype and memory
    format, so a compiled model sees one input signature and never recompiles: a reflection pad may return
    another layout (CUDA: contiguous NCHW) or, under CPU autocast, fp32."""
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    views = [apply_view(x, view) for view in tta_plan(True, translate)]
    return [x] + [v.to(x.dtype).contiguous(memory_format=layout) for v in views[1:]]


def owned_float(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logits that the model's next call cannot overwrite: with --compile-mode reduce-overhead each
    CUDA-graph replay writes into the same output buffer, and `.float()` of fp32 logits is that buffer."""
    return logits.float() if logits.dtype != torch.float32 else logits.clone()


def tta_logits(model: nn.Module, x: torch.Tensor, translate: int = 0) -> torch.Tensor:
    """The `tta_plan` weighted sum of the logits of the image, its mirror and, with `translate`, both shifted."""
    weights = [view.weight for view in tta_plan(True, translate)]
    return sum(w * owned_float(model(v)) for w, v in zip(weights, tta_inputs(x, translate), strict=True))


def evaluation_record(result: dict[str, Any], flip: bool, translate: int) -> dict[str, Any]:
    """One evaluation as data: which TTA views were averaged and the accuracy (a fraction) and loss."""
    return {"flip": flip, "translate": translate if flip else 0, "views": tta_views(flip, translate),
            "test_acc": result["acc"], "test_loss": result["loss"]}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None,
             tta: bool = False, dist: Dist = Dist(), tta_translate: int = 0) -> dict[str, Any]:
    """Loss, accuracy, predictions and labels on `loader`, plain or with `tta` (tta_logits); the filler of a
    padded last batch (IGNORE_LABEL) counts nowhere; under torchrun the ranks' shards are summed and gathered."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    preds, labels_all = [], []
    for inputs, labels in loader:
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = tta_logits(model, inputs, tta_translate) if tta else owned_float(model(inputs))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_LABEL)
        preds.append(logits.argmax(1))
        labels_all.append(labels)
    preds_t, labels_t = torch.cat(preds), torch.cat(labels_all)
    served = labels_t != IGNORE_LABEL  # one mask (and one sync) for the whole pass, not one per batch
    preds_t, labels_t = preds_t[served], labels_t[served]
    counts = torch.stack([loss_sum, (preds_t == labels_t).sum().float(),
                          torch.tensor(len(labels_t), device=device, dtype=torch.float32)])
    loss, correct, total = all_reduce(counts, dist).tolist()
    return {"loss": loss / total, "acc": correct / total,
            "preds": gather_interleaved(preds_t, dist, int(total)).cpu().numpy(),
            "labels": gather_interleaved(labels_t, dist, int(total)).cpu().numpy()}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fastcifar.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run directory or its model.safetensors")
    parser.add_argument("--data-dir", help="data source, as for training (default: the cache)")
    parser.add_argument("--tta-translate", type=int, default=1, help="pixels of the translated TTA views")
    parser.add_argument("-b", "--batch-size", type=int, default=500)
    parser.add_argument("--device", default="auto", help="auto, cpu, mps, cuda or cuda:N")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--amp-dtype", choices=("auto", "bf16", "fp16"), default="auto",
                        help="auto = bf16 where the device computes in it natively, else fp16")
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON object (accuracies as fractions) instead of a table")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # the flags shared with training obey training's checks
    validate(TrainConfig(batch_size=args.batch_size, tta_translate=args.tta_translate, device=args.device))
    device = select_device(args.device)
    model, info = load_model(args.checkpoint, device)
    model = model.to(memory_format=torch.channels_last)
    data = load_cifar10(args.data_dir)
    dtype = amp_dtype(device, args.amp, args.amp_dtype)
    loader = DeviceLoader(data.test_images, data.test_labels, mean=info.mean, std=info.std,
                          batch_size=args.batch_size, train=False, pad_last=True, device=device,
                          dtype=dtype or torch.float32)
    records = [evaluation_record(evaluate(model, loader, device, dtype, tta=flip, tta_translate=pixels), flip, pixels)
               for flip, pixels in ((False, 0), (True, 0), (True, args.tta_translate))]
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "test_images": len(data.test_labels),
                          "accuracy_unit": ACCURACY_UNIT, "evaluations": records, "environment": environment(device)},
                         indent=2))
    else:
        for record in records:
            print(f"{describe_views(record):<28} {100 * record['test_acc']:6.2f}%")
    return 0


def describe_views(record: dict[str, Any]) -> str:
    """A person's name for an evaluation record: 'plain', 'flip TTA', 'flip + translate 1 TTA'."""
    if not record["flip"]:
        return "plain"
    return f"flip + translate {record['translate']} TTA" if record["translate"] else "flip TTA"


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.evaluate"))
