"""SiDA: SiD plus an adversarial term from a discriminator head on the fake score's encoder features.

Zhou, Zheng, Wang, Yin and Huang, "Adversarial Score identity Distillation: Rapidly
Surpassing the Teacher in One Step" (arXiv 2410.14919), Sec. 3. The fake score's
encoder doubles as a discriminator: a head on its features gives a logit ``D(x_s)``.

* Fake-score step (``sida_fake_score``): at noise levels drawn as the teacher was
  trained (the released code: EDM's log-normal), generator samples ``x`` and real
  images ``y`` are noised with the *same* ``s`` and ``eps``;
  ``mean_i lambda(s_i) sum_{C,H,W} (D_fake(x_s,i) - x_i)^2 + w_D mean_i lambda(s_i) * BCE``
  with ``BCE = (mean softplus(-D(y_s)) + mean softplus(D(x_s))) / 2``: denoising score
  matching plus the binary cross-entropy, both with the teacher's weighting ``lambda(s)``
  (the released code multiplies the batch's mean cross-entropy by each sample's ``lambda``).
* Generator step (``sida_adversarial``): at the SiD term's noise levels,
  ``numel(x) * mean_i softplus(-clamp(D(x_s,i), -10, 10)) * mean_i 1 / mean|x_i - D_real(x_s,i)|``:
  the non-saturating loss (its batch mean, as the released code's cross-entropy) scaled like
  SiD's summed loss and by the batch mean of SiD's weight ``1 / mean|x - r|`` (the released
  code divides the batch's mean cross-entropy by each sample's weight factor, then averages).
  The released code adds ``0.5 lsg L_SiD + 0.5 lsg_gan L_adv`` with ``lsg = 100`` and
  ``lsg_gan = 0.01`` in all its runs: the method's weights 50 and 0.005.

Here the two generator terms draw their own ``(s, eps)`` (the released code shares
one draw): the same expectation, other noise.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from scoredistill.distill import HEAD_NAME, add_noise, attach_gan_head, timestep_sigmas
from scoredistill.errors import UserError
from scoredistill.registry import component
from scoredistill.roles import BuildContext, FakeScoreLoss, GeneratorBatch, GeneratorLoss, Models, Teacher

from scoredistill_sid.common import dmd_weight, per_sample_sum
from scoredistill_sid.sid import SiDRange

def logits(models: Models, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
    """``D(x_s)``: the head on the fake score's features at ``(x_s, sigma)`` (the noise level is the caller's)."""
    head = getattr(models.fake_score, HEAD_NAME, None)
    if head is None:
        raise UserError("the sida_adversarial term needs the head that fake_score_loss 'sida_fake_score' adds to the fake score")
    return head(models.fake_score.features(x_noisy, sigma, cond))


def check_real_side(teacher: Teacher, what: str) -> None:
    """Fail before training when the teacher has no real data, or real data without the labels a conditional run needs."""
    teacher.real_samples(1)  # a teacher without real data raises its own one-line error
    if teacher.num_classes is not None:
        raise UserError(f"{what} trains an unconditional discriminator on unlabelled real data, but the teacher is "
                        "class-conditional; use an unconditional teacher or a method without a real-data term")


@component("sida_adversarial", role="generator_loss", paper="Zhou et al. 2025 (SiDA, arXiv 2410.14919), Sec. 3: the generator's adversarial loss")
class SiDAAdversarial(GeneratorLoss):
    """SiDA's generator GAN term: the non-saturating loss on the fake score's head, scaled and weighted like SiD's loss.

    ``numel(x) * mean softplus(-D(x_s)) * mean(1 / mean|x - r|)`` (see the module's docstring).
    """

    differentiates_fake_score = True  # scored through D_fake's features and head, whose weights stay fixed

    class Config(SiDRange):
        normalize: bool = Field(True, description="per-sample weight 1 / mean|x - D_real(x_s)| (SiDA's released code)")
        logit_clamp: float = Field(10.0, gt=0, description="D(x_s) clamped to +-this before the loss (released code: 10)")

    def __init__(self, config: "SiDAAdversarial.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        self.config = config

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        c, x = self.config, batch.x
        sigma = timestep_sigmas(models.teacher, len(x), c.min_timestep_ratio, c.max_timestep_ratio)
        x_noisy = add_noise(x, sigma)
        d = logits(models, x_noisy, sigma, batch.cond).clamp(-c.logit_clamp, c.logit_clamp)
        loss = F.softplus(-d).mean() * x[0].numel()
        if c.normalize:
            with torch.no_grad():
                real = models.teacher(x_noisy, sigma, batch.cond)
            loss = loss * dmd_weight(x, real).mean()
        return loss


@component("sida_fake_score", role="fake_score_loss", paper="Zhou et al. 2025 (SiDA, arXiv 2410.14919), Sec. 3: fake score and discriminator, one encoder")
class SiDAFakeScore(FakeScoreLoss):
    """Denoising loss of the fake score plus the discriminator's cross-entropy on real vs generated, both ``lambda(s)``-weighted."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        discriminator_weight: float = Field(1.0, ge=0, description="w_D on the cross-entropy (released code: 1, beside the "
                                                                   "denoising loss summed over the data's dimensions)")
        head_width: int = Field(64, ge=1, description="hidden width of the discriminator head")
        noise_levels: Literal["teacher", "timesteps"] = Field(
            "teacher", description="teacher: as the teacher was trained (released code: EDM's log-normal); timesteps: uniform")

    def __init__(self, config: "SiDAFakeScore.Config", ctx: BuildContext) -> None:
        super().__init__()
        self.config = config
        check_real_side(ctx.teacher, "sida_fake_score")
        attach_gan_head(ctx.fake_score, ctx.teacher, config.head_width, 1.0)  # the core's head, as DMD2's (fake_score.gan_head)

    def forward(self, x: Tensor, cond: Optional[Tensor], models: Models) -> Tensor:
        teacher, n = models.teacher, len(x)
        sigma = teacher.training_sigmas(n) if self.config.noise_levels == "teacher" else timestep_sigmas(teacher, n, 0.0, 1.0)
        real = teacher.real_samples(n).to(x.dtype)
        eps = torch.randn_like(x)
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x_noisy, real_noisy = x + s * eps, real + s * eps  # the same s and eps on both sides
        weight = teacher.loss_weight(sigma).to(x.dtype)
        loss = (weight * per_sample_sum((models.fake_score(x_noisy, sigma, cond, x_clean=x) - x) ** 2)).mean()
        if self.config.discriminator_weight:
            d = logits(models, torch.cat([x_noisy, real_noisy]), torch.cat([sigma, sigma]))  # unconditional (checked)
            bce = (F.softplus(d[:n]).mean() + F.softplus(-d[n:]).mean()) / 2
            loss = loss + self.config.discriminator_weight * weight.mean() * bce
        return loss
