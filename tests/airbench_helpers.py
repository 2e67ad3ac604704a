"""airbench 0.1.8's own net on the CPU, which the model and FLOP tests compare the airbench94 preset with."""

from __future__ import annotations

from unittest import mock

import pytest
import torch


def cuda_is_a_no_op():
    """A context in which airbench's .cuda() calls leave its modules on the CPU."""
    return mock.patch.object(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)


def airbench_net94() -> torch.nn.Module:
    """airbench 0.1.8's make_net94() built on the CPU in fp32 (it calls .half().cuda())."""
    airbench = pytest.importorskip("airbench")
    with cuda_is_a_no_op():
        return airbench.make_net94().float()

