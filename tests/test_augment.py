"""The fast path's batched augmentation, pinned against exact expectations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastcifar import augment
from fastcifar.augment import DeviceLoader, batch_cutout, gather_crops, normalize_images
from fastcifar.data import CifarData


NORMALIZE_NAP = 0.2
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # normalized value == pixel value, exactly


def random_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def loader(images, labels, **kw) -> DeviceLoader:
    opts = dict(IDENTITY, batch_size=16, translate=4, cutout=0, flip=True, seed=0)
    opts.update(kw)
    return DeviceLoader(images, labels, **opts)


def expected_views(images: np.ndarray, plan, pad_mode: str = "reflect", translate: int = 4) -> np.ndarray:
    """Per image, the exact window of the (mirrored if flipped) padded image at the drawn offset."""
    mode = "reflect" if pad_mode == "reflect" else "constant"
    out = []
    for i, src in enumerate(plan.order.tolist()):
        img = np.pad(images[src].astype(np.float32), ((translate,) * 2, (translate,) * 2, (0, 0)), mode=mode)
        if plan.flip[i]:
            img = img[:, ::-1]
        dy, dx = int(plan.dy[i]), int(plan.dx[i])
        out.append(img[dy:dy + 32, dx:dx + 32])
    return np.stack(out)


def served(ld: DeviceLoader, plan) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*ld.batches(plan))
    return torch.cat(xs).permute(0, 2, 3, 1).float().numpy(), torch.cat(ys).numpy()


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
def test_crop_and_flip_equal_the_exact_window(pad_mode):
    images, labels = random_images(40)
    ld = loader(images, labels, pad_mode=pad_mode)
    plan = ld.plan_epoch()
    x, _ = served(ld, plan)
    np.testing.assert_array_equal(x, expected_views(images, plan, pad_mode))
    assert plan.flip.sum() > 0 and (1 - plan.flip).sum() > 0


def test_without_augmentation_images_pass_through_unchanged():
    images, labels = random_images(20)
    ld = loader(images, labels, translate=0, flip=False)
    plan = ld.plan_epoch()
    x, _ = served(ld, plan)
    np.testing.assert_array_equal(x, images[plan.order.numpy()].astype(np.float32))


def test_flip_is_an_exact_mirror():
    images, labels = random_images(64)
    ld = loader(images, labels, translate=0)
    plan = ld.plan_epoch()
    x, _ = served(ld, plan)
    src = images[plan.order.numpy()].astype(np.float32)
    flipped = plan.flip.numpy().astype(bool)
    np.testing.assert_array_equal(x[flipped], src[flipped][:, :, ::-1])
    np.testing.assert_array_equal(x[~flipped], src[~flipped])


@pytest.mark.parametrize("size", [1, 8, 13])
def test_cutout_zeroes_exactly_one_clipped_square(size):
    images = np.full((200, 32, 32, 3), 7, dtype=np.uint8)
    ld = loader(images, np.zeros(200), translate=0, flip=False, cutout=size, batch_size=64)
    plan = ld.plan_epoch()
    x, _ = served(ld, plan)
    for i in range(len(x)):
        y0, x0 = int(plan.cy[i]), int(plan.cx[i])
        want = np.full((32, 32), 7.0, dtype=np.float32)
        want[max(y0, 0):max(y0 + size, 0), max(x0, 0):max(x0 + size, 0)] = 0
        for c in range(3):
            np.testing.assert_array_equal(x[i, :, :, c], want)
    clipped = ((plan.cy < 0) | (plan.cy + size > 32) | (plan.cx < 0) | (plan.cx + size > 32)).sum()
    assert size == 1 or clipped > 0  # the border case was exercised


def test_batch_cutout_directly_on_a_known_square():
    x = torch.ones(2, 32, 32, 3)
    batch_cutout(x, torch.tensor([-3, 30]), torch.tensor([5, 29]), 8)
    assert (x[0, :5, 5:13] == 0).all() and x[0].sum() == 32 * 32 * 3 - 5 * 8 * 3
    assert (x[1, 30:, 29:] == 0).all() and x[1].sum() == 32 * 32 * 3 - 2 * 3 * 3


def test_offsets_cover_the_whole_range():
    images, labels = random_images(500)
    ld = loader(images, labels, translate=4, cutout=8)
    plan = ld.plan_epoch()
    assert set(plan.dy.tolist()) == set(range(9)) == set(plan.dx.tolist())
    assert set(plan.cy.tolist()) == set(range(-4, 28)) == set(plan.cx.tolist())


def test_every_image_appears_exactly_once_per_epoch_and_labels_follow():
    n = 203  # not a multiple of the batch size
    labels = np.arange(n) % 10
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None], 32 * 32 * 3).reshape(n, 32, 32, 3)
    ld = loader(images, labels, cutout=0, batch_size=16)
    for _ in range(3):
        xs, ys = served(ld, ld.plan_epoch())
        ids = xs[:, 16, 16, 0].astype(int)  # the image encodes its index; crops of a flat image keep it
        assert sorted(ids.tolist()) == list(range(n))
        np.testing.assert_array_equal(ys, labels[ids])
    assert len(ld) == 13


def test_drop_last_serves_only_full_batches():
    images, labels = random_images(50)
    ld = loader(images, labels, batch_size=16, drop_last=True)
    shapes = [x.shape[0] for x, _ in ld]
    assert shapes == [16, 16, 16] and len(ld) == 3


def test_same_seed_same_batches_other_seed_other_batches():
    images, labels = random_images(64)
    a, b, c = (list(loader(images, labels, seed=s, cutout=8)) for s in (3, 3, 4))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))


def test_fresh_order_each_epoch():
    images, labels = random_images(64)
    ld = loader(images, labels)
    assert not torch.equal(ld.plan_epoch().order, ld.plan_epoch().order)


def test_alternating_flip_flips_each_image_every_other_epoch():
    images, labels = random_images(100)
    ld = loader(images, labels, alt_flip=True)
    flips = []
    for _ in range(4):
        plan = ld.plan_epoch()
        per_image = torch.empty(100, dtype=torch.int64)
        per_image[plan.order] = plan.flip
        flips.append(per_image)
    assert torch.equal(flips[0], flips[2]) and torch.equal(flips[1], flips[3])
    assert torch.equal(flips[0], 1 - flips[1])
    assert 20 < int(flips[0].sum()) < 80  # randomly phased


def test_state_dict_replays_the_next_epoch():
    images, labels = random_images(64)
    ld = loader(images, labels, cutout=8)
    ld.plan_epoch()
    state = ld.state_dict()
    first = [x.clone() for x, _ in ld]
    ld.load_state_dict(state)
    again = [x for x, _ in ld]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_ranks_get_disjoint_shards_of_one_permutation():
    images, labels = random_images(101)
    orders = [loader(images, labels, rank=r, world_size=2).plan_epoch().order for r in (0, 1)]
    assert len(orders[0]) == len(orders[1]) == 50
    assert not set(orders[0].tolist()) & set(orders[1].tolist())
    single = loader(images, labels).plan_epoch().order
    assert torch.equal(torch.stack(orders, 1).reshape(-1), single[:100])


def test_an_evaluation_shard_counts_its_extra_image():
    """9 images on 2 ranks: rank 0 evaluates 5, in 2 batches of 4. Sabotage: samples_per_epoch of an evaluation
    loader as num_images // world_size (4: len() one batch short of what it serves)."""
    images, labels = random_images(9)
    for rank, served_images in ((0, 5), (1, 4)):
        ld = loader(images, labels, train=False, rank=rank, world_size=2, batch_size=4)
        assert ld.samples_per_epoch == served_images and len(ld) == len(list(ld)) == -(-served_images // 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_is_channels_last_in_the_compute_dtype(dtype):
    images, labels = random_images(32)
    x, y = next(iter(loader(images, labels, dtype=dtype, mean=(0.5,) * 3, std=(0.25,) * 3)))
    assert x.shape == (16, 3, 32, 32) and x.dtype == dtype and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iter(loader(images, labels, channels_last=False)))
    assert x.is_contiguous()


