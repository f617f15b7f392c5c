"""The consistency family's maths: the teacher's one-step ODE solves, distances and TrigFlow.

Sigma form (Karras et al. 2022): ``x_s = x + s eps``, the probability-flow ODE
``dx/ds = (x - D(x, s)) / s``. TrigFlow (Lu & Song 2024, arXiv 2410.11081, Sec. 2.2):
``x_t = cos(t) x_0 + sin(t) sd z``, the same process with ``x_t = cos(t) x_s`` and ``s = sd tan(t)``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch.nn.functional as F
from torch import Tensor

from scoredistill.roles import append_dims

Denoiser = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def euler_step(denoise: Denoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond: Optional[Tensor] = None) -> Tensor:
    """One Euler step of ``dx/ds = (x - D(x, s)) / s`` from ``sigma`` to ``sigma_next`` (per-sample ``(N,)``)."""
    s, s_next = append_dims(sigma, x.ndim), append_dims(sigma_next, x.ndim)
    return x + (s_next - s) * (x - denoise(x, sigma, cond)) / s


def heun_step(denoise: Denoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond: Optional[Tensor] = None) -> Tensor:
    """One Heun step (Karras et al. 2022, Algorithm 1, lines 5-8) from ``sigma`` to ``sigma_next > 0``."""
    s, s_next = append_dims(sigma, x.ndim), append_dims(sigma_next, x.ndim)
    d = (x - denoise(x, sigma, cond)) / s
    x_euler = x + (s_next - s) * d
    d_next = (x_euler - denoise(x_euler, sigma_next, cond)) / s_next
    return x + (s_next - s) * 0.5 * (d + d_next)


SOLVERS = {"euler": euler_step, "heun": heun_step}


def guided(denoise: Denoiser, w: Union[float, Tensor]) -> Denoiser:
    """Classifier-free guidance folded into the solver (LCM, Luo et al. 2023, eq. 9): ``D_u + w (D_c - D_u)``,
    with ``D_u`` the denoiser without condition; ``w`` a float or one scale per sample ``(N,)``."""

    def d(x: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        uncond = denoise(x, sigma, None)
        scale = append_dims(w.to(x.dtype), x.ndim) if isinstance(w, Tensor) else w
        return uncond + scale * (denoise(x, sigma, cond) - uncond)

    return d


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample ``sqrt(||a - b||^2 + c^2) - c`` (Song & Dhariwal 2023, iCT, Sec. 3.3)."""
    return ((a - b).flatten(1).pow(2).sum(1) + c * c).sqrt() - c


def squared_l2(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean squared difference ``||a - b||^2 / dim``."""
    return (a - b).flatten(1).pow(2).mean(1)


def default_huber_c(dim: int) -> float:
    """iCT's ``c = 0.00054 sqrt(d)`` for data of ``d`` dimensions (Song & Dhariwal 2023, Sec. 3.3)."""
    return 0.00054 * math.sqrt(dim)


def lpips_distance(lpips_net, a: Tensor, b: Tensor) -> Tensor:
    """Per-sample LPIPS of images in [-1, 1], both resized to 224 (Song et al. 2023, Appendix C); grey images as RGB."""
    if a.shape[1] == 1:
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    if a.shape[-1] < 256:
        a = F.interpolate(a, size=224, mode="bilinear", align_corners=False)
        b = F.interpolate(b, size=224, mode="bilinear", align_corners=False)
    return lpips_net(a, b).flatten()


# --------------------------------------------------------------------------- TrigFlow


def trigflow_velocity(denoise: Denoiser, x_t: Tensor, t: Tensor, sigma_data: float, cond: Optional[Tensor] = None) -> Tensor:
    """``dx_t/dt`` of the probability-flow ODE in TrigFlow from a sigma-form denoiser.

    With ``x_s = x_t / cos t``, ``s = sd tan t``: ``E[x_0 | x_t] = D(x_s, s)`` and
    ``sd E[z | x_t] = (x_t - cos t D) / sin t``, so ``dx_t/dt = E[cos t sd z - sin t x_0 | x_t] = (cos t x_t - D) / sin t``.
    """
    cos, sin = append_dims(t.cos(), x_t.ndim), append_dims(t.sin(), x_t.ndim)
    d = denoise(x_t / cos, sigma_data * t.tan(), cond)
    return (cos * x_t - d) / sin


def trigflow_F(denoise: Denoiser, x_in: Tensor, t: Tensor, sigma_data: float, cond: Optional[Tensor] = None) -> Tensor:
    """The network ``F(x_t / sd, t)`` of sCM's consistency function ``f(x_t, t) = cos t x_t - sin t sd F`` (Lu & Song 2024,
    eq. 1) for a generator with sigma-form denoiser ``D``: ``f(x_t, t) = D(x_t / cos t, sd tan t)``, so
    ``F = (cos t x_t - D) / (sd sin t)``. ``x_in = x_t / sd``."""
    x_t = sigma_data * x_in
    cos, sin = append_dims(t.cos(), x_t.ndim), append_dims(t.sin(), x_t.ndim)
    d = denoise(x_t / cos, sigma_data * t.tan(), cond)
    return (cos * x_t - d) / (sigma_data * sin)
