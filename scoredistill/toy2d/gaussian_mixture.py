"""An analytic teacher: the exact denoiser of a noised isotropic Gaussian mixture.

For ``p(x) = sum_k pi_k N(x; mu_k, s_k^2 I)`` in ``d`` dimensions, the noised
density is ``p_s(x_s) = sum_k pi_k N(x_s; mu_k, (s_k^2 + s^2) I)`` and, by Bayes'
rule, ``E[x | x_s] = sum_k r_k(x_s) (mu_k + s_k^2 / (s_k^2 + s^2) (x_s - mu_k))``
with responsibilities ``r_k(x_s) ∝ pi_k N(x_s; mu_k, (s_k^2 + s^2) I)``.
Computed in float64 with log-sum-exp, so it is exact to rounding at every sigma.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from scoredistill.errors import UserError
from scoredistill.registry import component
from scoredistill.roles import BuildContext, Teacher, append_dims, stable_hash
from scoredistill.sampling import karras_schedule


@component("gaussian_mixture", role="teacher", paper="exact E[x | x + s*eps] of an isotropic Gaussian mixture (Bayes' rule)")
class GaussianMixtureTeacher(Teacher):
    """Exact denoiser of an isotropic Gaussian mixture: an analytic teacher with known ground truth."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        means: list[list[float]] = Field(description="component centres, one point each")
        stds: list[float] = Field(description="one isotropic standard deviation per component")
        weights: list[float] = Field(description="mixture weights, summing to 1")
        sigma_min: float = Field(0.002, gt=0, description="smallest noise level of the schedule")
        sigma_max: float = Field(80.0, gt=0, description="largest noise level; the generator sees z * sigma_max")
        num_timesteps: int = Field(1000, ge=2, description="T, the discrete schedule's length")
        rho: float = Field(7.0, gt=0, description="spacing of the discrete schedule (EDM eq. 5)")
        class_conditional: bool = Field(False, description="condition on the component: c = k gives component k's exact "
                                                           "denoiser, and a run distils a class-conditional G(z, c)")
        guidance_scale: float = Field(1.0, description="classifier-free guidance D_u + g (D_c - D_u) when conditioned; 1 = none")

        @model_validator(mode="after")
        def _consistent(self):
            k = len(self.means)
            if k == 0:
                raise ValueError("means must list at least one point")
            if len({len(m) for m in self.means}) != 1 or len(self.means[0]) == 0:
                raise ValueError("every mean must have the same, non-zero dimension")
            if len(self.stds) != k or len(self.weights) != k:
                raise ValueError(f"means, stds and weights must have the same length (got {k}, {len(self.stds)}, {len(self.weights)})")
            if any(s <= 0 for s in self.stds):
                raise ValueError("stds must be > 0")
            if any(w < 0 for w in self.weights) or abs(sum(self.weights) - 1.0) > 1e-6:
                raise ValueError(f"weights must be >= 0 and sum to 1 (they sum to {sum(self.weights):.6g})")
            if self.sigma_min >= self.sigma_max:
                raise ValueError("sigma_min must be < sigma_max")
            return self

    def __init__(self, config: "GaussianMixtureTeacher.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("means", torch.tensor(config.means, dtype=torch.float64))
        self.register_buffer("stds", torch.tensor(config.stds, dtype=torch.float64))
        self.register_buffer("weights", torch.tensor(config.weights, dtype=torch.float64))
        # per-call constants, computed once (not in the state dict)
        self.register_buffer("_log_weights", self.weights.log()[None], persistent=False)  # (1, K)
        self.register_buffer("_vars", self.stds[None, :] ** 2, persistent=False)  # (1, K)
        self.register_buffer("sigmas", karras_schedule(config.num_timesteps, config.sigma_min, config.sigma_max, config.rho))
        self.data_shape = (self.means.shape[1],)
        self.sigma_data = float(self.data_variance().mean().sqrt())

    # -- the mixture itself
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def data_variance(self) -> Tensor:
        """Per-dimension variance of the mixture."""
        mean = self.weights @ self.means
        second = self.weights @ (self.means**2 + (self.stds**2)[:, None])
        return second - mean**2

    def component_log_probs(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """``log pi_k + log N(x; mu_k, (s_k^2 + sigma^2) I)`` for each sample and component, ``(N, K)``."""
        x = x.to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        var = self._vars + sigma**2  # (N or 1, K)
        return self._log_probs(x[:, None, :] - self.means[None], var)

    def _log_probs(self, diff: Tensor, var: Tensor) -> Tensor:
        """``log pi_k + log N`` from ``diff = x - mu_k`` ``(N, K, d)`` and the variances ``(N or 1, K)``."""
        sq = (diff**2).sum(-1)  # (N, K)
        return self._log_weights - 0.5 * diff.shape[-1] * torch.log(2 * math.pi * var) - 0.5 * sq / var

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        return torch.logsumexp(self.component_log_probs(x, sigma), dim=1)

    def responsibilities(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        return torch.softmax(self.component_log_probs(x, sigma), dim=1)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Exact samples of the clean mixture (float32), on the teacher's device; drawn there, or with ``generator``
        on its device (a seeded CPU generator gives the same samples whatever the teacher's device)."""
        where = self.means.device if generator is None else generator.device
        weights, means, stds = (t.to(where) for t in (self.weights, self.means, self.stds))
        k = torch.multinomial(weights.float(), n, replacement=True, generator=generator)
        eps = torch.randn((n, self.dim), generator=generator, dtype=torch.float64, device=where)
        return (means[k] + stds[k, None] * eps).float().to(self.means.device)

    def real_samples(self, n: int) -> Tensor:
        """The mixture is its own ground truth: exact samples."""
        return self.sample(n)

    def real_labelled_samples(self, n: int) -> tuple[Tensor, Tensor]:
        """Exact samples with their component ``k`` as the class label (a class-conditional teacher)."""
        if not self.config.class_conditional:
            raise UserError("the toy2d teacher has class labels only with teacher.class_conditional=true")
        k = torch.multinomial(self.weights.float(), n, replacement=True)
        eps = torch.randn((n, self.dim), dtype=torch.float64, device=self.means.device)
        return (self.means[k] + self.stds[k, None] * eps).float(), k

    @property
    def num_classes(self) -> Optional[int]:
        """``K`` when the teacher is class-conditional (label ``k`` = component ``k``), else ``None``."""
        return len(self.weights) if self.config.class_conditional else None

    def sample_conditions(self, n: int, generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
        """Component labels drawn with the mixture weights, so that ``G(z, c)`` over ``c`` is the whole mixture."""
        if not self.config.class_conditional:
            return None
        if generator is None:
            return torch.multinomial(self.weights.float(), n, replacement=True)
        return torch.multinomial(self.weights.float().cpu(), n, replacement=True, generator=generator).to(self.weights.device)

    # -- the teacher protocol
    def forward(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """``E[x | x_s]``; with labels ``cond``, ``D_u + g (D_c - D_u)`` where ``D_c = E[x | x_s, k = c]`` is component
        ``c``'s posterior mean ``mu_c + s_c^2 / (s_c^2 + sigma^2) (x_s - mu_c)`` (``g`` = ``guidance_scale``)."""
        if cond is None:
            return self._denoise(x_noisy, sigma)
        x = x_noisy.to(torch.float64)
        s2 = sigma.to(torch.float64).reshape(-1, 1).expand(x.shape[0], 1) ** 2
        mu, var = self.means[cond], self._vars[0, cond][:, None]  # (N, d), (N, 1)
        d = mu + var / (var + s2) * (x - mu)
        g = self.config.guidance_scale
        if g != 1.0:
            u = self._denoise(x_noisy, sigma).to(torch.float64)
            d = u + g * (d - u)
        return d.to(x_noisy.dtype)

    def features(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """The exact denoiser's inner quantities at ``(x_s, sigma)``, ``(N, 2 d + K)``, with gradient to ``x_s``:
        ``c_in x_s``, the residual ``(x_s - D(x_s)) / sqrt(sigma^2 + sd^2)`` and the responsibilities ``r_k(x_s)``
        (with labels ``cond``: ``D`` is the conditional denoiser; the responsibilities stay the mixture's)."""
        scale = append_dims((sigma.to(x_noisy.dtype) ** 2 + self.sigma_data**2).rsqrt().expand(x_noisy.shape[0]), x_noisy.ndim)
        resid = (x_noisy - self(x_noisy, sigma, cond)) * scale
        r = self.responsibilities(x_noisy, sigma.expand(x_noisy.shape[0])).to(x_noisy.dtype)
        return torch.cat([x_noisy * scale, resid, r], dim=1)

    def _denoise(self, x_noisy: Tensor, sigma: Tensor) -> Tensor:
        x = x_noisy.to(torch.float64)
        var = self._vars + sigma.to(torch.float64).reshape(-1, 1) ** 2  # (N or 1, K)
        diff = x[:, None, :] - self.means  # (N, K, d), once: the same numbers as responsibilities(x, s)
        r = torch.softmax(self._log_probs(diff, var), dim=1)  # (N, K)
        shrink = self._vars / var  # (N or 1, K)
        cond_means = self.means + shrink[..., None] * diff  # (N, K, d)
        return (r[..., None] * cond_means).sum(1).to(x_noisy.dtype)

    def fingerprint(self) -> str:
        conditional = ["conditional", self.config.guidance_scale] if self.config.class_conditional else []
        return "gmm-" + stable_hash(self.means, self.stds, self.weights, self.sigmas, *conditional)
