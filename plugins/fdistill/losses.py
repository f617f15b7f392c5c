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
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from scoredistill.errors import UserError
from scoredistill.registry import component
from scoredistill.roles import BuildContext, GeneratorBatch, GeneratorLoss, Models, append_dims

from scoredistill_fdistill.divergences import Divergence, weighting

#: the attribute under which fake_score_loss 'fake_score_denoise_gan' attaches DMD2's discriminator head
GAN_HEAD = "gan_head"


# shared: duplicate of scoredistill_dmd.losses.dmd_gradient, to move into the core module
def dmd_direction(x: Tensor, real: Tensor, fake: Tensor) -> Tensor:
    """``(D_fake - D_real) / mean_{C,H,W} |x - D_real|`` per sample (DMD eq. 7-8), non-finite entries zeroed."""
    return torch.nan_to_num((fake - real) / append_dims((x - real).abs().flatten(1).mean(1), x.ndim))


# shared: duplicate of scoredistill_dmd.losses.distribution_matching_loss, to move into the core module
def surrogate(x: Tensor, grad: Tensor) -> Tensor:
    """``0.5 * mean((x - sg(x - grad))**2)``: its gradient in ``x`` is ``grad / numel``."""
    return 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")


def normalized_weights(divergence: str, logits: Tensor, max_log_ratio: float) -> Tensor:
    """``h(r) / mean_batch h(r)`` with ``r = exp(clamp(logit, -max_log_ratio, max_log_ratio))``."""
    h = weighting(divergence, logits.float().clamp(-max_log_ratio, max_log_ratio))
    return (h / h.mean().clamp(min=1e-12)).to(logits.dtype)


@component("f_divergence_gradient", role="generator_loss", paper="Xu et al. 2025 (f-distill, arXiv 2502.15681), the f-divergence gradient with the normalised weighting")
class FDivergenceGradient(GeneratorLoss):
    """DMD's KL gradient weighted per sample by ``h(r) = f''(r) r^2`` of the chosen f-divergence, ``r`` from the discriminator."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        divergence: Divergence = Field("jensen_shannon", description="the f-divergence (f-distill's best on ImageNet-64: jensen_shannon)")
        max_log_ratio: float = Field(5.0, gt=0, description="the discriminator's logit ln r is clipped to +-this before h(r) (a default chosen here: it bounds h for forward KL and Jeffreys)")
        min_timestep_ratio: float = Field(0.02, ge=0, le=1, description="t >= min_ratio * T (DMD: 0.02)")
        max_timestep_ratio: float = Field(0.98, ge=0, le=1, description="t <= max_ratio * T (DMD: 0.98)")

        @model_validator(mode="after")
        def _ordered(self):
            if self.min_timestep_ratio > self.max_timestep_ratio:
                raise ValueError("min_timestep_ratio must be <= max_timestep_ratio")
            return self

    def __init__(self, config: "FDivergenceGradient.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        self.config = config
        if ctx is not None and ctx.teacher is not None and ctx.teacher.num_classes is not None:
            raise UserError("f_divergence_gradient reads r from an unconditional discriminator trained on unlabelled real "
                            "data, but the teacher is class-conditional; use an unconditional teacher")

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        c, x, teacher = self.config, batch.x, models.teacher
        head = getattr(models.fake_score, GAN_HEAD, None)
        if head is None:
            raise UserError("f_divergence_gradient reads the density ratio from the discriminator head that fake_score_loss "
                            "'fake_score_denoise_gan' attaches to the fake score; use that fake-score loss")
        with torch.no_grad():
            T = teacher.num_timesteps
            t = torch.randint(int(c.min_timestep_ratio * T), min(int(c.max_timestep_ratio * T), T - 1) + 1, (len(x),), device=teacher.sigmas.device)
            sigma = teacher.sigmas[t]
            x_noisy = x + append_dims(sigma.to(x.dtype), x.ndim) * torch.randn_like(x)
            real = teacher(x_noisy, sigma, batch.cond)
            fake = models.fake_score(x_noisy, sigma, batch.cond, x_clean=x)
            h = normalized_weights(c.divergence, head(models.fake_score.features(x_noisy, sigma, batch.cond)), c.max_log_ratio)
            grad = append_dims(h, x.ndim) * dmd_direction(x, real, fake)
        return surrogate(x, grad)
