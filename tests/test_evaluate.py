"""fastcifar.evaluate: plain and TTA evaluation (flip and translate views), its dtype and layout, the gathered
predictions and the evaluate command.

    pytest -q tests/test_evaluate.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcifar import runtime
from fastcifar.augment import DeviceLoader
from fastcifar.distributed import Dist
from fastcifar.evaluate import evaluate, shift
from fastcifar.model import ModelConfig, ResNet9
from synthetic import CLASSES, Recorder, write_learnable_dataset


CPU = torch.device("cpu")


def test_shift_translates_exactly_and_tta_averages_views():
    from fastcifar.evaluate import tta_logits

    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    moved = shift(x, 1, 1)
    assert torch.equal(moved[..., 1:, 1:], x[..., :-1, :-1])  # content moves down-right by one pixel
    assert torch.equal(shift(x, -1, -1)[..., :-1, :-1], x[..., 1:, 1:])

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 4))
    views = [x, x.flip(3)]
    want = torch.stack([model(v) for v in views]).mean(0)
    torch.testing.assert_close(tta_logits(model, x), want)
    moved = [shift(v, t, t) for v in views for t in (1, -1)]
    want2 = 0.5 * want + 0.5 * torch.stack([model(v) for v in moved]).mean(0)
    torch.testing.assert_close(tta_logits(model, x, 1), want2)


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


def test_tta_views_keep_the_input_dtype_and_channels_last_layout_under_cpu_autocast():
    """Sabotage: tta_inputs returning the views as they are (a shifted view is a strided slice, and fp32 under CPU
    autocast, so a compiled model would recompile for it)."""
    from fastcifar.evaluate import tta_inputs

    x = torch.randn(4, 3, 32, 32).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        views = tta_inputs(x, translate=1)
    assert len(views) == 6
    for view in views:
        assert view.dtype == x.dtype and view.shape == x.shape
        assert view.is_contiguous(memory_format=torch.channels_last)


def test_each_tta_input_is_the_view_tta_views_names_at_its_place():
    """Sabotage: tta_inputs ordering the shifted views by mirror first (x+t, x-t, flip+t, flip-t) while tta_views
    names them shift first (shift+t, flip+shift+t, shift-t, flip+shift-t): the evaluation record would name them
    wrongly."""
    from fastcifar.evaluate import tta_inputs, tta_views

    x = torch.randn(2, 3, 8, 8)
    by_name = {"identity": x, "flip": x.flip(3)}
    for t in (2, -2):
        by_name[f"shift{t:+d}"], by_name[f"flip+shift{t:+d}"] = shift(x, t, t), shift(x.flip(3), t, t)
    names = tta_views(True, 2)
    assert sorted(names) == sorted(by_name)
    for name, view in zip(names, tta_inputs(x, 2), strict=True):
        assert torch.equal(view, by_name[name]), name


def test_gathered_predictions_come_back_in_test_set_order(monkeypatch):
    """Sabotage: gather_interleaved concatenating the ranks' shards instead of interleaving them (the confusion
    matrix and misclassified images would pair predictions with the wrong labels)."""
    from fastcifar import distributed
    from fastcifar.distributed import gather_interleaved

    full = torch.arange(7) * 10
    shards = [full[r::2] for r in range(2)]

    def all_gather_object(parts, obj):
        parts[:] = [s.clone() for s in shards]

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    assert torch.equal(gather_interleaved(shards[0], Dist(rank=0, world_size=2), 7), full)


def test_evaluate_command_uses_the_amp_dtype_flag(tmp_path, monkeypatch, capsys):
    """Sabotage: fastcifar.evaluate.main calling amp_dtype without --amp-dtype (always auto)."""
    import fastcifar.evaluate as evaluate_mod
    from fastcifar.checkpoint import ModelInfo, save_model

    data = write_learnable_dataset(tmp_path / "data", train_per_class=1, test_per_class=1)
    save_model(tmp_path / "model.safetensors", ResNet9(ModelConfig(width=4)),
               ModelInfo(ModelConfig(width=4), list(CLASSES), [0.5] * 3, [0.25] * 3))
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda cpuinfo=None: False)  # auto = fp32 on this CPU
    dtypes = []
    monkeypatch.setattr(evaluate_mod, "evaluate",
                        lambda model, loader, device, dtype, **k: dtypes.append(dtype) or {"acc": 0.5, "loss": 1.0})
    assert evaluate_mod.main(["--checkpoint", str(tmp_path / "model.safetensors"), "--data-dir", str(data),
                              "--device", "cpu", "--amp-dtype", "fp16", "--json"]) == 0
    assert dtypes == [torch.float16] * 3
    assert len(json.loads(capsys.readouterr().out)["evaluations"]) == 3
