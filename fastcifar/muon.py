"""Muon for the convolution filters and SGD for everything else, as one optimizer (airbench94_muon's split).

    python -m fastcifar.train --preset speedrun --optimizer muon --muon-lr 0.08 --data-dir ...

`torch.optim.Muon` orthogonalizes 2D updates only, so each trainable conv weight (out, in, k, k) is handed to
it as an (out, in*k*k) matrix sharing the weight's storage, in the weight's memory layout (channels_last: (out,
k, k, in)): a permutation of columns commutes with the orthogonalization, so the update is the same in either.
One Cycle schedules both halves through `param_groups`: the Muon groups carry `lr_scale` = muon_lr / lr, and
`fixed_momentum`, Muon's own momentum, which the cycle leaves as it is.
Muon's weight decay is off: BatchNorm follows every conv, so a filter's scale does not matter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def matrix_view(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in, kh, kw) as an (out, in*kh*kw) view of the same memory, in either memory layout. A
    gradient has its weight's strides (autograd's layout contract), so its view lines up with the weight's."""
    if not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        weight = weight.permute(0, 2, 3, 1)
    return weight.view(weight.shape[0], -1)  # raises rather than copies for any other layout


class MuonWithSGD(torch.optim.Optimizer):
    """Muon (`torch.optim.Muon`) on `matrices`, SGD with Nesterov momentum on the `sgd_groups`. `param_groups`
    is the two optimizers' groups (the same dicts), so a scheduler sets both."""

    def __init__(self, matrices: list[nn.Parameter], sgd_groups: list[dict[str, Any]], *, lr: float, muon_lr: float,
                 momentum: float, muon_momentum: float, weight_decay: float, fused: bool = False):
        self.weights = matrices
        self.views = [nn.Parameter(matrix_view(w.detach())) for w in matrices]  # share the weights' storage
        self.sgd = torch.optim.SGD(sgd_groups, lr=lr, momentum=momentum, nesterov=True,
                                   weight_decay=weight_decay, **({"fused": True} if fused else {}))
        self.muon = torch.optim.Muon([dict(params=self.views, lr_scale=muon_lr / lr, fixed_momentum=muon_momentum)],
                                     lr=muon_lr, momentum=muon_momentum, nesterov=True, weight_decay=0.0)
        self.defaults = self.sgd.defaults
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._share_groups()

    def _share_groups(self) -> None:
        self.param_groups = self.sgd.param_groups + self.muon.param_groups
        self.state = self.sgd.state  # Muon's own state travels in state_dict()

    @torch.no_grad()
    def step(self, closure=None):
        for weight, view in zip(self.weights, self.views):
            view.grad = None if weight.grad is None else matrix_view(weight.grad)
        self.sgd.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none)
        for weight, view in zip(self.weights, self.views):
            weight.grad = view.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"sgd": self.sgd.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sgd.load_state_dict(state_dict["sgd"])
        self.muon.load_state_dict(state_dict["muon"])
        self._share_groups()  # loading made new group dicts


def split_for_muon(groups: list[dict[str, Any]]) -> tuple[list[nn.Parameter], list[dict[str, Any]]]:
    """(the trainable 4D conv weights, the groups without them)."""
    matrices = [p for g in groups for p in g["params"] if p.ndim == 4]
    ids = {id(p) for p in matrices}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
    return matrices, [g for g in rest if g["params"]]
