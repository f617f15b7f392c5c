"""LADD's discriminator: trainable heads on the frozen teacher's features at noised inputs.

Sauer, Boesel, Dockhorn, Blattmann, Esser and Rombach, "Fast High-Resolution Image
Synthesis with Latent Adversarial Diffusion Distillation" (arXiv 2403.12015), Sec. 3:
generated and "real" samples are noised, ``x_s = x + s eps``, the frozen teacher
embeds them (``Teacher.features``) and a small head, conditioned on the noise level,
turns the features into a realism logit. The teacher is never trained; only the head
is, by the fake-score optimiser (the head is attached to the fake-score module, as
DMD2's branch is; LADD's method uses no fake score otherwise, ``sample_itself``).

Noise levels: LADD draws its discriminator's ``t`` from a logit-normal on the
rectified-flow path ``x_t = (1 - t) x + t eps``, which is ``x_s / (1 + s)`` at
``s = t / (1 - t)``: so ``logit(t) = ln s`` and the logit-normal is ``ln s ~ N(m, std^2)``
(clamped to the teacher's schedule). LADD uses one head per transformer block; a
teacher here exposes one feature vector, so the discriminator has one head.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from scoredistill.distill import add_noise
from scoredistill.errors import UserError
from scoredistill.roles import FakeScore, Models, Teacher

HEAD_NAME = "ladd_head"
Loss = Literal["hinge", "non_saturating"]


class NoiseLevels(BaseModel):
    """``ln s ~ N(mean, std^2)`` clamped to the teacher's schedule: LADD's logit-normal ``t`` (``logit t = ln s``)."""

    model_config = ConfigDict(extra="forbid")
    log_sigma_mean: float = Field(1.0, description="m of the logit-normal (m > 0 favours high noise levels, as LADD does)")
    log_sigma_std: float = Field(1.0, gt=0, description="s of the logit-normal")

    def sigmas(self, teacher: Teacher, n: int) -> Tensor:
        ln = self.log_sigma_mean + self.log_sigma_std * torch.randn((n,), device=teacher.sigmas.device)
        return ln.exp().clamp(teacher.sigma_min, teacher.sigma_max)


class TeacherFeatureHead(nn.Module):
    """A head from the teacher's features ``(N, F)`` and ``c_noise = ln(s) / 4`` to one logit ``(N,)``."""

    def __init__(self, in_features: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, features: Tensor, sigma: Tensor) -> Tensor:
        c_noise = (sigma.to(features.dtype).log() / 4).reshape(-1, 1).expand(features.shape[0], 1)
        return self.net(torch.cat([features, c_noise], dim=1)).squeeze(-1)


def attach_head(fake: FakeScore, teacher: Teacher, width: int) -> TeacherFeatureHead:
    """Add a :class:`TeacherFeatureHead` to the fake-score module (once), sized to the teacher's features."""
    head = getattr(fake, HEAD_NAME, None)
    if isinstance(head, TeacherFeatureHead):
        return head
    with torch.no_grad():
        probe = torch.zeros((2, *teacher.data_shape), device=teacher.sigmas.device)
        cond = teacher.sample_conditions(2)
        width_in = teacher.features(probe, teacher.sigmas[-1:].expand(2), cond).reshape(2, -1).shape[1]
    head = TeacherFeatureHead(width_in, width).to(teacher.sigmas.device)
    fake.add_module(HEAD_NAME, head)
    return head


def logits(models: Models, x: Tensor, sigma: Tensor, cond: Optional[Tensor]) -> Tensor:
    """``D(x)``: noise ``x`` at ``sigma``, embed it with the frozen teacher, score it with the head."""
    head = getattr(models.fake_score, HEAD_NAME, None)
    if head is None:
        raise UserError("the ladd_adversarial term needs the head that fake_score_loss 'ladd_discriminator' adds")
    return head(models.teacher.features(add_noise(x, sigma.to(x.dtype)), sigma, cond).reshape(len(x), -1), sigma)


def generator_loss(d_fake: Tensor, kind: str) -> Tensor:
    """Hinge: ``-mean D(x)`` (ADD/LADD); non-saturating: ``mean softplus(-D(x))`` = ``-log sigmoid D``."""
    return -d_fake.mean() if kind == "hinge" else F.softplus(-d_fake).mean()


def discriminator_loss(d_real: Tensor, d_fake: Tensor, kind: str) -> Tensor:
    """Hinge: ``mean relu(1 - D(real)) + mean relu(1 + D(fake))``; non-saturating: the binary cross-entropy."""
    if kind == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
