"""`python -m fastcifar.train` with each BatchNorm2d of the model replaced by a per-sample norm, so that a
sample's gradient does not depend on the rest of its batch (tests/test_distributed.py uses it to compare
2 ranks at batch B with 1 process at batch 2B exactly; with BatchNorm each rank normalizes over its own B).

    torchrun --standalone --nproc-per-node 2 tests/per_sample_norm_train.py --data-dir ... --device cpu
"""

from __future__ import annotations

import sys

from torch import nn


class PerSampleNorm(nn.GroupNorm):
    """GroupNorm with one group: each sample normalized over its own channels and pixels, affine per channel."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float | None = None):  # momentum: unused here
        super().__init__(1, channels, eps=eps)


if __name__ == "__main__":
    nn.BatchNorm2d = PerSampleNorm  # fastcifar.model looks the class up in torch.nn when it builds a model
    from fastcifar.errors import run_cli
    from fastcifar.train import main

    sys.exit(run_cli(main, prog="fastcifar.train"))