def test_normalization_uses_the_given_statistics():
    images, labels = random_images(8)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    got = normalize_images(images, mean, std).numpy()
    want = (images / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(got, want, atol=1e-5)
    ld = DeviceLoader(images, labels, mean=mean, std=std, batch_size=8, train=False)
    x, _ = next(iter(ld))
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), want, atol=1e-5)


def test_gather_crops_matches_slicing():
    src = torch.arange(3 * 10 * 12 * 3, dtype=torch.float32).reshape(3, 10, 12, 3)
    out = gather_crops(src, torch.tensor([2, 0]), torch.tensor([1, 3]), torch.tensor([4, 0]), 6)
    assert torch.equal(out[0], src[2, 1:7, 4:10]) and torch.equal(out[1], src[0, 3:9, 0:6])


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
def test_normalize_images_pads_like_numpy(pad_mode):
    images, _ = random_images(2)
    got = normalize_images(images, **IDENTITY, pad=2, pad_mode=pad_mode).numpy()
    mode = "reflect" if pad_mode == "reflect" else "constant"
    np.testing.assert_array_equal(got, np.pad(images.astype(np.float32), ((0, 0), (2, 2), (2, 2), (0, 0)), mode=mode))


@pytest.mark.parametrize("images, pad_mode", [
    (np.zeros((2, 32, 32, 3), np.uint8), "reflct"), (np.zeros((2, 32, 32, 3), np.float32), "reflect"),
    (np.zeros((2, 3, 32, 32), np.uint8), "reflect")])
