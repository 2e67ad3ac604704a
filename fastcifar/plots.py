"""Pictures people want to look at: augmented samples, training curves, confusion matrix, mistakes.

    python -m fastcifar.plots --data-dir ../shared/data/cifar10-png.tar.gz --augment-grid grid.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fastcifar.atomic import atomic_path
from fastcifar.errors import UserError, run_cli


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def denormalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalized NHWC floats -> displayable [0, 1] floats."""
    return np.clip(x * np.asarray(std) + np.asarray(mean), 0, 1)


def save_curves(path: str | Path, rows: list[dict[str, Any]], lrs: Sequence[float], steps_per_epoch: int) -> None:
    epochs = [r["epoch"] for r in rows]
    fig, axes = pyplot().subplots(1, 3, figsize=(14, 3.8))
    for ax, key in zip(axes, ("loss", "acc")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", label="train")
        test = [(r["epoch"], r[f"test_{key}"]) for r in rows if not np.isnan(r[f"test_{key}"])]
        if test:
            ax.plot(*zip(*test), "s-", label="test")
        ax.legend()
    axes[2].plot(np.arange(1, len(lrs) + 1) / steps_per_epoch, lrs)
    for ax, title in zip(axes, ("loss", "accuracy", "learning rate")):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def save_confusion(path: str | Path, labels: np.ndarray, preds: np.ndarray, classes: Sequence[str]) -> None:
    """Row-normalized confusion matrix with counts in each cell."""
    k = len(classes)
    cm = np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = pyplot().subplots(figsize=(7.5, 6.5))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, count, ha="center", va="center", fontsize=7, color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"confusion matrix (accuracy {np.trace(cm) / max(cm.sum(), 1):.4f})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)


def save_image_grid(path: str | Path, images: np.ndarray, titles: Sequence[str], title: str, cols: int = 8) -> None:
    """uint8 or [0, 1] float NHWC images in a labeled grid."""
    rows = max(1, -(-len(images) // cols))
    fig, axes = pyplot().subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t in zip(axes.flat, images, titles):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(t, fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def save_misclassified(path: str | Path, images: np.ndarray, labels: np.ndarray, preds: np.ndarray,
                       classes: Sequence[str], count: int = 32) -> None:
    all_wrong = np.flatnonzero(labels != preds)
    # a fixed random sample, so the grid shows mistakes of every class rather than the first class's
    wrong = np.sort(np.random.default_rng(0).permutation(all_wrong)[:count])
    titles = [f"{classes[labels[i]]}\n-> {classes[preds[i]]}" for i in wrong]
    save_image_grid(path, images[wrong], titles, f"misclassified: {len(wrong)} of {len(all_wrong)} (true -> predicted)")


def save_run_plots(out: Path, rows: list[dict[str, Any]], lrs: Sequence[float], steps_per_epoch: int,
                   final: dict[str, Any], data) -> None:
    save_curves(out / "curves.png", rows, lrs, steps_per_epoch)
    save_confusion(out / "confusion.png", final["labels"], final["preds"], data.classes)
    save_misclassified(out / "misclassified.png", data.test_images, final["labels"], final["preds"], data.classes)


def save_augment_grid(data, path: str | Path, seed: int = 0, count: int = 8) -> None:
    """The same `count` training images: original, through the fast path, through the reference pipeline
    (albumentations; without it the grid has two rows and says so)."""
    import torch

    from fastcifar.augment import DeviceLoader

    available = len(data.train_images)
    pick = np.sort(np.random.default_rng(seed).choice(available, size=min(count, available), replace=False))
    images, labels = data.train_images[pick], data.train_labels[pick]
    loader = DeviceLoader(images, labels, mean=data.mean, std=data.std, batch_size=len(pick), seed=seed)
    plan = loader.plan_epoch()
    fast, _ = next(loader.batches(plan))
    fast = fast.permute(0, 2, 3, 1)[torch.argsort(plan.order)]  # back to the picked order, so the columns line up
    rows = {"original": images / 255, "fast path (device)": denormalize(fast.float().numpy(), data.mean, data.std)}
    missing = ""
    try:
        from fastcifar.reference import reference_transform

        tf = reference_transform(data.mean, data.std, train=True)
        rows["reference (albumentations)"] = denormalize(np.stack([tf(image=im)["image"] for im in images]),
                                                         data.mean, data.std)
    except UserError:  # albumentations is not installed: show what we can
        missing = " | reference unavailable: no albumentations"
    titles = [f"{data.classes[label]}\n{row}" if i == 0 else data.classes[label]
              for row in rows for i, label in enumerate(labels)]
    save_image_grid(path, np.concatenate(list(rows.values())), titles, " | ".join(rows) + missing, cols=len(pick))


def get_args_parser() -> argparse.ArgumentParser:
    from fastcifar.config import ArgumentParser  # flag errors as one line, exit 2

    parser = ArgumentParser(prog="python -m fastcifar.plots",
                            description="Draw the same training images original, through the fast "
                                        "path and through the albumentations reference.")
    parser.add_argument("--data-dir", metavar="PATH", help="as for python -m fastcifar.data (default: the cache)")
    parser.add_argument("--augment-grid", metavar="PNG", required=True, help="where to write the grid")
    parser.add_argument("--seed", type=int, default=0, help="which images and augmentations (default: 0)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fastcifar.data import load_cifar10

    args = get_args_parser().parse_args(argv)
    data = load_cifar10(args.data_dir)
    save_augment_grid(data, args.augment_grid, seed=args.seed)
    print(f"augmentation grid: {args.augment_grid}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.plots"))
