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
(clamped to the teacher's schedule). LADD uses one head per transformer block, each
scoring every token of its block; a teacher here exposes one block (the middle one,
``Teacher.feature_tokens``: a UNet's positions or a transformer's tokens), so the
discriminator has one head, applied to each token with the noise level, its logits
averaged in the loss. ``tokens: false`` pools the tokens first (one logit per sample).
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
    """A head from the teacher's feature tokens ``(N, L, F)`` and ``c_noise = ln(s) / 4`` to a logit per token ``(N, L)``
    (``tokens=False``: the tokens' mean first, ``(N, 1)``)."""

    def __init__(self, in_features: int, width: int, tokens: bool = True) -> None:
        super().__init__()
        self.tokens = tokens
        self.net = nn.Sequential(nn.Linear(in_features + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, tokens: Tensor, sigma: Tensor) -> Tensor:
        if not self.tokens:
            tokens = tokens.mean(dim=1, keepdim=True)
        n, length, _ = tokens.shape
        c_noise = (sigma.to(tokens.dtype).log() / 4).reshape(-1, 1, 1).expand(n, length, 1)
        return self.net(torch.cat([tokens, c_noise], dim=2)).squeeze(-1)


def attach_head(fake: FakeScore, teacher: Teacher, width: int, tokens: bool = True) -> TeacherFeatureHead:
    """Add a :class:`TeacherFeatureHead` to the fake-score module (once), sized to the teacher's feature tokens."""
    head = getattr(fake, HEAD_NAME, None)
    if isinstance(head, TeacherFeatureHead):
        return head
    with torch.no_grad():
        probe = torch.zeros((2, *teacher.data_shape), device=teacher.sigmas.device)
        cond = teacher.sample_conditions(2)
        width_in = teacher.feature_tokens(probe, teacher.sigmas[-1:].expand(2), cond).shape[-1]
    head = TeacherFeatureHead(width_in, width, tokens).to(teacher.sigmas.device)
    fake.add_module(HEAD_NAME, head)
    return head


def logits(models: Models, x: Tensor, sigma: Tensor, cond: Optional[Tensor]) -> Tensor:
    """``D(x)``, ``(N, L)``: noise ``x`` at ``sigma``, embed it with the frozen teacher, score each token with the head."""
    head = getattr(models.fake_score, HEAD_NAME, None)
    if head is None:
        raise UserError("the ladd_adversarial term needs the head that fake_score_loss 'ladd_discriminator' adds")
    return head(models.teacher.feature_tokens(add_noise(x, sigma.to(x.dtype)), sigma, cond), sigma)


def generator_loss(d_fake: Tensor, kind: str) -> Tensor:
    """Hinge: ``-mean D(x)`` (ADD/LADD); non-saturating: ``mean softplus(-D(x))`` = ``-log sigmoid D``; means over
    samples and tokens."""
    return -d_fake.mean() if kind == "hinge" else F.softplus(-d_fake).mean()


def discriminator_loss(d_real: Tensor, d_fake: Tensor, kind: str) -> Tensor:
    """Hinge: ``mean relu(1 - D(real)) + mean relu(1 + D(fake))``; non-saturating: the binary cross-entropy."""
    if kind == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
