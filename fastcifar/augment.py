"""The fast path: the whole data set resident on the device, augmented there in batches.

Images are uploaded once as uint8 (timed as `upload_seconds`), then normalized into the compute dtype, stored NHWC
(that is channels_last memory), padded by `translate` pixels, with a mirrored copy when flipping is on (timed as
`prep_seconds`; fastcifar.runtime.CLOCKS says which clock counts which). Each epoch draws
all its random numbers at once (an `EpochPlan`), and each batch is ONE row gather: every output row of 32
pixels is a contiguous run of the padded (possibly mirrored) source, so shuffle + random crop + flip cost a
single `index_select`. No per-image Python, no host-device sync inside an epoch. The same code runs on CPU
tensors, which is how the tests and the CPU trainer use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastcifar.runtime import Timer

IGNORE_LABEL = -100  # labels of the filler images of a padded last batch: cross_entropy's ignore_index


def normalize_images(images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, pad: int = 0,
                     pad_mode: str = "reflect") -> torch.Tensor:
    """uint8 NHWC -> normalized NHWC in `dtype` on `device`, padded by `pad` pixels ('zeros': the mean), with
    mean/std in [0, 1] pixel units. The arithmetic and the padding run in fp32 (reflect padding lacks bf16
    kernels on some backends), cast once at the end."""
    x = torch.as_tensor(images).to(device)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3 or pad_mode not in ("reflect", "zeros"):
        raise ValueError(f"expected uint8 (N, H, W, 3) images and pad_mode 'reflect' or 'zeros', got {x.dtype} "
                         f"{tuple(x.shape)} and {pad_mode!r}")
    m, s = (torch.tensor(v, device=device, dtype=torch.float32) * 255 for v in (mean, std))
    n, h, w, c = x.shape
    out = torch.empty((n, h + 2 * pad, w + 2 * pad, c), device=device, dtype=dtype)
    for i in range(0, n, 8192):  # chunks keep the fp32 temporary small
        chunk = ((x[i:i + 8192].float() - m) / s).permute(0, 3, 1, 2)
        if pad:
            chunk = F.pad(chunk, (pad,) * 4, mode="reflect" if pad_mode == "reflect" else "constant")
        out[i:i + 8192] = chunk.permute(0, 2, 3, 1)
    return out


@dataclass
class EpochPlan:
    """Every random choice of one epoch, drawn up front. Index i refers to the i-th sample served."""

    order: torch.Tensor  # source image index (a permutation, or this rank's shard of it)
    flip: torch.Tensor  # 1 where the image is mirrored horizontally
    dy: torch.Tensor  # crop offset into the padded image, in [0, 2 * translate]
    dx: torch.Tensor
    cy: torch.Tensor  # top-left corner of the cutout square (may be negative: squares are clipped at the border)
    cx: torch.Tensor


def gather_crops(source: torch.Tensor, index: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                 size: int) -> torch.Tensor:
    """Crop `size`x`size` windows at (dy, dx) out of images `index` of an NHWC `source`, in one gather.

    Row r of window n starts at element ((index*H + dy + r) * W + dx) * C of the flat source and runs for
    size*C contiguous elements; an overlapping strided view turns the whole crop into an index_select.
    """
    n, h, w, c = source.shape
    rows = source.reshape(-1).as_strided((n * h * w - size + 1, size * c), (c, 1))
    r = torch.arange(size, device=source.device)
    start = ((index[:, None] * h + dy[:, None] + r) * w + dx[:, None]).reshape(-1)
    return rows.index_select(0, start).view(len(index), size, size, c)


def batch_cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int) -> torch.Tensor:
    """Zero one `size`x`size` square per NHWC image, top-left at (cy, cx), clipped at the border, in place and
    touching only the square's pixels. Coordinates outside the image are clamped onto the border row/column,
    which lies inside the clipped square because the square's centre is inside the image."""
    if size == 0:
        return x
    b, h, w, c = x.shape
    k = torch.arange(size, device=x.device)
    rows = (cy[:, None] + k).clamp_(0, h - 1)
    cols = (cx[:, None] + k).clamp_(0, w - 1)
    image = torch.arange(b, device=x.device)[:, None, None]
    pixel = (image * h + rows[:, :, None]) * w + cols[:, None, :]
    x.view(b * h * w, c).index_fill_(0, pixel.reshape(-1), 0)
    return x


