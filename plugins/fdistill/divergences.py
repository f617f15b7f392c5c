"""The weighting ``h(r) = f''(r) r^2`` of each f-divergence (Xu, Nie and Vahdat 2025, arXiv 2502.15681, its table of f-divergences).

``D_f(p || q) = E_q[f(p / q)]`` with ``p`` the data (teacher) and ``q`` the generator's
distribution, both noised; ``r = p_s / q_s``. The gradient of ``D_f(p_s || q_s)`` in the
generator's parameters is ``E[h(r) (s_q - s_p)(x_s) dx_s/dtheta]`` (their main result, sign
as a descent direction), so reverse KL (``h = 1``) is DMD's gradient.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

Divergence = Literal["reverse_kl", "softened_reverse_kl", "jensen_shannon", "squared_hellinger", "forward_kl", "jeffreys"]

#: name -> (f(r) as written in the docs, h(r) = f''(r) r^2)
WEIGHTINGS: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {
    "reverse_kl": ("-log r", torch.ones_like),
    "softened_reverse_kl": ("(r + 1) log((r + 1) / (2 r))", lambda r: 1 / (1 + r)),
    "jensen_shannon": ("r log r - (r + 1) log((r + 1) / 2)", lambda r: r / (1 + r)),
    "squared_hellinger": ("(sqrt(r) - 1)^2", lambda r: r.sqrt() / 2),
    "forward_kl": ("r log r", lambda r: r),
    "jeffreys": ("(r - 1) log r", lambda r: r + 1),
}


def weighting(divergence: str, log_ratio: Tensor) -> Tensor:
    """``h(r)`` at ``r = exp(log_ratio)``."""
    return WEIGHTINGS[divergence][1](log_ratio.exp())
