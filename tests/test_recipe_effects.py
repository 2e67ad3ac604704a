"""The recipes' tricks do what they claim, observed in tensors over a few steps: evaluation uses every TTA
view, the training step runs under autocast, lookahead steps and ends on its slow weights, the final TTA
uses --tta-translate, the seed recipe (albumentations, Adam) trains end to end and its DataLoader workers
run one thread each.

    pytest -q tests/test_recipe_effects.py

Sabotages (one line each in the library) that fail these tests are named in each test's docstring.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import fastcifar.evaluate
from fastcifar.augment import DeviceLoader
from fastcifar.checkpoint import load_checkpoint
from fastcifar.evaluate import evaluate, shift
from fastcifar.train import main, train_one_epoch
from synthetic import write_learnable_dataset

CPU = torch.device("cpu")
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


def test_evaluate_uses_every_tta_view():
    """Sabotage: evaluate ignoring tta (plain logits); tta_logits dropping the mirrored or a shifted view."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), np.arange(16) % 10
    loader = DeviceLoader(images, labels, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=8, train=False,
                       channels_last=False)
    model = Recorder()
    batches = list(loader)
    results = {}
    for name, tta, translate in [("plain", False, 0), ("flip", True, 0), ("flip+translate", True, 1)]:
        model.inputs.clear()
        results[name] = evaluate(model, loader, CPU, None, tta=tta, tta_translate=translate)["loss"]
        views = {"plain": 1, "flip": 2, "flip+translate": 6}[name]
        assert len(model.inputs) == views * len(batches), name
    with torch.no_grad():
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        plain, mirrored = model(x), model(x.flip(3))
        shifted = [model(shift(v, t, t)) for v in (x, x.flip(3)) for t in (1, -1)]
        flip = (plain + mirrored) / 2
        both = 0.5 * flip + 0.5 * torch.stack(shifted).mean(0)
    want = {"plain": plain, "flip": flip, "flip+translate": both}
    for name, logits in want.items():
        assert results[name] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5), name
    assert len({round(v, 6) for v in results.values()}) == 3  # three different numbers


def test_amp_runs_the_training_step_under_bf16_autocast_on_the_cpu():
    """Sabotage: train_one_epoch's `autocast(device, dtype)` replaced by a null context."""
    for dtype, want in [(torch.bfloat16, True), (None, False)]:
        model = Recorder()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        batches = [(torch.randn(4, 3, 32, 32), torch.arange(4))] * 2
        no_scaling = torch.amp.GradScaler("cpu", enabled=False)
        train_one_epoch(model, nn.CrossEntropyLoss(), opt, sched, no_scaling, batches, CPU, dtype)
        assert [enabled for enabled, _ in model.autocast] == [want, want]
        if want:
            assert all(seen == torch.bfloat16 for _, seen in model.autocast)


def test_an_epoch_reads_nothing_from_the_device_until_reduce_epoch_reads_it_once(monkeypatch):
    """The hot loop never waits for the device: sabotage, a per-step `loss.item()` (say, for the non-finite
    check) or `float(loss)` in train_one_epoch, or a second read in reduce_epoch."""
    from fastcifar.distributed import Dist
    from fastcifar.lookahead import Lookahead
    from fastcifar.train import reduce_epoch

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), np.arange(64) % 10
    loader = DeviceLoader(images, labels, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=16)
    model = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=len(loader))
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            reads.append(_name) or _real(self, *a, **k))
    sums, lrs = train_one_epoch(model, nn.CrossEntropyLoss(), opt, sched, torch.amp.GradScaler("cpu", enabled=False),
                                iter(loader), CPU, None, Lookahead(model, len(loader)))
    assert reads == [] and len(lrs) == len(loader)
    loss, acc, seen, bad = reduce_epoch(sums, Dist())
    assert reads == ["tolist"] and seen == 64 and bad == -1 and 0 <= acc <= 1


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("learnable"), train_per_class=10, test_per_class=2)


def test_lookahead_steps_and_ends_on_the_slow_weights_and_final_tta_uses_the_translate(learnable, tmp_path,
                                                                                         monkeypatch):
    """Sabotage: lookahead.step() not called in train_one_epoch; Lookahead not built in start_seed; the final
    TTA in finish_seed evaluated with tta_translate=0."""
    translates = []
    tta_logits = fastcifar.evaluate.tta_logits
    monkeypatch.setattr(fastcifar.evaluate, "tta_logits",
                        lambda model, x, translate=0: translates.append(translate) or tta_logits(model, x, translate))
    out = tmp_path / "run"
    assert main(["--data-dir", str(learnable), "--out-dir", str(out), "--width", "4", "--batch-size", "20",
                 "--device", "cpu", "--epochs", "2", "--lookahead", "--tta-translate", "2", "--no-plots"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["lookahead"]["steps"] == 10  # 2 epochs x 5 steps
    slow, saved = ckpt["lookahead"]["slow"], load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], slow[k]) for k in slow)  # the run ends on the average
    assert set(translates) == {2}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tta"]["translate"] == 2 and summary["test_acc_tta"] is not None


def test_seed_recipe_trains_end_to_end_with_albumentations_and_adam(learnable, tmp_path):
    """The original notebook's recipe: Adam, One Cycle from lr/100, no label smoothing, the albumentations
    DataLoader (one worker here), fp32, no TTA."""
    pytest.importorskip("albumentations")
    out = tmp_path / "seed"
    assert main(["--preset", "seed", "--data-dir", str(learnable), "--out-dir", str(out), "--width", "4",
                 "--batch-size", "20", "--device", "cpu", "--epochs", "3", "--workers", "1", "--no-plots"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["pipeline"], config["optimizer"], config["amp"], config["tta"]) == ("albumentations", "adam",
                                                                                      False, False)
    summary = json.loads((out / "summary.json").read_text())
    run = load_checkpoint(out / "checkpoint.pt")["run"]
    assert len(run["lrs"]) == 15 and run["lrs"][0] == pytest.approx(4.79e-2 / 100)
    first, last = run["rows"][0], run["rows"][-1]
    assert last["train_loss"] < first["train_loss"] and last["train_acc"] > 0.4  # chance is 0.1
    assert summary["test_acc_tta"] is None and 0 <= summary["test_acc"] <= 1


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
