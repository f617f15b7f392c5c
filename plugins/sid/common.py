"""Small pieces of distillation maths this plugin needs (sigma form: ``x_s = x + s * eps``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scoredistill.roles import Teacher, append_dims


# shared: duplicate of scoredistill_dmd.losses.timestep_sigmas, to move into the core module
def timestep_sigmas(teacher: Teacher, n: int, min_ratio: float, max_ratio: float) -> Tensor:
    """``t ~ U{floor(min_ratio T), ..., floor(max_ratio T)}`` on the teacher's discrete schedule."""
    T = teacher.num_timesteps
    lo, hi = int(min_ratio * T), min(int(max_ratio * T), T - 1)
    return teacher.sigmas[torch.randint(lo, hi + 1, (n,), device=teacher.sigmas.device)]


# shared: duplicate of the noising in scoredistill_dmd.losses, to move into the core module
def add_noise(x: Tensor, sigma: Tensor) -> Tensor:
    """``x_s = x + s * eps`` with fresh ``eps ~ N(0, I)``."""
    return x + append_dims(sigma.to(x.dtype), x.ndim) * torch.randn_like(x)


def per_sample_sum(t: Tensor) -> Tensor:
    return t.flatten(1).sum(dim=1)


def per_sample_mean(t: Tensor) -> Tensor:
    return t.flatten(1).mean(dim=1)


def dmd_weight(x: Tensor, real: Tensor) -> Tensor:
    """``1 / max(mean_{C,H,W} |x - D_real(x_s)|, 1e-5)`` per sample, without gradient (DMD eq. 8; SiD's ``weight_factor``)."""
    with torch.no_grad():
        return 1.0 / per_sample_mean((x - real).abs()).float().clamp(min=1e-5).to(x.dtype)


# shared: duplicate of scoredistill_baselines.gan.GANHead, to move into the core module
class LogitHead(nn.Module):
    """A discriminator branch: an MLP from a network's features ``(N, F)`` to one realism logit ``(N,)``."""

    def __init__(self, in_features: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).squeeze(-1)
