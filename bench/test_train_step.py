"""Group `train-step`: images per second of ONE optimizer step, data included, fast path vs reference path.

    OMP_NUM_THREADS=1 pytest bench/test_train_step.py --benchmark-json=/tmp/step.json   # ~1-2 min on 2 cores

A step = next batch from the path's loader + forward + loss + backward + SGD (Nesterov) step, on the
default ResNet-9 at widths 16 and 64.

* fast: the batch comes from DeviceLoader on the step's device (translate 4, flip, cutout 8, stored in bf16,
  channels_last), the model is channels_last and runs under bf16 autocast (the trainer's fast-path settings,
  eager: no torch.compile; fused SGD on CUDA).
* reference: the batch comes from the albumentations DataLoader iterator (2 worker processes, same
  augmentation, fp32), copied to the device; the model is fp32, contiguous NCHW, no autocast.

Batch 512, except width 64 on the CPU: batch 128 there (an fp32 step at 512 takes ~15 s on 2 cores). On CUDA
(when available) each step ends with torch.cuda.synchronize() inside the timed call. The loaders serve the
first 10,240 training images (the per-step data cost does not depend on the data set's size). The reference
case runs first for each (device, width), so the fast case can store vs_reference (ratio of images/s).
Skips the reference cases without albumentations. See bench/conftest.py for comparing saved runs.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

GROUP = "train-step"
WIDTHS = (16, 64)
SUBSET = 10_240
AUG = dict(translate=4, flip=True, cutout=8, pad_mode="reflect")
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
CASES = [(d, w, p) for d in DEVICES for w in WIDTHS for p in ("reference", "fast")]
_IMAGES_PER_S: dict[tuple[str, int, str], float] = {}


def batch_size(device: str, width: int) -> int:
    return 128 if (device == "cpu" and width == 64) else 512


def rounds(device: str, width: int) -> tuple[int, int]:
    """(rounds, warm-up rounds)."""
    if device == "cuda":
        return 50, 5
    return (3, 1) if width == 64 else (5, 1)


def make_step(path: str, width: int, device: torch.device, batch: int, data):
    """(step, batches): `step()` pulls the next batch from the endless `batches` and trains on it."""
    from fastcifar.config import TrainConfig
    from fastcifar.model import ModelConfig, ResNet9
    from fastcifar.recipe import build_optimizer
    from fastcifar.runtime import amp_dtype, autocast

    fast = path == "fast"
    images, labels = data.images[:SUBSET], data.labels[:SUBSET]
    dtype = amp_dtype(device, True) if fast else None
    if fast:
        from fastcifar.augment import DeviceLoader

        loader = DeviceLoader(images, labels, mean=data.mean, std=data.std, batch_size=batch, train=True,
                           drop_last=True, seed=0, device=device, dtype=dtype, channels_last=True, **AUG)
    else:
        from fastcifar.reference import reference_loader

        loader = reference_loader(images, labels, mean=data.mean, std=data.std, batch_size=batch, train=True,
                                  num_workers=2, drop_last=True, seed=0, **AUG)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # a new epoch whenever one ends
    torch.manual_seed(0)
    model = ResNet9(ModelConfig(width=width)).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(TrainConfig(width=width), model, device)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.2)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        inputs, targets = next(batches)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, dtype):
            loss = criterion(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()

    return step, batches, dtype


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("device,width,path", CASES, ids=[f"{d}-w{w}-{p}" for d, w, p in CASES])
def test_train_step(benchmark, cifar_images, device, width, path):
    if path == "reference":
        pytest.importorskip("albumentations")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    dev = torch.device(device)
    batch = batch_size(device, width)
    step, batches, dtype = make_step(path, width, dev, batch, cifar_images)
    n, warm = rounds(device, width)
    benchmark.pedantic(step, rounds=n, warmup_rounds=warm, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, untimed
        return
    rate = batch / benchmark.stats.stats.mean
    _IMAGES_PER_S[(device, width, path)] = rate
    benchmark.extra_info.update(
        path=path, device=device, width=width, batch=batch, images_per_s=round(rate, 1),
        amp=str(dtype).replace("torch.", "") if dtype else "none (fp32)",
        memory_format="channels_last" if path == "fast" else "contiguous NCHW",
        data="DeviceLoader on the device" if path == "fast" else "albumentations DataLoader, 2 workers",
        torch_threads=torch.get_num_threads(), compile=False, data_source=cifar_images.source)
    reference = _IMAGES_PER_S.get((device, width, "reference"))
    if path == "fast" and reference:
        benchmark.extra_info["vs_reference"] = round(rate / reference, 2)
    del step, batches
