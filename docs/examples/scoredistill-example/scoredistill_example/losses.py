"""Score identity Distillation (SiD): a Fisher divergence instead of DMD's KL.

Zhou, Zheng, Wang, Yin and Huang, "Score identity Distillation: Exponentially Fast
Distillation of Pretrained Diffusion Models for One-Step Generation", ICML 2024
(arXiv 2404.04057).

Notation as in scoredistill: ``x = G(z)``, noise level ``s``, ``x_s = x + s * eps``,
``r = D_real(x_s, s)`` (the frozen teacher), ``f = D_fake(x_s, s)`` (the fake
score, trained online on the generator's samples).

DMD lowers the KL divergence between the generator's noised distribution
``p_G,s`` and the teacher's ``p_s``. SiD lowers the Fisher divergence instead::

    F_s = E_{x_s ~ p_G,s} || grad log p_s(x_s) - grad log p_G,s(x_s) ||^2
        = E || r - f ||^2 / s^4                          (1) scores from denoisers

since a score is ``(D(x_s, s) - x_s) / s^2`` and ``f`` stands in for the
generator's own denoiser ``E[x | x_s]``. The *score identity* (Tweedie's formula)
``grad log p_G,s(x_s) = E[(x - x_s) / s^2 | x_s]`` lets one of the two factors use
the generator's clean sample ``x`` in place of ``f``::

    F_s = E (r - f)^T (r - x) / s^4                      (2) through the identity

SiD's generator loss combines the two estimates as ``(2) - alpha * (1)``::

    L = (r - f)^T ((r - x) - alpha * (r - f)) * w(s)

differentiated with respect to the generator through ``x``, ``x_s``, ``r(x_s)``
*and* ``f(x_s)``, with the fake score's parameters held fixed. The paper uses
``alpha = 1.2``. The weight ``w(s)`` (the paper's ``omega(t) / s^4``) is DMD's
normalisation ``1 / mean |x - r|`` (Yin et al. 2024, eq. 8), as in SiD's
reference implementation, and ``t`` is drawn on the teacher's schedule up to
``0.8 T`` (SiD's ``tmax = 800`` of 1000).

Unlike DMD's ``kl_gradient``, which evaluates both denoisers without gradient,
this loss backpropagates through the teacher and the fake score: a step costs
about one extra backward pass through each.
"""

# --8<-- [start:imports]
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from scoredistill.distill import timestep_sigmas
from scoredistill.registry import component
from scoredistill.roles import BuildContext, GeneratorBatch, GeneratorLoss, Models, append_dims
# --8<-- [end:imports]


# --8<-- [start:frozen]
@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` with its parameters out of autograd, then restore their flags.

    Gradients still flow *through* the module to its input; none accumulate in
    its parameters (the fake score is trained by its own loss, not this one).
    """
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
# --8<-- [end:frozen]


# --8<-- [start:component]
@component(
    "example_sid_fisher",
    role="generator_loss",
    paper="Zhou et al. 2024 (SiD), arXiv 2404.04057: Fisher divergence via the score identity",
)
class ScoreIdentityFisher(GeneratorLoss):
    """Fisher divergence between noised teacher and generator distributions, by the score identity (SiD)."""
    # --8<-- [end:component]

    # --8<-- [start:config]
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        alpha: float = Field(
            1.2, description="weight of the direct estimate |r - f|^2 subtracted from (r - f)^T (r - x); SiD: 1.2"
        )
        min_timestep_ratio: float = Field(
            0.0, ge=0, le=1, description="t >= min_ratio * T on the teacher's schedule"
        )
        max_timestep_ratio: float = Field(
            0.8, ge=0, le=1, description="t <= max_ratio * T (SiD: tmax = 800 of 1000)"
        )

        @model_validator(mode="after")
        def _ordered(self) -> "ScoreIdentityFisher.Config":
            if self.min_timestep_ratio > self.max_timestep_ratio:
                raise ValueError("min_timestep_ratio must be <= max_timestep_ratio")
            return self
    # --8<-- [end:config]

    # --8<-- [start:init]
    def __init__(self, config: "ScoreIdentityFisher.Config", ctx: Optional[BuildContext] = None):
        super().__init__()
        self.config = config
    # --8<-- [end:init]

    # --8<-- [start:forward]
    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        c = self.config
        x = batch.x  # G(z), with gradient
        n = len(x)
        sigma = timestep_sigmas(models.teacher, n, c.min_timestep_ratio, c.max_timestep_ratio)
        x_noisy = x + append_dims(sigma, x.ndim) * torch.randn_like(x)

        # Both denoisers with gradient to their input x_noisy (and so to G).
        with frozen(models.fake_score):
            real = models.teacher(x_noisy, sigma, batch.cond)
            fake = models.fake_score(x_noisy, sigma, batch.cond, x_clean=x)

        with torch.no_grad():  # DMD's per-sample normalisation, a constant
            weight = 1.0 / (x - real).abs().flatten(1).mean(1).clamp(min=1e-5)

        diff = real - fake
        per_sample = (diff * ((real - x) - c.alpha * diff)).flatten(1).mean(1)
        return (weight * per_sample).mean()
    # --8<-- [end:forward]
