"""SiD's generator loss: a Fisher divergence estimated through the score identity.

Zhou, Zheng, Wang, Yin and Huang, "Score identity Distillation: Exponentially Fast
Distillation of Pretrained Diffusion Models for One-Step Generation", ICML 2024
(arXiv 2404.04057), Sec. 3-4. Sigma form: ``x = G(z)``, ``x_s = x + s eps``,
``r = D_real(x_s, s)`` (the paper's ``f_phi``, the teacher) and ``f = D_fake(x_s, s)``
(``f_psi``, the fake score trained online on the generator's samples).

The Fisher divergence between the noised teacher and generator distributions is
``E ||r - f||^2 / s^4`` (scores from denoisers); the score identity
``E[x | x_s] = f`` turns one factor into ``(r - x)``. The loss the paper minimises
(Sec. 4, its loss with ``alpha``; the released code) is, per sample,

    L = (r - f)^T ((r - x) - alpha (r - f)) / mean_{C,H,W} |x - r|

summed over the data's dimensions and averaged over the batch, with ``t`` uniform
on the EDM grid up to ``tmax = 800`` of 1000 (here: ``t ~ U{0, ..., 0.8 T}`` on the
teacher's schedule) and the weight ``1 / mean |x - r|`` without gradient.
The gradient reaches the generator through every ``x`` in the formula: ``x``
itself, and ``x_s`` as the input of *both* denoisers (the fake score's parameters
are held fixed: ``differentiates_fake_score``, so the trainer freezes them).
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field
from torch import Tensor

from scoredistill.distill import TimestepRange, add_noise, timestep_sigmas
from scoredistill.registry import component
from scoredistill.roles import BuildContext, GeneratorBatch, GeneratorLoss, Models

from scoredistill_sid.common import dmd_weight, per_sample_sum


class SiDRange(TimestepRange):
    """Noise levels of the generator loss: ``t ~ U{min_ratio T, ..., max_ratio T}`` (SiD: ``tmax = 800`` of 1000)."""

    min_timestep_ratio: float = Field(0.0, ge=0, le=1, description="t >= min_ratio * T on the teacher's schedule")
    max_timestep_ratio: float = Field(0.8, ge=0, le=1, description="t <= max_ratio * T (SiD: tmax = 800 of 1000)")


def sid_loss(x: Tensor, real: Tensor, fake: Tensor, alpha: float, normalize: bool = True) -> Tensor:
    """Per-sample ``sum((r - f) * ((r - x) - alpha (r - f))) * w`` with ``w = 1 / mean|x - r|`` (or 1)."""
    diff = real - fake
    loss = per_sample_sum(diff * ((real - x) - alpha * diff))
    return loss * dmd_weight(x, real) if normalize else loss


@component("score_identity", role="generator_loss", paper="Zhou et al. 2024 (SiD, arXiv 2404.04057), Sec. 4 (the generator loss with alpha) and Algorithm 1")
class ScoreIdentity(GeneratorLoss):
    """SiD's generator loss ``(r - f)^T ((r - x) - alpha (r - f))``, weighted per sample, through both denoisers' inputs.

    The weight is ``1 / mean|x - r|`` without gradient (``normalize``), as in the released code.
    """

    differentiates_fake_score = True  # gradient flows through D_fake(x_s) to x_s, not into its weights

    class Config(SiDRange):
        alpha: float = Field(1.2, description="weight of ||r - f||^2 subtracted from (r - f)^T (r - x) (SiD: 1.2)")
        normalize: bool = Field(True, description="per-sample weight 1 / mean|x - r| without gradient (SiD's released code)")

    def __init__(self, config: "ScoreIdentity.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        self.config = config

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        c, x = self.config, batch.x
        sigma = timestep_sigmas(models.teacher, len(x), c.min_timestep_ratio, c.max_timestep_ratio)
        x_noisy = add_noise(x, sigma)  # with gradient: both denoisers are differentiated at x_s
        real = models.teacher(x_noisy, sigma, batch.cond)
        fake = models.fake_score(x_noisy, sigma, batch.cond, x_clean=x)
        return sid_loss(x, real, fake, c.alpha, c.normalize).mean()
