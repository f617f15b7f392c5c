"""DMD's losses: the distribution-matching (KL) gradient, the fake-score loss, regression.

Yin et al., "One-step Diffusion with Distribution Matching Distillation", CVPR 2024
(arXiv 2311.18828). Equation numbers refer to that paper. The maths other methods share
(noising, the KL gradient, the surrogate loss, the denoising loss) is in :mod:`scoredistill.distill`.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from scoredistill.distill import (TimestepRange, denoising_loss, distribution_matching_loss, dmd_gradient, per_sample_mean,
                                  query_denoisers)
from scoredistill.registry import component
from scoredistill.roles import BuildContext, FakeScoreLoss, GeneratorBatch, GeneratorLoss, Models


@component("kl_gradient", role="generator_loss", paper="Yin et al. 2024 (DMD), eq. 7-8 and Algorithm 2")
class KLGradient(GeneratorLoss):
    """DMD's distribution-matching term: the KL gradient from real and fake denoisers (Algorithm 2)."""

    class Config(TimestepRange):
        normalize: bool = Field(True, description="per-sample weight 1 / mean|x - D_real| (eq. 8)")

    def __init__(self, config: "KLGradient.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        self.config = config

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        x = batch.x
        c = self.config
        with torch.no_grad():
            _, real, fake = query_denoisers(models, x, c.sigmas(models.teacher, len(x)), batch.cond)
            grad = dmd_gradient(x, real, fake, c.normalize)
        return distribution_matching_loss(x, grad)


@component("fake_score_denoise", role="fake_score_loss", paper="Yin et al. 2024 (DMD), eq. 6; Karras et al. 2022, eq. 2")
class FakeScoreDenoise(FakeScoreLoss):
    """Denoising score matching of D_fake on generator samples, with the teacher's own weighting.

    The noise levels (``noise_levels``): ``timesteps`` (default) draws ``t`` uniformly over the
    teacher's discrete schedule, which is where the KL gradient queries ``D_fake`` (Algorithm 2
    samples its ``t`` on the same schedule; DMD2's EDM code trains its fake score so too);
    ``teacher`` draws them as the teacher was trained (``training_sigmas``). The two coincide
    for a teacher trained uniformly over its timesteps (DDPM-style). They differ for an EDM
    teacher: its log-normal ``ln s ~ N(-1.2, 1.2^2)`` puts 4% of the updates above
    ``s = 2.5``, where half of the KL gradient's queries are, so there ``D_fake`` lags the
    generator (digits measurements: benchmarks/README.md, "Digits FID over seeds").
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        noise_levels: Literal["timesteps", "teacher"] = Field(
            "timesteps", description="timesteps: uniform over the teacher's schedule (where the KL gradient queries "
                                   "D_fake); teacher: the teacher's own training distribution")

    def __init__(self, config: "FakeScoreDenoise.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        self.noise_levels = config.noise_levels

    def forward(self, x: Tensor, cond: Optional[Tensor], models: Models) -> Tensor:
        return denoising_loss(x, cond, models, self.noise_levels)


class PairRegression(GeneratorLoss):
    """Regression of ``G(z_ref)`` on the teacher's ODE output ``y_ref`` (DMD eq. 9) under a distance."""

    needs_pairs = True

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:  # pragma: no cover
        """Per-sample distance, shape ``(N,)``."""
        raise NotImplementedError

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        pred = batch.x_ref if batch.x_ref is not None else models.generator(batch.z_ref, batch.cond_ref)
        return self.distance(pred, batch.y_ref).mean()


@component("l2_regression", role="generator_loss", paper="Yin et al. 2024 (DMD), eq. 9 with L2 (Table 3 ablation)")
class L2Regression(PairRegression):
    """Mean squared error between G(z_ref) and the teacher's ODE output y_ref."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, config: "L2Regression.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        return per_sample_mean((pred - target) ** 2)


@component("pseudo_huber_regression", role="generator_loss", paper="Song & Dhariwal 2023 (iCT), Sec. 3.3: pseudo-Huber")
class PseudoHuberRegression(PairRegression):
    """Pseudo-Huber distance sqrt(|a-b|^2 + c^2) - c between G(z_ref) and y_ref."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        c: Optional[float] = Field(None, gt=0, description="default 0.00054 * sqrt(dim), as in iCT")

    def __init__(self, config: "PseudoHuberRegression.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        self.c = config.c

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        d = pred[0].numel()
        c = self.c if self.c is not None else 0.00054 * d**0.5
        return (((pred - target) ** 2).flatten(1).sum(1) + c**2).sqrt() - c
