"""The reference pipeline: the original notebook's per-image albumentations augmentation on the CPU.

    python -m fastcifar.train --preset seed --data-dir ../shared/data/cifar10-png.tar.gz

Slow by design: it is here to compare the device-resident path against (accuracy and speed) and to
reproduce the notebook. Needs `pip install fastcifar[albumentations]`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastcifar.errors import require


def reference_transform(mean: Sequence[float], std: Sequence[float], *, train: bool, translate: int = 4,
                        cutout: int = 8, flip: bool = True, pad_mode: str = "reflect", seed: int | None = None):
    """The albumentations Compose for training (augmenting) or evaluation (normalize only); `seed` fixes its
    own random state (albumentations ignores the global seeds)."""
    A = require("albumentations", "albumentations", "--pipeline albumentations; --pipeline gpu runs without it")
    import cv2  # installed with albumentations, which imports it
    steps = [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)]
    if train:
        if translate:
            border = cv2.BORDER_REFLECT_101 if pad_mode == "reflect" else cv2.BORDER_CONSTANT
            steps += [A.PadIfNeeded(min_height=32 + 2 * translate, min_width=32 + 2 * translate,
                                    border_mode=border, fill=0),
                      A.RandomCrop(height=32, width=32)]
        if flip:
            steps.append(A.HorizontalFlip(p=0.5))
        if cutout:
            # a hole of 0s: after Normalize, the channel mean
            steps.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(cutout, cutout),
                                         hole_width_range=(cutout, cutout), fill=0, p=1.0))
    return A.Compose(steps, seed=seed)


class AlbumentationsCifar(Dataset):
    """uint8 HWC images + labels -> (float32 CHW tensor, label), through an albumentations transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.transform(image=self.images[i])["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.labels[i])


def reference_loader(images: np.ndarray, labels: np.ndarray, *, mean: Sequence[float], std: Sequence[float],
                     batch_size: int, train: bool, translate: int = 4, cutout: int = 8, flip: bool = True,
                     pad_mode: str = "reflect", num_workers: int = 2, drop_last: bool = False,
                     seed: int = 0) -> DataLoader:
    transform = reference_transform(mean, std, train=train, translate=translate, cutout=cutout, flip=flip,
                                    pad_mode=pad_mode, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(AlbumentationsCifar(images, labels, transform), batch_size=batch_size, shuffle=train,
                      num_workers=num_workers, drop_last=drop_last and train, generator=generator,
                      persistent_workers=num_workers > 0, worker_init_fn=_init_worker)


def _init_worker(worker_id: int) -> None:
    """One thread per worker (the DataLoader sets torch's; OpenCV would otherwise start one per core in every
    worker), and each worker its own augmentation stream (copies of the Compose would repeat each other)."""
    import cv2  # installed: reference_transform built this worker's Compose

    cv2.setNumThreads(1)
    transform = torch.utils.data.get_worker_info().dataset.transform
    transform.set_random_seed(transform.seed * 1000 + worker_id)  # reference_loader always seeds it
