"""DMD2's GAN term: a small discriminator head on the fake score's features.

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis"
(DMD2, NeurIPS 2024, arXiv 2405.14867), Sec. 4.3: a classification branch on the
fake diffusion model's (bottleneck) features, applied to noised samples, trained
together with the fake score on real data versus generator samples, with the
non-saturating GAN loss; the generator gets ``-log D(G(z))``. The released code
weights the head's loss by 1e-2 and the generator's by 3e-3 (ImageNet-64) and
noises the discriminator's input at a noise level drawn over the whole schedule.

The head is *attached to the fake-score module* (``fake_score.gan_head``), so the
trainer's fake-score optimiser trains it with the fake score, as in DMD2 where the
branch and the fake network share one optimiser. The fake score itself is the
preset's (e.g. ``mlp_denoiser``); its features are what its ``features(x_s, sigma, cond)``
returns (the MLP's last hidden layer; a UNet's bottleneck).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from scoredistill.distill import attach_gan_head, denoising_loss, discriminator_logits
from scoredistill.errors import UserError
from scoredistill.registry import component
from scoredistill.roles import BuildContext, FakeScoreLoss, GeneratorBatch, GeneratorLoss, Models

# --------------------------------------------------------------------------- components


@component("gan_generator", role="generator_loss", paper="Yin et al. 2024b (DMD2, arXiv 2405.14867), Sec. 4.3: non-saturating GAN loss")
class GANGenerator(GeneratorLoss):
    """DMD2's generator GAN term: the non-saturating ``mean(softplus(-D(G(z))))`` = ``-log sigmoid D``.

    ``D`` is the head that ``fake_score_denoise_gan`` attaches to the fake score;
    the gradient reaches ``x = G(z)`` through the head and the fake-score network
    (whose parameters the generator step does not update). Paper weight: 3e-3.
    """

    differentiates_fake_score = True  # the generator is scored through D_fake's features

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, config: "GANGenerator.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        return F.softplus(-discriminator_logits(models, batch.x, batch.cond)).mean()


@component(
    "fake_score_denoise_gan",
    role="fake_score_loss",
    paper="Yin et al. 2024b (DMD2, arXiv 2405.14867), Sec. 4.3; DMD eq. 6 for the denoising part",
)
class FakeScoreDenoiseGAN(FakeScoreLoss):
    """DMD's fake-score denoising loss plus DMD2's discriminator loss on a head attached to the fake score.

    ``L = L_denoise + gan_weight * mean(softplus(D(sg(x))) + softplus(-D(x_real)))``:
    the non-saturating (binary cross-entropy) loss with generator samples as fake and
    the teacher's real data as real. ``L_denoise`` is DMD's fake-score loss
    (:func:`scoredistill.distill.denoising_loss`, what ``fake_score_denoise`` computes). Paper weight: ``gan_weight = 1e-2``.
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        gan_weight: float = Field(1e-2, ge=0, description="weight of the discriminator loss (DMD2: 1e-2)")
        head_width: int = Field(64, ge=1, description="hidden width of the discriminator head")
        max_timestep_ratio: float = Field(
            1.0, ge=0, le=1, description="discriminator input noised at t ~ U{0..ratio*T} (DMD2 ImageNet: whole schedule)"
        )

    def __init__(self, config: "FakeScoreDenoiseGAN.Config", ctx: BuildContext) -> None:
        super().__init__()
        self.config = config
        head = attach_gan_head(ctx.fake_score, ctx.teacher, config.head_width, config.max_timestep_ratio)
        ctx.teacher.real_samples(1)  # a teacher without real data fails here, before training
        if head.conditional:
            ctx.teacher.real_labelled_samples(1)  # ... and a conditional one without labelled (captioned) real data

    def discriminator_loss(self, x: Tensor, cond: Optional[Tensor], models: Models) -> Tensor:
        """``mean(softplus(D(x)) + softplus(-D(x_real)))``, both halves in one pass of the fake score."""
        if cond is None:
            real, real_cond, both = models.teacher.real_samples(len(x)).to(x.dtype), None, None
        else:  # a conditional teacher: real images with their own labels or captions (the projection head reads both)
            real, real_cond = models.teacher.real_labelled_samples(len(x))
            real, both = real.to(x.dtype), torch.cat([cond, real_cond.to(cond.device)])
        logits = discriminator_logits(models, torch.cat([x, real]), both)
        fake_logits, real_logits = logits[: len(x)], logits[len(x) :]
        return (F.softplus(fake_logits) + F.softplus(-real_logits)).mean()

    def forward(self, x: Tensor, cond: Optional[Tensor], models: Models) -> Tensor:
        loss = denoising_loss(x, cond, models)
        if self.config.gan_weight:
            loss = loss + self.config.gan_weight * self.discriminator_loss(x, cond, models)
        return loss
