"""LADD's generator and discriminator losses, and ADD's distillation term.

LADD: Sauer et al. 2024 (arXiv 2403.12015), Sec. 3. ADD: Sauer, Lorenz, Blattmann and
Rombach, "Adversarial Diffusion Distillation" (arXiv 2311.17042), Sec. 3: the distillation loss.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from scoredistill.distill import add_noise, per_sample_mean, timestep_sigmas
from scoredistill.errors import UserError
from scoredistill.pairs import ODEPairs
from scoredistill.registry import component
from scoredistill.roles import BuildContext, FakeScoreLoss, GeneratorBatch, GeneratorLoss, Models

from scoredistill_ladd.discriminator import Loss, NoiseLevels, attach_head, discriminator_loss, generator_loss, logits


@component("ladd_adversarial", role="generator_loss", paper="Sauer et al. 2024 (LADD, arXiv 2403.12015), Sec. 3: the generator's adversarial loss")
class LADDAdversarial(GeneratorLoss):
    """The generator's adversarial loss through the frozen teacher's features and the trained head."""

    differentiates_fake_score = True  # the head lives on the fake-score module: the trainer keeps its weights fixed here

    class Config(NoiseLevels):
        loss: Loss = Field("hinge", description="hinge (LADD, after ADD) or non_saturating; the same as ladd_discriminator's")

    def __init__(self, config: "LADDAdversarial.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        self.config = config

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        sigma = self.config.sigmas(models.teacher, len(batch.x))
        return generator_loss(logits(models, batch.x, sigma, batch.cond), self.config.loss)


@component("ladd_discriminator", role="fake_score_loss", paper="Sauer et al. 2024 (LADD, arXiv 2403.12015), Sec. 3: heads on teacher features, synthetic data")
class LADDDiscriminator(FakeScoreLoss):
    """Trains the head on "real" samples (the teacher's own, or real data) against generator samples, both noised."""

    class Config(NoiseLevels):
        loss: Loss = Field("hinge", description="hinge (LADD, after ADD) or non_saturating (binary cross-entropy)")
        real: Literal["teacher", "data"] = Field(
            "teacher", description="the real side: the teacher's ODE samples (LADD's synthetic data) or the teacher's real data")
        head_width: int = Field(64, ge=1, description="hidden width of the head")
        tokens: bool = Field(True, description="score each feature token (LADD's heads); false: their mean, one logit per sample")
        teacher_samples: int = Field(5000, ge=1, description="real: teacher: ODE samples generated once (cached on disk)")
        teacher_steps: int = Field(18, ge=2, description="real: teacher: Heun steps of those samples (2 steps - 1 evaluations)")

    def __init__(self, config: "LADDDiscriminator.Config", ctx: BuildContext) -> None:
        super().__init__()
        self.config = config
        teacher = ctx.teacher
        self.pool = None
        if config.real == "data":
            teacher.real_samples(1)  # a teacher without real data raises its own one-line error
            if teacher.num_classes is not None:
                raise UserError("ladd_discriminator with real: data scores unlabelled real data, but the teacher is "
                                "class-conditional; use real: teacher (its samples carry their labels)")
        else:
            self.pool = ODEPairs(ODEPairs.Config(num_pairs=config.teacher_samples, steps=config.teacher_steps), ctx)
        attach_head(ctx.fake_score, teacher, config.head_width, config.tokens)

    def real_side(self, n: int, models: Models) -> tuple[Tensor, Optional[Tensor]]:
        if self.pool is None:
            return models.teacher.real_samples(n), None
        _, y, c = self.pool.sample(n)
        return y, c

    def forward(self, x: Tensor, cond: Optional[Tensor], models: Models) -> Tensor:
        n = len(x)
        real, real_cond = self.real_side(n, models)
        sigma = self.config.sigmas(models.teacher, 2 * n)
        d_fake = logits(models, x, sigma[:n], cond)
        d_real = logits(models, real.to(x.dtype), sigma[n:], real_cond)
        return discriminator_loss(d_real, d_fake, self.config.loss)


@component("add_distillation", role="generator_loss", paper="Sauer et al. 2023 (ADD, arXiv 2311.17042), Sec. 3: the distillation loss with d = squared L2")
class ADDDistillation(GeneratorLoss):
    """ADD's distillation loss: the squared distance from ``x`` to the teacher's denoising of ``x + s eps``, weighted by ``c(s)``.

    Per sample ``c(s) mean (x - sg(D_real(x + s eps, s)))^2``.

    ``t`` uniform over the teacher's timesteps; ``c(s)``: ``exponential`` is ADD's ``c(t) = alpha_t``, in sigma
    form ``1 / sqrt(1 + s^2)``; ``uniform`` is 1. Per-sample mean over the data's dimensions, averaged over the batch.
    Its gradient in ``x`` is ``2 c(s) (x - D_real(x_s)) / numel``: the real score alone, like SDS.
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weighting: Literal["exponential", "uniform"] = Field("exponential", description="c(s): exponential = alpha_t = 1/sqrt(1+s^2) (ADD); uniform = 1")

    def __init__(self, config: "ADDDistillation.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        self.config = config

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        x, teacher = batch.x, models.teacher
        sigma = timestep_sigmas(teacher, len(x), 0.0, 1.0)
        with torch.no_grad():
            target = teacher(add_noise(x, sigma.to(x.dtype)), sigma, batch.cond)
        c = (1 + sigma.to(x.dtype) ** 2).rsqrt() if self.config.weighting == "exponential" else torch.ones_like(sigma, dtype=x.dtype)
        return (c * per_sample_mean((x - target) ** 2)).mean()
