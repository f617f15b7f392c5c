"""f-distill's generator gradient: DMD's per-sample direction times a normalised ``h(r)``.

Xu, Nie and Vahdat, "One-step Diffusion Models with f-Divergence Distribution Matching"
(arXiv 2502.15681). Per generator step, without gradient:
``t ~ U{0.02 T, ..., 0.98 T}``, ``x_s = x + s eps``, ``r = D_real(x_s)``, ``f = D_fake(x_s)``,
then

1. the score difference normalised per sample as DMD does (eq. 8): ``(f - r) / mean|x - r|``;
2. the density ratio read from the discriminator's logit, ``r(x_s) = exp(clamp(D(x_s)))``
   (a logit trained with the binary cross-entropy on real vs generated estimates
   ``ln p_s / q_s``), and ``h(r)`` divided by its mean over the batch;

``grad = h_norm * (f - r) / mean|x - r|``, fed to DMD's surrogate
``0.5 mean((x - sg(x - grad))^2)``. The discriminator is DMD2's: the head that
fake_score_loss ``fake_score_denoise_gan`` attaches to the fake score as ``gan_head``
(trained there on the teacher's real data against generator samples).
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch import Tensor

from scoredistill.distill import HEAD_NAME, TimestepRange, add_noise, distribution_matching_loss, dmd_gradient
from scoredistill.errors import UserError
from scoredistill.registry import component
from scoredistill.roles import BuildContext, GeneratorBatch, GeneratorLoss, Models, append_dims

from scoredistill_fdistill.divergences import Divergence, weighting


def normalized_weights(divergence: str, logits: Tensor, max_log_ratio: float) -> Tensor:
    """``h(r) / mean_batch h(r)`` with ``r = exp(clamp(logit, -max_log_ratio, max_log_ratio))``."""
    h = weighting(divergence, logits.float().clamp(-max_log_ratio, max_log_ratio))
    return (h / h.mean().clamp(min=1e-12)).to(logits.dtype)


@component("f_divergence_gradient", role="generator_loss", paper="Xu et al. 2025 (f-distill, arXiv 2502.15681), the f-divergence gradient with the normalised weighting")
class FDivergenceGradient(GeneratorLoss):
    """DMD's KL gradient weighted per sample by ``h(r) = f''(r) r^2`` of the chosen f-divergence, ``r`` from the discriminator."""

    class Config(TimestepRange):
        divergence: Divergence = Field("jensen_shannon", description="the f-divergence (f-distill's best on ImageNet-64: jensen_shannon)")
        max_log_ratio: float = Field(5.0, gt=0, description="the discriminator's logit ln r is clipped to +-this before h(r) (a default chosen here: it bounds h for forward KL and Jeffreys)")

    def __init__(self, config: "FDivergenceGradient.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        self.config = config
        if ctx is not None and ctx.teacher is not None and ctx.teacher.num_classes is not None:
            raise UserError("f_divergence_gradient reads r from an unconditional discriminator trained on unlabelled real "
                            "data, but the teacher is class-conditional; use an unconditional teacher")

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        c, x, teacher = self.config, batch.x, models.teacher
        head = getattr(models.fake_score, HEAD_NAME, None)
        if head is None:
            raise UserError("f_divergence_gradient reads the density ratio from the discriminator head that fake_score_loss "
                            "'fake_score_denoise_gan' attaches to the fake score; use that fake-score loss")
        with torch.no_grad():
            sigma = c.sigmas(teacher, len(x))
            x_noisy = add_noise(x, sigma)
            real = teacher(x_noisy, sigma, batch.cond)
            fake = models.fake_score(x_noisy, sigma, batch.cond, x_clean=x)
            h = normalized_weights(c.divergence, head(models.fake_score.features(x_noisy, sigma, batch.cond)), c.max_log_ratio)
            grad = append_dims(h, x.ndim) * dmd_gradient(x, real, fake)
        return distribution_matching_loss(x, grad)
