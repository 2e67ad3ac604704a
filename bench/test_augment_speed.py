"""Group `augment`: images per second of ONE training epoch of augmentation on the CPU, 50,000 images, and the
fast loader's one-time setup.

    OMP_NUM_THREADS=1 pytest bench/test_augment_speed.py --benchmark-json=/tmp/augment.json   # ~2 min on 2 cores

The fast loader (DeviceLoader on CPU tensors, bf16 and fp32) against the albumentations reference
(`reference_loader`: per-image Normalize, reflect pad + random crop, flip, CoarseDropout; a DataLoader with
2 workers, persistent, so worker start-up is in the warm-up round only). Same settings for both:
translate 4, flip, cutout 8, batch 512, drop_last (97 batches = 49,664 images). A round is one full epoch.
The fast loader's setup (upload, normalize, pad, mirrored copy: building the DeviceLoader) is benchmarked on
its own. extra_info: images_per_s; on the fast cases vs_albumentations (per epoch), setup_seconds and
vs_albumentations_24_epochs: the ratio of images per second over one 24-epoch run with the fast loader's
setup counted once (the albumentations side counts no setup, so this ratio is the lower one). The
albumentations case runs first so the ratios are there; it is skipped without albumentations. After the
run a table prints the same numbers. See bench/conftest.py for comparing saved runs.
"""

from __future__ import annotations

import pytest
import torch

GROUP = "augment"
BATCH = 512
AUG = dict(translate=4, flip=True, cutout=8, pad_mode="reflect")
TARGET_RATIO = 30.0
RUN_EPOCHS = 24  # the default recipe's epochs: the setup is paid once per run
_IMAGES_PER_S: dict[str, float] = {}  # case -> images/s of one epoch
_SETUP_SECONDS: dict[str, float] = {}  # case -> seconds to build the fast loader
_EPOCH_IMAGES: dict[str, int] = {}     # case -> images served per epoch


def one_epoch(loader) -> int:
    """Iterate one epoch; the number of images served. On CPU every batch is complete when yielded."""
    served = 0
    for _inputs, labels in loader:
        served += len(labels)
    return served


def fast_loader(cifar_images, dtype: str):
    from fastcifar.augment import DeviceLoader

    return DeviceLoader(cifar_images.images, cifar_images.labels, mean=cifar_images.mean, std=cifar_images.std,
                     batch_size=BATCH, train=True, drop_last=True, seed=0, device="cpu",
                     dtype=getattr(torch, dtype), channels_last=True, **AUG)


def amortized_ratio(case: str) -> float:
    """Images per second over RUN_EPOCHS epochs plus the setup, relative to albumentations' per epoch."""
    images = RUN_EPOCHS * _EPOCH_IMAGES[case]
    seconds = images / _IMAGES_PER_S[case] + _SETUP_SECONDS[case]
    return images / seconds / _IMAGES_PER_S["albumentations"]


def _record(benchmark, case: str, served: int, **info) -> float | None:
    if benchmark.stats is None:  # --benchmark-disable: the target ran once, untimed
        return None
    rate = served / benchmark.stats.stats.mean
    _IMAGES_PER_S[case], _EPOCH_IMAGES[case] = rate, served
    benchmark.extra_info.update(case=case, images=served, images_per_s=round(rate, 1), batch=BATCH,
                                torch_threads=torch.get_num_threads(), **AUG, **info)
    return rate


@pytest.fixture(scope="module", autouse=True)
def summary_table(bench_summary):
    """After the module, for the end of the run: images/s per epoch, setup seconds and both ratios."""
    yield
    if not _IMAGES_PER_S:
        return
    reference = _IMAGES_PER_S.get("albumentations")
    head = (f"{'augment: pipeline':<24} {'images/s per epoch':>18} {'setup s':>8} {'vs albu per epoch':>18} "
            f"{f'vs albu over {RUN_EPOCHS} epochs':>24}")
    lines = ["", head, "-" * len(head)]
    for case, rate in _IMAGES_PER_S.items():
        setup = _SETUP_SECONDS.get(case)
        per_epoch = f"{rate / reference:.1f}x" if reference else "-"
        run = f"{amortized_ratio(case):.1f}x" if reference and setup is not None else "-"
        setup_text = f"{setup:.2f}" if setup is not None else "-"
        lines.append(f"{case:<24} {rate:>18,.0f} {setup_text:>8} {per_epoch:>18} {run:>24}")
    bench_summary.extend(lines)


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
def test_fast_loader_setup(benchmark, cifar_images, dtype):
    """Building the loader: upload, normalize into `dtype`, pad, mirrored copy (once per invocation)."""
    benchmark.pedantic(fast_loader, args=(cifar_images, dtype), rounds=3, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:
        _SETUP_SECONDS[f"fast-{dtype}"] = benchmark.stats.stats.mean
        benchmark.extra_info.update(case=f"fast-{dtype}-setup", images=len(cifar_images.labels), dtype=dtype,
                                    torch_threads=torch.get_num_threads(), **AUG, data=cifar_images.source)


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fast_loader_epoch(benchmark, cifar_images, dtype):
    loader = fast_loader(cifar_images, dtype)
    served = benchmark.pedantic(one_epoch, args=(loader,), rounds=5, warmup_rounds=1, iterations=1)
    case = f"fast-{dtype}"
    rate = _record(benchmark, case, served, dtype=dtype, device="cpu", data=cifar_images.source)
    reference = _IMAGES_PER_S.get("albumentations")
    if rate and reference:
        benchmark.extra_info.update(albumentations_images_per_s=round(reference, 1),
                                    vs_albumentations=round(rate / reference, 1), target_ratio=TARGET_RATIO,
                                    meets_target=rate / reference >= TARGET_RATIO)
        if case in _SETUP_SECONDS:
            benchmark.extra_info.update(setup_seconds=round(_SETUP_SECONDS[case], 3), run_epochs=RUN_EPOCHS,
                                        vs_albumentations_24_epochs=round(amortized_ratio(case), 1))
    del loader
