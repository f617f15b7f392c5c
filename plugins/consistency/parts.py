"""Registered parts of consistency losses: the EMA target network and the noise-level curricula.

Roles ``target`` and ``curriculum``: a loss term names them in its settings (``target: {component:
ema_target, decay: 0.95}``, ``curriculum: {component: karras_grid, num_scales: 18}``) and builds them
with :func:`scoredistill.config.build_part`, so that any later method reuses them by name.
"""

from __future__ import annotations

import copy

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.registry import component
from scoredistill.sampling import karras_schedule
from scoredistill.roles import BuildContext, Curriculum, TargetNetwork, Teacher


@component("ema_target", role="target", paper="Song et al. 2023 (Consistency Models), Algorithm 2: theta- <- sg(mu theta- + (1 - mu) theta)")
class EMATarget(TargetNetwork):
    """The target network theta- <- sg(mu theta- + (1 - mu) theta), a frozen copy of the generator made at build time."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        decay: float = Field(0.95, ge=0, lt=1, description="mu (Song et al. 2023 CD: 0.95; iCT, sCM: 0, theta- = sg(theta))")

    def __init__(self, config: "EMATarget.Config", ctx: BuildContext) -> None:
        """``update`` is called by the loss at the start of each generator step with the weights the previous update
        left: the same sequence as updating after each step. The weights are the loss term's checkpointed state."""
        super().__init__()
        self.decay = config.decay
        self.network = copy.deepcopy(ctx.generator).eval().requires_grad_(False)
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

    def forward(self, x_noisy: Tensor, sigma: Tensor, cond=None, **kwargs) -> Tensor:
        return self.network.denoise(x_noisy, sigma, cond, **kwargs)


class _Skipping(Curriculum):
    """Adjacent levels ``n`` and ``n + skip`` (LCM's skipping step k, Luo et al. 2023, Sec. 4.3)."""

    skip: int = 1

    def checked(self, levels: Tensor) -> Tensor:
        if self.skip >= len(levels):
            raise UserError(f"consistency curriculum: skip={self.skip} needs more than {len(levels)} noise levels; "
                            f"allowed: 1 to {len(levels) - 1}")
        return levels

    def pairs(self, levels: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """``n`` draws of ``(s_n, s_{n+k})`` with ``n ~ U{1, ..., N - k}`` (Song et al. 2023, Algorithm 2)."""
        i = torch.randint(0, len(levels) - self.skip, (n,), device=levels.device)
        return levels[i], levels[i + self.skip]


@component("karras_grid", role="curriculum", paper="Song et al. 2023 (Consistency Models), Sec. 5 / Appendix C; Karras et al. 2022, eq. 5")
class KarrasGrid(_Skipping):
    """N levels s_i = (s_min^(1/rho) + (i-1)/(N-1) (s_max^(1/rho) - s_min^(1/rho)))^rho between the teacher's extremes."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        num_scales: int = Field(18, ge=2, description="N (Song et al. 2023 CD on CIFAR-10: 18)")
        rho: float = Field(7.0, gt=0, description="spacing exponent")
        skip: int = Field(1, ge=1, description="k: the solver goes from level n + k down to level n (1: adjacent)")

    def __init__(self, config: "KarrasGrid.Config", ctx: BuildContext) -> None:
        self.config, self.skip = config, config.skip

    def levels(self, teacher: Teacher) -> Tensor:
        c = self.config
        return self.checked(karras_schedule(c.num_scales, teacher.sigma_min, teacher.sigma_max, c.rho).to(teacher.sigmas.device))


@component("teacher_grid", role="curriculum", paper="Luo et al. 2023 (LCM), Sec. 4.3: the teacher's timesteps with a skipping step k")
class TeacherGrid(_Skipping):
    """The teacher's own noise levels (its discrete timesteps), with LCM's skipping step k."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        skip: int = Field(20, ge=1, description="k: timesteps between the solver's ends (LCM: 20 of 1000)")

    def __init__(self, config: "TeacherGrid.Config", ctx: BuildContext) -> None:
        self.config, self.skip = config, config.skip

    def levels(self, teacher: Teacher) -> Tensor:
        return self.checked(teacher.sigmas.detach().float())
