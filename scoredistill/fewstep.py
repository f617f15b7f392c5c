"""Few-step sampling with a noise-level-conditioned generator ``G(x_s, s)`` (DMD2's multi-step generator).

Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2,
arXiv 2405.14867), Sec. 4.5: a ``K``-step generator alternates a generator step and re-noising
over ``K`` fixed timesteps of the teacher's own grid (``999, 749, 499, 249`` for ``K = 4`` and
``T = 1000``)::

    x_{s_0} = s_0 z;   x_0^k = G(x_{s_k}, s_k);   x_{s_{k+1}} = x_0^k + s_{k+1} eps_k   (sigma form)

The output is ``x_0^{K-1}``. With ``K = 1`` the chain is ``G(s_max z, s_max)``: the one-step generator.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from scoredistill.errors import UserError


def chain_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """DMD2's ``K`` evenly spaced timesteps ``t_k = T - 1 - k floor(T / K)`` of a ``T``-step grid, largest first."""
    if steps < 1:
        raise UserError(f"the number of generator steps must be >= 1 (got {steps})")
    if steps > num_timesteps:
        raise UserError(f"{steps} generator steps is more than the teacher's schedule has ({num_timesteps} timesteps); "
                        f"allowed: 1 to {num_timesteps}")
    stride = num_timesteps // steps
    return [num_timesteps - 1 - k * stride for k in range(steps)]


def chain_sigmas(teacher_sigmas: Tensor, steps: int, timesteps: Optional[list[int]] = None) -> Tensor:
    """The noise levels ``s_0 > ... > s_{K-1}`` of a ``K``-step chain on the teacher's ascending grid ``sigmas``.

    ``timesteps``: explicit teacher timesteps (largest first) instead of DMD2's evenly spaced ones.
    """
    T = len(teacher_sigmas)
    ts = chain_timesteps(T, steps) if timesteps is None else list(timesteps)
    if len(ts) != steps:
        raise UserError(f"{len(ts)} timesteps were given for {steps} generator steps; give one per step")
    if any(not 0 <= t < T for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise UserError(f"generator timesteps {ts} must be decreasing and within 0..{T - 1} (the teacher's schedule)")
    return teacher_sigmas[torch.tensor(ts, device=teacher_sigmas.device)]


def sample_chain(denoise: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor], z: Tensor, sigmas: Tensor,
                 cond: Optional[Tensor] = None, noise: Optional[Callable[[], Tensor]] = None) -> Tensor:
    """Run the ``K``-step chain from noise ``z`` over ``sigmas`` (largest first); ``noise()`` draws each ``eps_k``.

    ``denoise(x_s, s, cond)`` is the generator's ``G(x_s, s)`` with per-sample ``s`` ``(N,)``.
    """
    n = z.shape[0]
    sigmas = sigmas.to(device=z.device, dtype=z.dtype)
    x = z * sigmas[0]
    x0 = x
    for k in range(len(sigmas)):
        x0 = denoise(x, sigmas[k].expand(n), cond)
        if k + 1 < len(sigmas):
            eps = noise() if noise is not None else torch.randn_like(z)
            x = x0 + sigmas[k + 1] * eps
    return x0


@torch.no_grad()
def chain_inputs(denoise: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor], z: Tensor, sigmas: Tensor,
                 level: Tensor, cond: Optional[Tensor] = None) -> Tensor:
    """DMD2's backward simulation: each sample's input ``x_{s_k}`` at its own chain step ``k = level[i]``.

    The chain runs from ``z`` with the generator's own (no-grad) steps and fresh noise, as at sampling
    time; samples at ``k = 0`` get ``s_0 z``. The training step then applies ``G`` once, with grad, to these inputs.
    """
    n = z.shape[0]
    sigmas = sigmas.to(device=z.device, dtype=z.dtype)
    x = z * sigmas[0]
    out = x.clone()
    for k in range(1, len(sigmas)):  # all K - 1 steps (a batch of any size has nearly every level; no host sync)
        x = denoise(x, sigmas[k - 1].expand(n), cond) + sigmas[k] * torch.randn_like(z)
        pick = (level == k).reshape(n, *(1,) * (z.ndim - 1))
        out = torch.where(pick, x, out)
    return out
