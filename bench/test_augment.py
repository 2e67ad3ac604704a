"""Group `augment`: images per second of ONE training epoch of augmentation on the CPU, 50,000 images.

    OMP_NUM_THREADS=1 pytest bench/test_augment.py --benchmark-json=/tmp/augment.json   # ~1-2 min on 2 cores

The fast loader (DeviceLoader on CPU tensors, bf16 and fp32) against the albumentations reference
(`reference_loader`: per-image Normalize, reflect pad + random crop, flip, CoarseDropout; a DataLoader with
2 workers, persistent, so worker start-up is in the warm-up round only). Same settings for both:
translate 4, flip, cutout 8, batch 512, drop_last (97 batches = 49,664 images). A round is one full epoch;
the fast loader's one-time setup (normalize, pad, mirrored copy) is outside the timing and reported as
setup_seconds. extra_info: images_per_s, and on the fast cases vs_albumentations (the ratio of images per
second; target >= 30x on a 2-core machine). The albumentations case runs first so the ratio is there;
it is skipped without albumentations. See bench/conftest.py for comparing saved runs.
"""

from __future__ import annotations

import time

import pytest
import torch

GROUP = "augment"
BATCH = 512
AUG = dict(translate=4, flip=True, cutout=8, pad_mode="reflect")
TARGET_RATIO = 30.0
_IMAGES_PER_S: dict[str, float] = {}  # case -> images/s, for the ratio


def one_epoch(loader) -> int:
    """Iterate one epoch; the number of images served. On CPU every batch is complete when yielded."""
    served = 0
    for _inputs, labels in loader:
        served += len(labels)
    return served


def _record(benchmark, case: str, served: int, **info) -> float | None:
    if benchmark.stats is None:  # --benchmark-disable: the target ran once, untimed
        return None
    rate = served / benchmark.stats.stats.mean
    _IMAGES_PER_S[case] = rate
    benchmark.extra_info.update(case=case, images=served, images_per_s=round(rate, 1), batch=BATCH,
                                torch_threads=torch.get_num_threads(), **AUG, **info)
    return rate


@pytest.mark.benchmark(group=GROUP)
def test_albumentations_epoch(benchmark, cifar_images):
    pytest.importorskip("albumentations")
    from fastcifar.reference import reference_loader

    loader = reference_loader(cifar_images.images, cifar_images.labels, mean=cifar_images.mean, std=cifar_images.std,
                              batch_size=BATCH, train=True, num_workers=2, drop_last=True, seed=0, **AUG)
    served = benchmark.pedantic(one_epoch, args=(loader,), rounds=2, warmup_rounds=1, iterations=1)
    _record(benchmark, "albumentations", served, workers=2, dtype="float32", data=cifar_images.source)
    del loader


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fast_loader_epoch(benchmark, cifar_images, dtype):
    from fastcifar.augment import DeviceLoader

    start = time.perf_counter()
    loader = DeviceLoader(cifar_images.images, cifar_images.labels, mean=cifar_images.mean, std=cifar_images.std,
                       batch_size=BATCH, train=True, drop_last=True, seed=0, device="cpu",
                       dtype=getattr(torch, dtype), channels_last=True, **AUG)
    setup = time.perf_counter() - start
    served = benchmark.pedantic(one_epoch, args=(loader,), rounds=5, warmup_rounds=1, iterations=1)
    rate = _record(benchmark, f"fast-{dtype}", served, dtype=dtype, device="cpu", setup_seconds=round(setup, 2),
                   data=cifar_images.source)
    reference = _IMAGES_PER_S.get("albumentations")
    if rate and reference:
        benchmark.extra_info.update(albumentations_images_per_s=round(reference, 1),
                                    vs_albumentations=round(rate / reference, 1), target_ratio=TARGET_RATIO,
                                    meets_target=rate / reference >= TARGET_RATIO)
    del loader
