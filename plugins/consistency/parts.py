"""The parts consistency losses are built from: an EMA target network and timestep curricula.

Small classes with a pydantic ``Config``, chosen by name in a loss's settings (``target``,
``curriculum``), so that the next consistency-style method reuses them.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.roles import Teacher


class EMATarget(nn.Module):
    """The target network ``theta^- <- sg(mu theta^- + (1 - mu) theta)`` (Song et al. 2023, Algorithm 2).

    A frozen copy of the generator made when the run is built (``theta^- = theta``). :meth:`update` is
    called by the loss at the start of each generator step, with the weights the previous update left:
    the same sequence as updating after each step. ``mu = 0`` is iCT's and sCM's ``theta^- = sg(theta)``.
    Its weights are the loss term's state (checkpointed: a resumed run continues bit for bit).
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        decay: float = Field(0.95, ge=0, lt=1, description="mu (Song et al. 2023 CD: 0.95; iCT, sCM: 0)")

    def __init__(self, generator: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.network = copy.deepcopy(generator).eval().requires_grad_(False)
        self._pairs = None

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        pairs = self._pairs
        if pairs is None or pairs[0] is not generator:  # built once (the parameter lists)
            pairs = self._pairs = (generator, list(self.network.parameters()), list(generator.parameters()))
        _, mine, theirs = pairs
        if self.decay == 0.0:
            torch._foreach_copy_(mine, theirs)
        else:
            torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)

    def forward(self, *args, **kw) -> Tensor:
        return self.network.denoise(*args, **kw)


class Curriculum(BaseModel):
    """The discretisation ``s_min = s_1 < ... < s_N = s_max`` that a consistency loss picks adjacent levels from.

    ``karras``: Song et al. 2023's grid ``s_i = (s_min^(1/rho) + (i-1)/(N-1) (s_max^(1/rho) - s_min^(1/rho)))^rho``
    (their CD on CIFAR-10: N = 18). ``teacher``: the teacher's own timesteps (LCM on the DDPM grid).
    ``skip`` pairs level ``n`` with ``n + skip`` (LCM's skipping step k, Luo et al. 2023, Sec. 4.3).
    """

    model_config = ConfigDict(extra="forbid")
    grid: Literal["karras", "teacher"] = Field("karras", description="karras: N levels of EDM's grid; teacher: the teacher's timesteps")
    num_scales: int = Field(18, ge=2, description="N, levels of the karras grid (Song et al. 2023 CD: 18)")
    rho: float = Field(7.0, gt=0, description="karras grid spacing exponent")
    skip: int = Field(1, ge=1, description="k: the solver goes from level n + k down to level n (LCM's skipping step; 1 = adjacent)")

    def levels(self, teacher: Teacher) -> Tensor:
        """The ascending noise levels, on the teacher's device."""
        if self.grid == "teacher":
            levels = teacher.sigmas.detach().float()
        else:
            i = torch.arange(self.num_scales, dtype=torch.float64) / (self.num_scales - 1)
            lo, hi, inv = teacher.sigma_min, teacher.sigma_max, 1.0 / self.rho
            levels = ((lo**inv + i * (hi**inv - lo**inv)) ** self.rho).float().to(teacher.sigmas.device)
        if self.skip >= len(levels):
            raise UserError(f"consistency curriculum: skip={self.skip} needs more than {len(levels)} noise levels; "
                            f"allowed: 1 to {len(levels) - 1}")
        return levels

    def pairs(self, levels: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """``n`` draws of ``(s_n, s_{n+k})`` with ``n ~ U{1, ..., N - k}`` (Song et al. 2023, Algorithm 2)."""
        i = torch.randint(0, len(levels) - self.skip, (n,), device=levels.device)
        return levels[i], levels[i + self.skip]
