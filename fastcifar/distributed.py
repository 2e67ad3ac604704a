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


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[Dist, torch.device]]:
    """(this process's rank and world size as torchrun sets them, its device: under torchrun on CUDA the GPU
    of its LOCAL_RANK, made current). Under torchrun the process group (nccl on CUDA, gloo on the CPU) lives
    as long as the context and is destroyed on the way out (success, error or interrupt)."""
    d = Dist(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
             local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if not d.enabled:
        yield d, device
        return
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10),
                            device_id=device if device.type == "cuda" else None)
    try:
        yield d, device
    finally:
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, d: Dist, op: str = "sum") -> torch.Tensor:
    """`t` reduced in place over the ranks; `op` names a `dist.ReduceOp` ("sum", "max")."""
    if d.enabled:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()))
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


def host_group(device: torch.device) -> Any:
    """A process group for small host-side collectives: the default one under gloo (the CPU), a gloo group
    next to nccl, so a CPU tensor is reduced without touching (or waiting for) the GPU. Call on every rank."""
    return None if device.type == "cpu" else dist.new_group(backend="gloo")


class FlagVote:
    """Whether a flag is set on any rank, agreed without blocking: an asynchronous all-reduce (MAX) of a CPU
    tensor, started now and read later (`result`), when it has long finished. Every rank must start its
    votes at the same points, and then reads the same answer."""

    def __init__(self, flag: bool, group: Any = None):
        self.tensor = torch.tensor([int(flag)])
        self.work = dist.all_reduce(self.tensor, op=dist.ReduceOp.MAX, group=group, async_op=True)

    def result(self) -> bool:
        self.work.wait()  # host-side: waits for the other ranks' vote, never for the device
        return bool(self.tensor.item())
