"""A teacher family of its own, registered by a plugin that lives in ``tests/`` and touches no core file.

The family: a tiny convolutional x-prediction network, ``D(x_s, s) = F(x_s / sqrt(1 + s^2), log(s) / 4)``,
on 1x8x8 images, with a Karras table of noise levels and Gaussian "real" images. It says what the rest
of a run needs (parameterisation, data space, conditioning) and makes the trainable copies that the
stock generator (``unet_generator``) and fake score (``unet_denoiser``) start from.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from scoredistill.hookspecs import hookimpl
from scoredistill.registry import component
from scoredistill.roles import BuildContext, Teacher, stable_hash

SHAPE = (1, 8, 8)


class TinyX0Net(nn.Module):
    """``D(x_s, s)``: two convolutions on the VP-scaled input and a noise-level channel; features = the hidden map, pooled."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inp = nn.Conv2d(SHAPE[0] + 1, width, 3, padding=1)
        self.out = nn.Conv2d(width, SHAPE[0], 3, padding=1)

    def hidden(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        level = (s.log() / 4).expand(x.shape[0], 1, *x.shape[2:])
        return torch.nn.functional.silu(self.inp(torch.cat([x / (1 + s**2).sqrt(), level], dim=1)))

    def forward(self, x: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return self.out(self.hidden(x, sigma.reshape(-1).expand(x.shape[0])))

    def features(self, x: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return self.hidden(x, sigma.reshape(-1).expand(x.shape[0])).mean(dim=(2, 3))


@component("tiny_x0", role="teacher", paper="a test family: x-prediction on VP-scaled inputs")
class TinyX0Teacher(Teacher):
    """A random-weight x-prediction network on 1x8x8 images (a family registered from tests/)."""

    parameterisation = "x0"
    data_space = "pixels"
    conditioning = "none"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        seed: int = 0
        sampler_steps: int = 3

    def __init__(self, config: "TinyX0Teacher.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            self.net = TinyX0Net().requires_grad_(False)
        ramp = torch.linspace(0, 1, 40, dtype=torch.float64)
        self.register_buffer("sigmas", ((0.01 ** (1 / 7) + ramp * (20.0 ** (1 / 7) - 0.01 ** (1 / 7))) ** 7).float())
        self.data_shape, self.sigma_data, self.sampler_steps = SHAPE, 0.5, config.sampler_steps
        self._digest = stable_hash(*[p for p in self.net.state_dict().values()])

    def forward(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return self.net(x_noisy, sigma, cond)

    def fingerprint(self) -> str:
        return f"tiny-x0-{self._digest}"

    def trainable_copy(self) -> nn.Module:
        return copy.deepcopy(self.net).train().requires_grad_(True)

    def real_samples(self, n: int) -> Tensor:
        return 0.5 * torch.randn((n, *SHAPE), device=self.sigmas.device)


@hookimpl
def scoredistill_add_components() -> list[type]:
    return [TinyX0Teacher]
