"""Model artifacts and resumable training checkpoints.

Two kinds of file, both written atomically (see `fastcifar.atomic`):

* `model.safetensors` — the trained weights plus, in the safetensors header metadata, everything needed to
  rebuild and use the model without the run directory: the `ModelConfig`, class names, the normalization
  mean/std (in [0, 1] pixel units) and the run's test accuracy. `export.onnx` needs nothing else.
* `checkpoint.pt` — the full training state for `--resume`: plain containers of tensors, numbers and
  strings saved with `torch.save` and loaded with `weights_only=True`, so loading never unpickles
  arbitrary objects.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fastcifar import __version__
from fastcifar.atomic import atomic_path
from fastcifar.errors import UserError, first_line
from fastcifar.model import ModelConfig, ResNet9

MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
_META_KEY = "fastcifar"


@dataclass
class ModelInfo:
    """What travels with the weights."""

    config: ModelConfig
    classes: list[str]
    mean: list[float]  # per channel, [0, 1] pixel units, training split
    std: list[float]
    test_acc: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"model": self.config.to_dict(), "classes": self.classes, "mean": self.mean,
                           "std": self.std, "test_acc": self.test_acc, "version": __version__,
                           "extra": self.extra})

    @classmethod
    def from_json(cls, text: str) -> "ModelInfo":
        d = json.loads(text)
        return cls(config=ModelConfig(**d["model"]), classes=list(d["classes"]), mean=list(d["mean"]),
                   std=list(d["std"]), test_acc=d.get("test_acc"), extra=d.get("extra", {}))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile / DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_model(path: str | os.PathLike, model: nn.Module, info: ModelInfo) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={_META_KEY: info.to_json()})


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A run directory or a .safetensors file -> the model file. Raises UserError when missing."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise UserError(f"checkpoint not found ({path}): pass a run directory or its {MODEL_FILE}")
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ResNet9, ModelInfo]:
    """Rebuild the model from `model.safetensors` (or a run directory holding one), in eval mode."""
    path = resolve_model_path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt checkpoint ({path}): {first_line(e)}; retrain or re-copy the file") from None
    if _META_KEY not in meta:
        raise UserError(f"not a fastcifar model ({path}): no '{_META_KEY}' metadata in the safetensors header")
    try:
        info = ModelInfo.from_json(meta[_META_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"corrupt checkpoint metadata ({path}): {e}") from None
    model = ResNet9(info.config)
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if bad or set(state) - set(expected):
        raise UserError(f"weights do not match the stated model (width {info.config.width}) in {path}: "
                        f"first mismatch '{(bad or sorted(set(state) - set(expected)))[0]}'; "
                        "the file was edited or belongs to another model")
    model.load_state_dict(state)
    return model.to(device).eval(), info


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """`state` must hold only tensors, numbers, strings, lists and dicts (loadable with weights_only)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint to resume from ({path}): the run has not finished an epoch yet")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"corrupt checkpoint ({path}): {first_line(e)}; "
                        "resume from a copy or start a new run") from None
