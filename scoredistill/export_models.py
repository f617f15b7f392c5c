"""One-step generators exported by scoredistill, as diffusers models (this file needs only torch and diffusers).

``scoredistill export RUN OUT`` copies this file into OUT as ``scoredistill_generator.py``
and names it in ``config.json`` (``auto_map``), so the folder loads without scoredistill::

    from diffusers import AutoModel
    g = AutoModel.from_pretrained("OUT", trust_remote_code=True)

or, with scoredistill installed::

    from scoredistill.export_models import OneStepMLPGenerator
    g = OneStepMLPGenerator.from_pretrained("OUT")

A generator maps noise ``z ~ N(0, I)`` of shape ``(N, *latent_shape)`` to samples ``x = G(z)``
in one network evaluation; ``g.sample(n, seed)`` draws ``z`` exactly as ``scoredistill sample``
does (``torch.randn`` on the CPU from ``torch.Generator().manual_seed(seed)``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class FourierFeatures(nn.Module):
    """Fixed Fourier features ``[cos 2pi zB, sin 2pi zB]`` (the frequencies ``B`` are stored weights)."""

    def __init__(self, dim: int, in_dim: int) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.zeros(in_dim, dim // 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = 2 * math.pi * (t.reshape(t.shape[0], -1) @ self.freqs)
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class OneStepMLPGenerator(ModelMixin, ConfigMixin):
    """An MLP one-step generator ``x = G(z)`` for flat data of dimension ``dim`` (scoredistill's ``mlp_generator``)."""

    @register_to_config
    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, input_features: int = 0,
                 auto_map: Optional[dict] = None) -> None:  # auto_map: where diffusers.AutoModel finds this class
        super().__init__()
        self.features = FourierFeatures(input_features, dim) if input_features else None
        layers: list[nn.Module] = []
        d = dim + input_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        layers.append(nn.Linear(d, dim))
        self.net = nn.Sequential(*layers)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.config.dim,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, self.features(z)], dim=1) if self.features is not None else z)

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` samples from noise seeded like ``scoredistill sample --seed``."""
        z = torch.randn((n, *self.latent_shape), generator=torch.Generator().manual_seed(seed))
        return self(z.to(self.device, self.dtype)).float().cpu()
