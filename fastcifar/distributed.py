"""torchrun support: process group setup and teardown, and the few collectives the trainer needs.

    torchrun --standalone --nproc-per-node 8 -m fastcifar.train --data-dir ... --batch-size 64

With WORLD_SIZE unset (a plain `python -m fastcifar.train`) everything here is a no-op, so the single-process
path never touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """Rank and world size as torchrun sets them."""
    return Dist(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def process_group(d: Dist, device: torch.device) -> Iterator[None]:
    """nccl on CUDA, gloo on the CPU; always destroyed on the way out (success, error or interrupt)."""
    if not d.enabled:
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=10)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(backend, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_interleaved(t: torch.Tensor, d: Dist, n: int) -> torch.Tensor:
    """Undo the loaders' interleaved sharding: rank r holds items r, r + world, ...; returns all n in order."""
    if not d.enabled:
        return t
    parts: list[Any] = [None] * d.world_size
    dist.all_gather_object(parts, t.cpu())
    out = torch.empty(n, dtype=t.dtype)
    for r, part in enumerate(parts):
        out[r::d.world_size] = part
    return out


def broadcast_flag(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank if it is True on any: ranks must agree on when to stop."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    return bool(all_reduce_max(t, d).item())