class DeviceLoader:
    """Device-resident CIFAR loader of uint8 (N, H, W, 3) `images` and their labels, normalized by `mean` and
    `std` ([0, 1] pixel units) into `dtype` (the autocast one). Yields (inputs NCHW in channels_last memory, or
    contiguous, int64 labels), `batch_size` per rank. `train` shuffles and augments (the flags of the same names);
    otherwise images come in order. `drop_last` and, for evaluation, `pad_last` keep every batch one shape for
    torch.compile: the last one is dropped, or filled up with the shard's first images labelled IGNORE_LABEL.
    Under torchrun a rank serves its shard (`rank` of `world_size`) of each epoch's shared permutation. The same
    `seed` gives the same batches."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, *,
                 mean: Sequence[float], std: Sequence[float], batch_size: int, train: bool = True,
                 translate: int = 4, pad_mode: str = "reflect", flip: bool = True, alt_flip: bool = False,
                 cutout: int = 8, drop_last: bool = False, pad_last: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 channels_last: bool = True, rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.translate = translate if train else 0
        self.flip = flip and train
        self.alt_flip = alt_flip and self.flip
        self.cutout = cutout if train else 0
        self.drop_last = drop_last
        self.pad_last = pad_last and not train and not drop_last
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size
        self.size = int(images.shape[1])
        with Timer(self.device) as upload:
            raw = torch.as_tensor(np.asarray(images)).to(self.device)
            self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).to(self.device)
        self.num_images = len(self.labels)
        self.samples_per_epoch = (self.num_images // world_size if train  # this rank's share: see _shard
                                  else len(range(rank, self.num_images, world_size)))
        self.generator = torch.Generator(device=self.device)
        with Timer(self.device) as prep:
            self.source = normalize_images(raw, mean, std, self.device, dtype, self.translate, pad_mode)
            del raw
            # The mirrored copy doubles memory (~0.5 GB per copy in bf16 for CIFAR-10 with padding) and turns
            # every flip into a choice of source rows, fused with the crop gather.
            if self.flip:
                self.source = torch.cat([self.source, self.source.flip(2)])
        self.upload_seconds, self.prep_seconds = upload.seconds, prep.seconds
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Start over as a loader built with `seed` would (same batches), keeping the uploaded data."""
        self.generator.manual_seed(seed)
        self.epoch = 0
        self.flip_phase = self._randint(2, self.num_images) if self.alt_flip else None

    def __len__(self) -> int:
        n, b = self.samples_per_epoch, self.batch_size
        return n // b if self.drop_last else -(-n // b)  # a padded last batch is still one batch

    # -- randomness ---------------------------------------------------------------------------------
    def _randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(high, (n,), device=self.device, generator=self.generator)

    def plan_epoch(self) -> EpochPlan:
        """The next epoch's choices, drawn for the whole data set and then sharded, so N ranks with batch B
        see exactly the samples (and augmentations) that one process with batch N*B would."""
        n, t, k = self.num_images, self.translate, self.cutout
        order = (torch.randperm(n, device=self.device, generator=self.generator) if self.train
                 else torch.arange(n, device=self.device))
        if self.alt_flip:
            flip = (self.flip_phase[order] + self.epoch) % 2
        else:
            flip = self._randint(2, n) if self.flip else torch.zeros(n, dtype=torch.int64, device=self.device)
        dy, dx = (self._randint(2 * t + 1, n), self._randint(2 * t + 1, n)) if t else (flip * 0, flip * 0)
        # cutout centre uniform over the image, so squares near the border are clipped (DeVries & Taylor)
        cy, cx = ((self._randint(self.size, n) - k // 2, self._randint(self.size, n) - k // 2) if k
                  else (flip * 0, flip * 0))
        self.epoch += 1
        return EpochPlan(*(self._shard(v) for v in (order, flip, dy, dx, cy, cx)))

    def _shard(self, v: torch.Tensor) -> torch.Tensor:
        """This rank's interleaved share. Training drops the remainder so every rank runs the same number
        of steps; evaluation keeps it (uneven shards are fine when sums are reduced)."""
        if self.train:
            v = v[: self.samples_per_epoch * self.world_size]
        return v[self.rank::self.world_size]

    # -- batches ------------------------------------------------------------------------------------
    def batches(self, plan: EpochPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = len(plan.order) - (len(plan.order) % self.batch_size if self.drop_last else 0)
        for first in range(0, count, self.batch_size):
            sl = slice(first, first + self.batch_size)
            order = plan.order[sl]
            labels = self.labels[order]
            short = self.batch_size - len(order) if self.pad_last else 0
            if short:
                filler = plan.order[torch.arange(short, device=self.device) % len(plan.order)]
                order = torch.cat([order, filler])
                labels = torch.cat([labels, torch.full_like(filler, IGNORE_LABEL)])
            if self.train:
                x = gather_crops(self.source, order + plan.flip[sl] * self.num_images,
                                 plan.dy[sl], plan.dx[sl], self.size)
                x = batch_cutout(x, plan.cy[sl], plan.cx[sl], self.cutout)
            else:
                x = self.source[sl] if self.world_size == 1 and not short else self.source[order]
            x = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels_last
            yield (x if self.channels_last else x.contiguous()), labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self.plan_epoch())

    # -- exact resume (at an epoch's start) ----------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.generator.set_state(state["generator"])
