"""--val-split: a stratified held-out set from the training images, and the train(config, on_epoch) API."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fastcifar.config import TrainConfig, parse_config
from fastcifar.data import CifarData, channel_stats, validation_split
from fastcifar.errors import UserError, run_cli
from synthetic import CLASSES, learnable_images, write_learnable_dataset


def uneven_data() -> CifarData:
    """Classes of different sizes (30, 31, ..., 39 images), so stratification has remainders to place."""
    images, labels = learnable_images(39, seed=3)
    keep = np.concatenate([np.flatnonzero(labels == c)[:30 + c] for c in range(10)])
    test_x, test_y = learnable_images(2, seed=4)
    mean, std = channel_stats(images[keep])
    return CifarData(images[keep], labels[keep], test_x, test_y, list(CLASSES), mean, std, "synthetic")


def test_split_is_stratified_disjoint_and_complete():
    data = uneven_data()
    split = validation_split(data, 69, seed=0)
    counts = np.bincount(data.train_labels)
    held = np.bincount(split.test_labels, minlength=10)
    assert held.sum() == 69 and len(split.train_labels) == len(data.train_labels) - 69
    assert np.all(np.abs(held - 69 * counts / counts.sum()) < 1)  # each class its share, rounded
    # every training image is in exactly one of the two parts (images are unique: noise)
    rows = lambda x: {img.tobytes() for img in x}  # noqa: E731
    assert rows(split.train_images) | rows(split.test_images) == rows(data.train_images)
    assert not rows(split.train_images) & rows(split.test_images)
    assert not rows(split.test_images) & rows(data.test_images)  # the test set is dropped
    assert "validation split: 69" in split.source and "test set unused" in split.source


def test_split_is_fixed_by_its_seed_and_stats_come_from_the_remaining_images():
    data = uneven_data()
    a, b, c = validation_split(data, 50, 0), validation_split(data, 50, 0), validation_split(data, 50, 1)
    assert np.array_equal(a.test_images, b.test_images)
    assert not np.array_equal(a.test_images, c.test_images)
    assert a.mean == pytest.approx(channel_stats(a.train_images)[0])
    assert a.std == pytest.approx(channel_stats(a.train_images)[1])
    assert a.mean != pytest.approx(data.mean, abs=1e-9)


@pytest.mark.parametrize("size", [0, 345, 1000])
def test_split_size_out_of_range_is_a_user_error(size):
    with pytest.raises(UserError, match=r"invalid --val-split \(\d+\).*lower --val-split"):
        validation_split(uneven_data(), size)


def test_train_main_with_too_large_val_split_exits_2_naming_the_flag(tmp_path, capsys):
    from fastcifar.train import main

    data = write_learnable_dataset(tmp_path / "data", 2, 1)
    code = run_cli(main, ["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), "--val-split", "20",
                          "--device", "cpu", "--width", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--val-split (20)" in err


def test_train_api_reports_each_epoch_on_the_validation_split_and_lets_exceptions_through(tmp_path):
    from fastcifar.train import train

    data = write_learnable_dataset(tmp_path / "data", 20, 5)
    config = TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "run"), width=4, batch_size=32, epochs=2,
                         device="cpu", plots=False, val_split=50, tta=False)
    rows = []
    summary = train(config, on_epoch=rows.append)
    assert [r["epoch"] for r in rows] == [1, 2] and summary["eval_split"] == "val"
    assert rows[-1]["test_acc"] == summary["test_acc"]
    assert {"seed", "lr", "train_loss", "train_acc", "test_loss", "epoch_seconds", "total_seconds"} <= set(rows[0])
    assert summary["test_acc"] * 50 == pytest.approx(round(summary["test_acc"] * 50))  # 50 held-out images

    class Stop(Exception):
        pass

    def stop(row):
        raise Stop(row["epoch"])

    with pytest.raises(Stop, match="1"):
        train(dataclasses.replace(config, overwrite=True), on_epoch=stop)
    assert train(dataclasses.replace(config, overwrite=True, val_split=0))["eval_split"] == "test"
    assert not math.isnan(rows[0]["test_acc"])
