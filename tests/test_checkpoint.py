"""fastcifar.checkpoint: when a run writes its resumable checkpoint and what the file holds.

    pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import io
from dataclasses import asdict

import numpy as np
import pytest
import torch

from fastcifar.checkpoint import RunState, Training, load_checkpoint, load_resume, rng_state, set_rng_state
from fastcifar.config import TrainConfig
from fastcifar.errors import UserError
from fastcifar.train import train
from synthetic import write_learnable_dataset


def checkpoint_epochs_seen_after_each_epoch(tmp_path, **settings) -> list[int | None]:
    """Train 3 epochs and, after each, read which epoch checkpoint.pt holds (None: no file yet)."""
    data = write_learnable_dataset(tmp_path / "data", train_per_class=6, test_per_class=2)
    out = tmp_path / "run"
    config = TrainConfig(data_dir=str(data), out_dir=str(out), width=4, batch_size=20, epochs=3, device="cpu",
                         plots=False, tta=False, **settings)
    seen = []

    def look(row):
        path = out / "checkpoint.pt"
        seen.append(load_checkpoint(path)["run"]["epoch"] if path.exists() else None)

    train(config, on_epoch=look)
    return seen


@pytest.mark.slow
def test_checkpoint_every_2_over_3_epochs_writes_at_epochs_2_and_3_only(tmp_path):
    """Sabotage: the every-N test dropped (a checkpoint every epoch); `or last` dropped (the final epoch's
    checkpoint missing when N does not divide the epochs)."""
    assert checkpoint_epochs_seen_after_each_epoch(tmp_path, checkpoint_every=2) == [None, 2, 3]


@pytest.mark.slow
def test_checkpoint_every_1_writes_each_epoch(tmp_path):
    """Sabotage: checkpoint_every read as 'every N + 1' or the first epoch skipped."""
    assert checkpoint_epochs_seen_after_each_epoch(tmp_path, checkpoint_every=1) == [1, 2, 3]


def training_state(seed: int, run: RunState) -> Training:
    torch.manual_seed(seed)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return Training(model=model, optimizer=opt, scheduler=sched, scaler=torch.amp.GradScaler("cpu", enabled=False),
                    lookahead=None, loader=None, run=run)


def test_a_saved_training_state_restores_the_weights_and_run_state_and_a_cut_file_is_refused(tmp_path):
    """Sabotage: RunState or the model left out of the checkpoint; restore skipping the weights; a truncated
    file read as a valid one."""
    saved = training_state(0, RunState(run_index=1, epoch=4, train_seconds=2.5))
    saved.save(tmp_path / "checkpoint.pt", {"width": 4}, torch.device("cpu"))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (ckpt["run"]["run_index"], ckpt["run"]["epoch"], ckpt["run"]["train_seconds"]) == (1, 4, 2.5)
    assert ckpt["config"] == {"width": 4}
    fresh = training_state(1, RunState())
    assert not torch.equal(fresh.model.weight, saved.model.weight)
    fresh.restore(ckpt, torch.device("cpu"))
    assert torch.equal(fresh.model.weight, saved.model.weight) and torch.equal(fresh.model.bias, saved.model.bias)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


def test_the_global_generators_round_trip_through_a_weights_only_checkpoint():
    torch.manual_seed(1)
    np.random.seed(2)
    np.random.standard_normal()  # leaves a cached gauss in numpy's state
    buffer = io.BytesIO()
    torch.save({"rng": rng_state(torch.device("cpu"))}, buffer)
    expected = (torch.rand(5), np.random.standard_normal(3), np.random.randint(0, 1 << 30, 4))
    torch.manual_seed(99)
    np.random.seed(99)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True)["rng"], torch.device("cpu"))
    got = (torch.rand(5), np.random.standard_normal(3), np.random.randint(0, 1 << 30, 4))
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and np.array_equal(got[2], expected[2])


def test_training_restore_sets_the_global_generators(monkeypatch):
    import fastcifar.checkpoint as checkpoint

    seen = []
    monkeypatch.setattr(checkpoint, "set_rng_state", lambda state, device: seen.append(state))

    class Stub:
        def load_state_dict(self, state):
            pass

    training = checkpoint.Training(Stub(), Stub(), Stub(), Stub(), None, object(), None)
    ckpt = {"model": {}, "optimizer": {}, "scheduler": {}, "scaler": {}, "lookahead": {}, "loader": {},
            "rng": {"marker": 1}}
    training.restore(ckpt, torch.device("cpu"))
    assert seen == [{"marker": 1}]


@pytest.mark.parametrize("edit, named", [("drop", "Missing key(s)"), ("extra", "Unexpected key(s)"),
                                         ("reshape", "size mismatch")])
def test_weights_that_do_not_match_the_stated_model_are_refused_naming_the_tensor(tmp_path, edit, named):
    """Sabotage: load_model loading with strict=False (a missing or extra tensor is silently ignored: part of the
    model stays at its random init), or the message losing the torch line that names the tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fastcifar.checkpoint import ModelInfo, load_model, save_model
    from fastcifar.model import ModelConfig, ResNet9

    path = tmp_path / "model.safetensors"
    save_model(path, ResNet9(ModelConfig(width=4)), ModelInfo(ModelConfig(width=4), list("abcdefghij"), [0.5] * 3,
                                                             [0.25] * 3))
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if edit == "drop":
        del tensors["fc.bias"]
    elif edit == "extra":
        tensors["fc.extra"] = torch.zeros(1)
    else:
        tensors["fc.bias"] = torch.zeros(11)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(UserError, match="weights do not match") as caught:
        load_model(path)
    assert named in str(caught.value) and "fc." in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("spoil", [lambda ckpt: ckpt.pop("config"), lambda ckpt: ckpt.update(config=[1, 2]),
                                   lambda ckpt: ckpt["config"].update(no_such_field=1),
                                   lambda ckpt: ckpt["run"].update(no_such_field=1)],
                         ids=["no config", "config not a mapping", "unknown config key", "unknown run key"])
def test_a_checkpoint_without_a_valid_config_or_run_state_is_refused_in_one_line(tmp_path, spoil):
    """Sabotage: load_resume not building the TrainConfig (nor the RunState) of what it read: resume_config,
    which trusts it, would end in a TypeError traceback."""
    ckpt = {"format": 2, "config": asdict(TrainConfig()), "run": asdict(RunState())}
    spoil(ckpt)
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match=r"checkpoint has no valid config \(.*checkpoint.pt\)"):
        load_resume(tmp_path)
