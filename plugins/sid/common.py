"""SiD's per-sample reductions and its weight (the rest of the shared maths is the core's, :mod:`scoredistill.distill`)."""

from __future__ import annotations

import torch
from torch import Tensor

from scoredistill.distill import per_sample_mean


def per_sample_sum(t: Tensor) -> Tensor:
    """The sum of each sample's entries: ``(N, ...) -> (N,)`` (SiD's released code sums over ``C, H, W``)."""
    return t.flatten(1).sum(dim=1)


def dmd_weight(x: Tensor, real: Tensor) -> Tensor:
    """``1 / max(mean_{C,H,W} |x - D_real(x_s)|, 1e-5)`` per sample, in float32 and without gradient
    (DMD eq. 8; SiD's ``weight_factor``)."""
    with torch.no_grad():
        return 1.0 / per_sample_mean((x - real).abs()).float().clamp(min=1e-5).to(x.dtype)
