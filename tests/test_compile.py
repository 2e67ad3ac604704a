"""Compilation happens inside warm_up only: evaluation batches of one shape (the short last batch
padded with ignored images), TTA views in the input's layout, and warm-up runs every evaluation forward.

    pytest -q tests/test_compile.py

The model is compiled with dynamo's cheap `eager` backend (torch.nn.Module.compile patched), so what is
counted is dynamo's work: frames compiled, recompilations and graph breaks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fastcifar import data as data_mod
from fastcifar import train as train_mod
from fastcifar.augment import IGNORE_LABEL, DeviceLoader
from fastcifar.config import TrainConfig
from fastcifar.data import CifarData
from fastcifar.evaluate import evaluate, tta_inputs, tta_logits

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def random_cifar(num_train: int, num_test: int) -> CifarData:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_train + num_test, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, num_train + num_test).astype(np.int64)
    return CifarData(images[:num_train], labels[:num_train], images[num_train:], labels[num_train:],
                     [f"class{i}" for i in range(10)], MEAN, STD, "in memory")


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"frames": dict(counters["frames"]), "unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


@pytest.mark.slow
def test_nothing_compiles_after_warm_up_and_nothing_breaks_the_graph(tmp_path, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compile_module(self, backend="eager"))
    after_warm_up = {}
    warm_up = train_mod.warm_up

    def recording_warm_up(*args, **kwargs):
        seconds = warm_up(*args, **kwargs)
        after_warm_up.update(dynamo_counts())
        return seconds

    monkeypatch.setattr(train_mod, "warm_up", recording_warm_up)
    made = []  # the TTA translations warm-up made views for
    monkeypatch.setattr(train_mod, "tta_inputs",
                        lambda x, translate=0: made.append(translate) or tta_inputs(x, translate))
    # 10,000 test images in batches of 64: the last one holds 16 (padded to 64)
    monkeypatch.setattr(data_mod, "load_cifar10", lambda *a, **k: random_cifar(320, 10_000))
    torch._dynamo.reset()
    counters.clear()
    config = TrainConfig(out_dir=str(tmp_path / "run"), width=4, batch_size=64, epochs=2, eval_every=1, tta=True,
                         tta_translate=1, compile=True, device="cpu", plots=False, checkpoint_every=0)
    summary = train_mod.train(config)

    assert summary["compile_seconds"] is not None and after_warm_up["frames"].get("ok", 0) >= 1
    assert dynamo_counts() == after_warm_up  # no frame compiled, nothing recompiled after warm-up
    assert after_warm_up["graph_breaks"] == 0
    assert made == [1]  # warm-up ran the shifted views too (they match the plain one's signature, so a
    # warm-up without them would not recompile today; this keeps them covered if that changes)
    assert len(summary["evaluations"]) == 2 and summary["evaluations"][1]["translate"] == 1


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_padded_last_batch_keeps_one_shape_and_counts_only_real_images(world_size):
    cifar = random_cifar(0, 10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    for rank in range(world_size):
        common = dict(mean=MEAN, std=STD, batch_size=4, train=False, rank=rank, world_size=world_size)
        padded = DeviceLoader(cifar.test_images, cifar.test_labels, pad_last=True, **common)
        plain = DeviceLoader(cifar.test_images, cifar.test_labels, **common)
        batches = list(padded)
        assert len(batches) == len(plain) and {tuple(x.shape) for x, _ in batches} == {(4, 3, 32, 32)}
        labels = torch.cat([y for _, y in batches])
        served = labels[labels != IGNORE_LABEL]
        assert served.tolist() == cifar.test_labels[rank::world_size].tolist()
        for tta, translate in ((False, 0), (True, 1)):
            a = evaluate(model, padded, torch.device("cpu"), None, tta=tta, tta_translate=translate)
            b = evaluate(model, plain, torch.device("cpu"), None, tta=tta, tta_translate=translate)
            assert a["acc"] == b["acc"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
            assert (a["preds"] == b["preds"]).all() and (a["labels"] == b["labels"]).all()


class ReusedOutput(nn.Module):
    """Returns the same fp32 buffer on every call, as a CUDA-graph replay does (reduce-overhead)."""

    def __init__(self):
        super().__init__()
        self.out = torch.zeros(0)

    def forward(self, x):
        fresh = x[:, :, 0, :4].reshape(len(x), -1).float()  # depends on the view: flips and shifts differ
        if self.out.shape != fresh.shape:
            self.out = torch.empty_like(fresh)
        return self.out.copy_(fresh)


def test_tta_does_not_keep_a_model_output_that_the_next_call_overwrites():
    x = torch.randn(5, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fresh = lambda v: v[:, :, 0, :4].reshape(len(v), -1).float()  # noqa: E731
    for translate in (0, 1, 2):
        expected = tta_logits(fresh, x, translate)
        assert not torch.equal(expected, fresh(x))  # the views differ, so overwriting would show
        assert torch.equal(tta_logits(ReusedOutput(), x, translate), expected)
