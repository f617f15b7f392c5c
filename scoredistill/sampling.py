"""Noise-level grids and the deterministic probability-flow ODE sampler.

Karras et al. 2022 ("EDM"), eq. 5 for the grid and Algorithm 1 (with
``S_churn = 0``) for Heun's second-order method on
``dx/ds = (x - D(x, s)) / s``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

Denoiser = Callable[..., Tensor]


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM eq. 5: ``num_steps`` levels from ``sigma_max`` down to ``sigma_min``, then a final 0."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    i = torch.arange(num_steps, dtype=torch.float64)
    ramp = i / max(num_steps - 1, 1)
    inv = 1.0 / rho
    s = (sigma_max**inv + ramp * (sigma_min**inv - sigma_max**inv)) ** rho
    return torch.cat([s, s.new_zeros(1)])


def karras_schedule(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """A teacher's discrete schedule: the ``n`` levels of :func:`karras_sigmas` (EDM eq. 5) in ascending order, float32."""
    return karras_sigmas(n, sigma_min, sigma_max, rho)[:-1].flip(0).float()


@torch.no_grad()
def heun_sample(denoiser: Denoiser, x_start: Tensor, sigmas: Tensor, cond: Optional[Tensor] = None) -> Tensor:
    """Solve the probability-flow ODE from ``x_start`` (noise at ``sigmas[0]``) to ``sigmas[-1]``.

    EDM Algorithm 1, deterministic: an Euler step corrected by the slope at its end
    point (Heun), except for the last step to ``sigma = 0``, which is plain Euler.
    Uses ``2 * (len(sigmas) - 1) - 1`` denoiser evaluations when the grid ends at 0.
    """
    x = x_start
    sigmas = sigmas.to(x.device)
    n = x.shape[0]
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        s_cur_b = s_cur.to(x.dtype).expand(n)
        d_cur = (x - denoiser(x, s_cur_b, cond)) / s_cur.to(x.dtype)
        x_next = x + (s_next - s_cur).to(x.dtype) * d_cur
        if s_next > 0:
            s_next_b = s_next.to(x.dtype).expand(n)
            d_next = (x_next - denoiser(x_next, s_next_b, cond)) / s_next.to(x.dtype)
            x_next = x + (s_next - s_cur).to(x.dtype) * 0.5 * (d_cur + d_next)
        x = x_next
    return x
