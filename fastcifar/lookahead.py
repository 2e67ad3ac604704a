"""Lookahead of the weights, airbench's variant: a slow copy of every floating-point tensor of the model
(weights and BatchNorm statistics) is an exponential moving average of the fast ones, updated every
`every` steps; at each update the fast weights jump back to the slow copy and training goes on from there.

The decay ramps with the cube of progress, final_decay * (t / total)**3: early training, where the weights move
fast, is left alone; late training, where SGD jitters around a minimum, is averaged. The run ends on the slow copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Lookahead:
    """Lookahead on `model`, the plain module (not a DDP wrapper); `final_decay`: airbench's 0.95 ** 5."""

    def __init__(self, model: nn.Module, total_steps: int, every: int = 5, final_decay: float = 0.95 ** 5):
        self.total_steps, self.every, self.final_decay = total_steps, every, final_decay
        self.steps = 0
        # state_dict() tensors share storage with the model's, and training only changes them in place,
        # so both lists are gathered once instead of at every update
        fast = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self.slow = {k: v.detach().clone() for k, v in fast.items()}
        self._fast, self._slow = list(fast.values()), list(self.slow.values())

    def decay(self, step: int) -> float:
        return self.final_decay * (step / self.total_steps) ** 3

    @torch.no_grad()
    def step(self) -> None:
        """Call after every optimizer step."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.update(self.decay(self.steps))
        if self.steps == self.total_steps:
            self.update(1.0)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self._slow, self._fast, 1.0 - decay)
        torch._foreach_copy_(self._fast, self._slow)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "slow": self.slow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        for k, v in state["slow"].items():
            self.slow[k].copy_(v)
