"""Generator gradients of the score-distillation baselines: SDS and Diff-Instruct's integral KL.

Both are written, like DMD's ``kl_gradient``, as a per-sample direction ``grad``
fed to DMD's surrogate ``0.5 * mean((x - sg(x - grad))**2)`` (whose gradient in
``x`` is ``grad / numel``); they differ from DMD only in *which* scores enter
and *how each noise level is weighted*. Sigma form throughout (Karras et al. 2022):
``x_s = x + s * eps``, ``D(x_s, s) ~ E[x | x_s]``, score ``(D - x_s) / s**2``,
and the noise prediction ``eps_hat = (x_s - D) / s``.

A DDPM/VP teacher at timestep ``t`` (``z_t = alpha_t x + sigma_t eps``,
``alpha_t**2 = abar_t``, ``sigma_t**2 = 1 - abar_t``) is the same thing at
``s = sigma_t / alpha_t``, so ``1 - abar_t = s**2 / (1 + s**2)``: that is how the
VP weightings of the papers are written here.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from scoredistill.distill import TimestepRange, distribution_matching_loss, query_denoisers
from scoredistill.registry import component
from scoredistill.roles import BuildContext, GeneratorBatch, GeneratorLoss, Models, append_dims


def sds_direction(x: Tensor, real: Tensor, sigma: Tensor, weighting: str = "dreamfusion") -> Tensor:
    """SDS's per-sample direction ``w(t) (eps_hat - eps)`` in sigma form (DreamFusion eq. 3).

    With ``x_s = x + s eps``, ``eps_hat - eps = (x_s - D_real)/s - eps = (x - D_real)/s``
    exactly. ``weighting``: ``"dreamfusion"`` is ``w(t) = sigma_t**2 = 1 - abar_t =
    s**2/(1+s**2)`` (the choice of DreamFusion's released implementations), so the
    direction is ``s/(1+s**2) * (x - D_real)``; ``"uniform"`` is ``w(t) = 1``.
    Non-finite entries are zeroed.
    """
    s = append_dims(sigma.to(x.dtype), x.ndim)
    w = s**2 / (1 + s**2) if weighting == "dreamfusion" else torch.ones_like(s)
    return torch.nan_to_num(w * (x - real) / s)


def ikl_direction(real: Tensor, fake: Tensor, sigma: Tensor, weighting: str = "sigma2") -> Tensor:
    """Diff-Instruct's per-sample direction ``w(s) (s_fake(x_s) - s_real(x_s))`` (Luo et al. 2023, Sec. 3).

    ``s_fake - s_real = (D_fake - D_real) / s**2``. ``weighting``: ``"sigma2"`` is
    ``w(s) = s**2``, i.e. the plain denoiser difference ``D_fake - D_real``, which is
    what the authors' released EDM code applies (weight 1 on ``D_fake - D_real``);
    ``"uniform"`` is ``w(s) = 1``, the raw score difference (the unweighted IKL).
    ``"vsd"`` is VSD's (Wang et al. 2023, eq. 9, as threestudio applies it): ``w(t) = 1 - abar_t``
    on the noise-prediction difference ``eps_real - eps_fake = (D_fake - D_real) / s``, taken
    as the gradient on ``x`` itself, i.e. ``s / (1 + s**2) (D_fake - D_real)``: this direction
    differs from Diff-Instruct's by the factor ``s / (1 + s**2)`` per noise level.
    Non-finite entries are zeroed.
    """
    diff = fake - real
    s = append_dims(sigma.to(diff.dtype), diff.ndim)
    if weighting == "uniform":
        diff = diff / s**2
    elif weighting == "vsd":
        diff = diff * s / (1 + s**2)
    return torch.nan_to_num(diff)


@component("sds_gradient", role="generator_loss", paper="Poole et al. 2022 (DreamFusion, arXiv 2209.14988), eq. 3")
class SDSGradient(GeneratorLoss):
    """Score distillation sampling: the real score alone, ``w(t) (eps_hat(x_t) - eps)`` (DreamFusion eq. 3).

    Per generator step, without gradient: ``t ~ U{0.02 T, ..., 0.98 T}`` on the teacher's
    discrete schedule (DreamFusion's ``t ~ U(0.02, 0.98)``; the same range as DMD),
    ``s = s_t``, ``x_s = x + s eps``, ``r = D_real(x_s, s)``, then
    ``grad = w(t) (x - r) / s`` with DreamFusion's ``w(t) = 1 - abar_t = s**2/(1+s**2)``
    (``weighting: dreamfusion``, the default) or ``w = 1`` (``weighting: uniform``).

    No fake score enters: ``eps`` is the noise that was injected. This is the
    direction of DMD's "no fake score" ablation (``dmd --ablate fake_score``: ``kl_gradient``
    with the ``sample_itself`` fake score, ``grad = (x - r) / mean|x - r|``), with a
    different positive per-sample factor: SDS weights by noise level only,
    ``w(t)/s``, where DMD divides by the sample's own mean error. Replacing ``eps``
    by a learned fake score's ``eps_fake`` gives VSD (Wang et al. 2023, eq. 9) with
    the same ``w(t)``.
    """

    class Config(TimestepRange):
        weighting: Literal["dreamfusion", "uniform"] = Field(
            "dreamfusion", description="w(t): 'dreamfusion' = sigma_t^2 = s^2/(1+s^2) (VP form); 'uniform' = 1"
        )

    def __init__(self, config: "SDSGradient.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        self.config = config

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        x, c = batch.x, self.config
        with torch.no_grad():
            sigma = c.sigmas(models.teacher, len(x))
            _, real, _ = query_denoisers(models, x, sigma, batch.cond, fake=False)
            grad = sds_direction(x, real, sigma, c.weighting)
        return distribution_matching_loss(x, grad)


@component("ikl_gradient", role="generator_loss", paper="Luo et al. 2023 (Diff-Instruct, arXiv 2305.18455), Sec. 3: the IKL divergence and its gradient")
class IKLGradient(GeneratorLoss):
    """Diff-Instruct's integral-KL gradient ``w(s) (s_fake - s_real)`` over the teacher's training noise levels.

    IKL (Luo et al. 2023, Sec. 3) is ``int w(t) KL(q_t || p_t) dt``; its gradient in
    the generator's parameters is ``E_t E_{x_t ~ q_t} [w(t) (s_{q_t}(x_t) - s_{p_t}(x_t)) dx_t/dtheta]``,
    with ``s_q`` the online-trained fake score. VSD (Wang et al. 2023) has the same
    scores but another weighting and timestep range: ``weighting: vsd`` with
    ``timestep_range: [0.02, 0.98]`` is VSD's. Per generator step, without gradient:
    ``s ~ teacher.training_sigmas`` (noise levels as the teacher was trained on them,
    as the released code draws EDM's training log-normal; here uniform over the
    teacher's discrete timesteps, no 2 %-98 % clipping), ``x_s = x + s eps``
    (``dx_s/dx = 1``), ``grad = w(s) (D_fake - D_real) / s**2``.

    ``weighting: sigma2`` (default) is ``w(s) = s**2``: ``grad = D_fake - D_real``, the
    weight-1 denoiser difference of the released code. ``weighting: uniform`` is
    ``w(s) = 1``. Unlike DMD (eq. 8) there is no per-sample normalisation: with a
    teacher whose training timesteps are uniform, ``sigma2`` equals DMD's
    ``kl_gradient`` with ``normalize: false`` and the full timestep range [0, 1].
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weighting: Literal["sigma2", "uniform", "vsd"] = Field(
            "sigma2", description="w(s) on the score difference: 'sigma2' = s^2 (released code), 'uniform' = 1, "
            "'vsd' = s^3 / (1 + s^2) (VSD as threestudio applies it)")
        timestep_range: Optional[tuple[float, float]] = Field(
            None, description="draw t uniformly over this fraction of the teacher's timesteps (VSD: [0.02, 0.98]); "
            "default: the teacher's training noise levels")

    def __init__(self, config: "IKLGradient.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        self.config = config

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        x = batch.x
        with torch.no_grad():
            r = self.config.timestep_range
            sigma = models.teacher.training_sigmas(len(x)) if r is None else TimestepRange(
                min_timestep_ratio=r[0], max_timestep_ratio=r[1]).sigmas(models.teacher, len(x))
            _, real, fake = query_denoisers(models, x, sigma, batch.cond)
            grad = ikl_direction(real, fake, sigma, self.config.weighting)
        return distribution_matching_loss(x, grad)
