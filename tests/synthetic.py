"""Tiny data sets the tests write themselves, and a model that records what it is fed."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def learnable_images(per_class: int, seed: int = 0, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """32x32 RGB images whose class is their colour (plus noise): learnable in a few steps, and unchanged
    in kind by crops, flips and cutout."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(1234).integers(30, 226, size=(num_classes, 3))
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = rng.normal(0, 25, size=(len(labels), 32, 32, 3))
    images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def write_image_folder(root: Path, split: str, images: np.ndarray, labels: np.ndarray,
                       classes: Sequence[str] = CLASSES) -> None:
    from PIL import Image

    for i, (img, lab) in enumerate(zip(images, labels)):
        folder = root / split / classes[lab]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def write_learnable_dataset(root: Path, train_per_class: int = 40, test_per_class: int = 10,
                            shuffle_train_labels: bool = False, other_test_set: bool = False) -> Path:
    """An image-folder tree train/<class>/*.png, test/<class>/*.png of `learnable_images`. With
    `other_test_set`, the same training split beside other test images with shuffled labels: what a
    validation-split run must give the same results on, since it never reads the test set."""
    images, labels = learnable_images(train_per_class, seed=0)
    if shuffle_train_labels:
        labels = np.random.default_rng(7).permutation(labels)
    write_image_folder(root, "train", images, labels)
    images, labels = learnable_images(test_per_class, seed=2 if other_test_set else 1)
    if other_test_set:
        labels = np.random.default_rng(5).permutation(labels)
    write_image_folder(root, "test", images, labels)
    return root


class Recorder(nn.Module):
    """A linear classifier that remembers every input it sees and the autocast state it saw it in."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 32 * 32, 10)
        self.inputs: list[torch.Tensor] = []
        self.autocast: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        self.autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        out = self.fc(x.flatten(1))
        return out
