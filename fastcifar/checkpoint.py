"""Model artifacts and resumable training checkpoints, both written atomically (see `fastcifar.atomic`):

* `model.safetensors` — the trained weights and, in the header metadata, all that rebuilds and uses the model
  without the run directory (`export.onnx` needs nothing else): `ModelInfo`.
* `checkpoint.pt` — the full training state for `--resume` (`Training`): plain containers of tensors, numbers
  and strings loaded with `weights_only=True`, so loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from fastcifar import __version__
from fastcifar.atomic import atomic_path
from fastcifar.config import TrainConfig
from fastcifar.errors import UserError, first_line
from fastcifar.model import ModelConfig, ResNet9

MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
_META_KEY = "fastcifar"
CHECKPOINT_FORMAT = 2  # the layout `Training.save` writes and `load_resume` accepts


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
        return json.dumps({"model": asdict(self.config), "classes": self.classes, "mean": self.mean,
                           "std": self.std, "test_acc": self.test_acc, "version": __version__, "extra": self.extra})

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


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ResNet9, ModelInfo]:
    """Rebuild the model from `model.safetensors` (or a run directory holding one), in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise UserError(f"checkpoint not found ({path}): pass a run directory or its {MODEL_FILE}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, state = f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt checkpoint ({path}): {first_line(e)}; retrain or re-copy the file") from None
    if _META_KEY not in meta:
        raise UserError(f"not a fastcifar model ({path}): no '{_META_KEY}' metadata in the safetensors header")
    try:
        info = ModelInfo.from_json(meta[_META_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"corrupt checkpoint metadata ({path}): {e}") from None
    model = ResNet9(info.config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # the second line names the first missing, unexpected or misshapen tensor
        raise UserError(f"weights do not match the stated model (width {info.config.width}) in {path}: "
                        f"{str(e).splitlines()[1].strip().rstrip('.')}; the file was edited or belongs to another "
                        "model") from None
    return model.to(device).eval(), info


@dataclass
class RunState:
    """Where training stands after the last finished epoch; saved in every checkpoint."""

    run_index: int = 0            # which of the --runs seeds is in progress
    epoch: int = 0                # its finished epochs
    train_seconds: float = 0.0    # its clocks so far (runtime.SEED_CLOCKS), wall_seconds up to the checkpoint
    init_seconds: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    images: int = 0               # training samples processed (all ranks)
    lrs: list[float] = field(default_factory=list)                # lr of every step of this seed
    rows: list[dict[str, Any]] = field(default_factory=list)      # metrics of every epoch of every seed
    finished: list[dict[str, Any]] = field(default_factory=list)  # results of the finished seeds


@dataclass
class Training:
    """One seed in training: everything a checkpoint holds, with `save` and `restore` side by side. A run resumed
    from an epoch's checkpoint goes on as if never stopped: weights, optimizer, schedule, loss scaler, lookahead,
    the loader's random generator and the global ones are those the uninterrupted run had."""

    model: nn.Module                 # the plain module: not DDP, compiled in place or not
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler     # disabled unless training in fp16
    lookahead: Any                   # a Lookahead, or None
    loader: Any                      # the training loader; one with state_dict() is restored exactly
    run: RunState
    origin: float = 0.0              # perf_counter() - origin = the seed's wall seconds (not saved)

    def save(self, path: str | os.PathLike, config: dict[str, Any], device: torch.device) -> None:
        state = {"format": CHECKPOINT_FORMAT, "config": config, "run": asdict(self.run),
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "lookahead": self.lookahead.state_dict() if self.lookahead else {},
                 "loader": self.loader.state_dict() if hasattr(self.loader, "state_dict") else {},
                 "rng": rng_state(device)}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def restore(self, ckpt: dict[str, Any], device: torch.device) -> None:
        """Load what `save` wrote into these objects, in place (`run` is the checkpoint's already)."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when saved by a disabled scaler
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(ckpt["lookahead"])
        if ckpt["loader"]:  # the albumentations DataLoader has none: it starts its draws afresh
            self.loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"], device)


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's, numpy's and (on CUDA) the device's global generators, as tensors and numbers."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                   "gauss": float(gauss)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state,
            **({"cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {})}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint to resume from ({path}): the run has not finished an epoch yet")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"corrupt checkpoint ({path}): {first_line(e)}; "
                        "resume from a copy or start a new run") from None


def load_resume(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(run directory, checkpoint) for `--resume` RUN_DIR or RUN_DIR/checkpoint.pt, its config and run state checked."""
    run_dir = Path(path)
    if run_dir.is_file() and run_dir.name == CHECKPOINT_FILE:
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        raise UserError(f"--resume directory not found ({run_dir}): pass the --out-dir of the run to continue "
                        f"or its {CHECKPOINT_FILE}")
    ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
    if isinstance(ckpt, dict) and ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint of format {ckpt['format']} ({run_dir / CHECKPOINT_FILE}): this version "
                        f"resumes format {CHECKPOINT_FORMAT}; finish the run with the version that wrote it")
    try:
        TrainConfig(**ckpt["config"])
        RunState(**ckpt["run"])
    except (KeyError, TypeError) as e:
        raise UserError(f"checkpoint has no valid config ({run_dir / CHECKPOINT_FILE}): {e}; start a new run")
    return run_dir, ckpt
