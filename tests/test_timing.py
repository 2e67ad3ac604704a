"""The clocks of summary.json: run_seconds is airbench94's convention and each part of it
covers what it says; per-epoch evaluations stay outside.

    pytest -q tests/test_timing.py

Known delays are injected where each clock must (or must not) look: the loaders' on-device normalization,
the whitening init, the final TTA evaluation and the plain evaluations (per epoch and final).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fastcifar import augment
from fastcifar import train as train_mod
from fastcifar.config import TrainConfig
from synthetic import write_learnable_dataset

# The TTA nap outweighs two plain evaluations' compute by far, even on a slow or busy CPU
NORMALIZE_NAP, TTA_NAP, PLAIN_NAP = 0.2, 1.0, 0.05
CLOCKS = ("run_seconds", "train_seconds", "wall_seconds", "prep_seconds", "init_seconds", "final_eval_seconds",
          "eval_seconds")


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("learnable"), train_per_class=16, test_per_class=4)


def napping(fn, seconds_of):
    def wrapped(*args, **kwargs):
        time.sleep(seconds_of(*args, **kwargs))
        return fn(*args, **kwargs)
    return wrapped


def test_run_seconds_is_prep_init_steps_and_the_final_tta_eval_and_nothing_else(learnable, tmp_path, monkeypatch):
    # normalize_images runs once per loader (train + test, built once for both seeds) and once per whitening
    monkeypatch.setattr(augment, "normalize_images", napping(augment.normalize_images, lambda *a, **k: NORMALIZE_NAP))
    monkeypatch.setattr(train_mod, "evaluate",
                        napping(train_mod.evaluate, lambda *a, tta=False, **k: TTA_NAP if tta else PLAIN_NAP))
    # fp32 on every CPU: bf16 where it is emulated computes several times slower
    config = TrainConfig(data_dir=str(learnable), out_dir=str(tmp_path / "run"), width=4, batch_size=32,
                         device="cpu", epochs=2, runs=2, whiten=True, tta=True, tta_translate=1, plots=False,
                         checkpoint_every=0, amp=False)
    summary = train_mod.train(config)

    seeds = summary["runs"]["per_seed"]
    assert [s["seed"] for s in seeds] == [0, 1]
    for s in seeds:
        assert s["prep_seconds"] >= 2 * NORMALIZE_NAP           # train and test loaders, added to every seed
        assert s["init_seconds"] >= NORMALIZE_NAP               # the whitening is inside
        assert s["final_eval_seconds"] >= TTA_NAP               # the TTA evaluation, not the plain one
        assert 2 * PLAIN_NAP <= s["eval_seconds"] < TTA_NAP     # two per-epoch evaluations, no TTA
        assert s["run_seconds"] == pytest.approx(
            s["prep_seconds"] + s["init_seconds"] + s["train_seconds"] + s["final_eval_seconds"], rel=1e-12)
        assert s["run_seconds"] >= s["train_seconds"] + 3 * NORMALIZE_NAP + TTA_NAP
        # wall: everything of this seed (prep only where the loaders were built: the first seed)
        assert s["wall_seconds"] >= s["run_seconds"] - s["prep_seconds"] + s["eval_seconds"] + PLAIN_NAP
    assert seeds[0]["prep_seconds"] == seeds[1]["prep_seconds"]  # one measurement, counted in each seed
    assert seeds[0]["wall_seconds"] >= seeds[0]["run_seconds"]

    runs = summary["runs"]
    for key in CLOCKS:  # the last seed at the top, one value per seed under runs
        assert summary[key] == seeds[-1][key]
        assert runs[key] == [s[key] for s in seeds]
    assert runs["median_run_seconds"] == pytest.approx(sum(runs["run_seconds"]) / 2)
    assert summary["upload_seconds"] >= 0 and summary["data_seconds"] > 0
    assert summary["upload_seconds"] < NORMALIZE_NAP  # the upload is measured apart from the preparation


def test_the_device_loader_times_its_upload_apart_from_its_preparation(monkeypatch):
    import numpy as np

    monkeypatch.setattr(augment, "normalize_images", napping(augment.normalize_images, lambda *a, **k: NORMALIZE_NAP))
    images = np.zeros((8, 32, 32, 3), np.uint8)
    loader = augment.DeviceLoader(images, np.zeros(8), mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=4)
    assert loader.prep_seconds >= NORMALIZE_NAP > loader.upload_seconds >= 0