def test_normalize_images_refuses_what_it_would_silently_get_wrong(images, pad_mode):
    """Sabotage: the check dropped (a mistyped pad mode pads with zeros; float or NCHW input normalizes to noise)."""
    with pytest.raises(ValueError, match="uint8 \\(N, H, W, 3\\)"):
        normalize_images(images, **IDENTITY, pad=2, pad_mode=pad_mode)


def test_reference_pipeline_shapes_and_normalization():
    pytest.importorskip("albumentations")
    from fastcifar.reference import reference_loader

    images, labels = random_images(12)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    test = reference_loader(images, labels, mean=mean, std=std, batch_size=12, train=False, num_workers=0)
    x, y = next(iter(test))
    want = (images / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), want, atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), labels)
    flat = np.full((4, 32, 32, 3), 200, dtype=np.uint8)
    train = reference_loader(flat, np.zeros(4), mean=mean, std=std, batch_size=4, train=True, num_workers=0)
    x, _ = next(iter(train))
    zeros = (x == 0).all(1).sum((1, 2))  # cutout fills the mean = 0 after Normalize
    assert x.shape == (4, 3, 32, 32) and (zeros == 64).all()


def test_augment_grid_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from fastcifar.plots import save_augment_grid

    images, labels = random_images(20)
    data = CifarData(images, labels, images[:4], labels[:4], [f"c{i}" for i in range(10)],
                     (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "test")
    save_augment_grid(data, tmp_path / "grid.png", count=4)
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_pipeline_is_reproducible_for_a_seed():
    pytest.importorskip("albumentations")
    from fastcifar.reference import reference_loader

    images, labels = random_images(16)
    opts = dict(mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=16, train=True, num_workers=0)
    a, b, c = (next(iter(reference_loader(images, labels, seed=s, **opts)))[0] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("alt_flip", [False, True])
def test_reseed_equals_a_fresh_loader(alt_flip):
    images, labels = random_images(48)
    used = loader(images, labels, seed=1, cutout=8, alt_flip=alt_flip)
    list(used)
    used.reseed(5)
    fresh = loader(images, labels, seed=5, cutout=8, alt_flip=alt_flip)
    for _ in range(2):
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(used, fresh))


def test_the_device_loader_times_its_upload_apart_from_its_preparation(monkeypatch, napping):
    monkeypatch.setattr(augment, "normalize_images", napping(augment.normalize_images, lambda *a, **k: NORMALIZE_NAP))
    images = np.zeros((8, 32, 32, 3), np.uint8)
    loader = augment.DeviceLoader(images, np.zeros(8), mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=4)
    assert loader.prep_seconds >= NORMALIZE_NAP > loader.upload_seconds >= 0


@pytest.mark.slow  # a DataLoader worker process
def test_albumentations_workers_run_one_thread_each(monkeypatch):
    """The seed recipe's DataLoader workers each use one thread (torch's and OpenCV's), so a CPU comparison
    counts processes, not hidden thread pools. Sabotage: cv2.setNumThreads(1) dropped from the worker init."""
    pytest.importorskip("albumentations")
    import cv2

    from fastcifar.reference import AlbumentationsCifar, reference_loader

    if cv2.getNumThreads() < 2:
        pytest.skip("OpenCV runs one thread on this machine anyway")
    monkeypatch.setattr(AlbumentationsCifar, "__getitem__",  # forked workers inherit the patched class
                        lambda self, i: (torch.tensor([torch.get_num_threads(), cv2.getNumThreads()]), 0))
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    loader = reference_loader(images, np.zeros(4), mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=4, train=True,
                              num_workers=1)
    threads, _ = next(iter(loader))
    assert threads.tolist() == [[1, 1]] * 4
