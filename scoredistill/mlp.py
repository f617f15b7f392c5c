"""Small networks for flat (low-dimensional) data, shared by plugins: an MLP, Fourier features of the
noise level, a class-label embedding, and an EDM-preconditioned MLP denoiser.

The denoiser is EDM-preconditioned (Karras et al. 2022, Table 1, eq. 7):
``D(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s))``, so that at any
noise level the network's target has unit variance.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.roles import append_dims, edm_preconditioning


def mlp(d_in: int, d_out: int, width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.SiLU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class FourierEmbedding(nn.Module):
    """Fixed random Fourier features ``[cos 2pi Bx, sin 2pi Bx]`` (Tancik et al. 2020) of ``(N,)`` or ``(N, d)`` inputs."""

    def __init__(self, dim: int, scale: float = 4.0, in_dim: int = 1, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(in_dim, dim // 2, generator=g) * scale)

    def forward(self, t: Tensor) -> Tensor:
        return fourier_features(t, self.freqs)


def fourier_features(t: Tensor, freqs: Tensor) -> Tensor:
    """``[cos 2pi t B, sin 2pi t B]`` of ``(N,)`` or ``(N, d)`` inputs ``t`` and frequencies ``B`` ``(d, F/2)``."""
    arg = 2 * math.pi * (t.reshape(t.shape[0], -1) @ freqs)
    return torch.cat([arg.cos(), arg.sin()], dim=1)


class LabelEmbedding(nn.Module):
    """A learned embedding of class labels ``(N,)`` for a class-conditional teacher's networks; none without classes."""

    def __init__(self, num_classes: Optional[int], dim: int = 16) -> None:
        super().__init__()
        self.dim = dim if num_classes else 0
        self.table = nn.Embedding(num_classes, dim) if num_classes else None

    def parts(self, cond: Optional[Tensor]) -> list[Tensor]:
        """``[embedding(cond)]`` to concatenate to a network's input, or ``[]`` without classes."""
        if self.table is None:
            return []
        if cond is None:
            raise UserError("this network is class-conditional (its teacher is): call it with class labels")
        return [self.table(cond)]


class MLPDenoiserNet(nn.Module):
    """EDM-preconditioned MLP denoiser ``D(x, s, c)`` for flat data of dimension ``dim`` (``c``: class labels, if any)."""

    def __init__(self, dim: int, sigma_data: float, width: int, depth: int, embed_dim: int = 32,
                 input_features: int = 0, input_scale: float = 1.0, num_classes: Optional[int] = None,
                 time_scale: float = 4.0) -> None:
        super().__init__()
        self.sigma_data = sigma_data
        self.embed = FourierEmbedding(embed_dim, time_scale)  # of c_noise = log(s) / 4; frequencies 2 pi N(0, time_scale^2)
        self.input_embed = FourierEmbedding(input_features, input_scale, in_dim=dim, seed=1) if input_features else None
        self.labels = LabelEmbedding(num_classes)
        self.net = mlp(dim + embed_dim + input_features + self.labels.dim, dim, width, depth)

    def _inputs(self, x: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """The MLP's input ``(N, F)`` at ``(x, sigma, cond)``, with ``c_skip`` and ``c_out`` (one preconditioning)."""
        if sigma.dtype != x.dtype or sigma.shape != x.shape[:1]:  # one noise level per sample, in x's precision
            sigma = sigma.to(x.dtype).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, self.sigma_data)
        h = append_dims(c_in, x.ndim) * x
        parts = [h, fourier_features(c_noise, self.embed.freqs)]
        if self.input_embed is not None:
            parts.append(fourier_features(h, self.input_embed.freqs))
        return torch.cat(parts + self.labels.parts(cond), dim=1), c_skip, c_out

    def features(self, x: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """The last hidden layer ``(N, width)`` at ``(x, sigma, cond)``."""
        h = self._inputs(x, sigma, cond)[0]
        for layer in itertools.islice(self.net, len(self.net) - 1):  # (slicing a Sequential builds a new module per call)
            h = layer(h)
        return h

    def forward(self, x: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        h, c_skip, c_out = self._inputs(x, sigma, cond)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * self.net(h)
