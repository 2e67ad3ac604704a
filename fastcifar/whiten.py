"""Patch-whitening initialization of the first convolution (a trick from Keller Jordan's airbench).

The prep conv sees 3x3x3 = 27-dimensional patches. Its filters are set to the eigenvectors of the patch
covariance of (a sample of) the training images, scaled by 1/sqrt(eigenvalue): its outputs start out
decorrelated with unit variance, which the rest of the net learns from faster in short schedules. Each
eigenvector is used with both signs (the ReLU after BN would otherwise discard half of it), the largest
eigenvalues first; filters beyond 2 x 27 keep their random initialization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patch_eigens(images: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (rows) of the covariance of the kernel x kernel patches of
    normalized NCHW float `images`."""
    patches = F.unfold(images.float(), kernel_size=kernel).transpose(0, 1)  # (C*k*k, N, L)
    values, vectors = torch.linalg.eigh(torch.cov(patches.reshape(len(patches), -1).double(), correction=0))
    return values.flip(0), vectors.T.flip(0)


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set `conv`'s filters to whitening directions of `images`' patches (in place)."""
    k = conv.kernel_size[0]
    values, vectors = patch_eigens(images.to(conv.weight.device), k)
    filters = vectors / torch.sqrt(values + eps)[:, None]
    filters = torch.stack([filters, -filters], 1).reshape(-1, filters.shape[1])  # +v, -v, largest first
    n = min(conv.out_channels, len(filters))
    conv.weight[:n] = filters[:n].reshape(n, conv.in_channels, k, k).to(conv.weight.dtype)
