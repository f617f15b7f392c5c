"""A noise-level-conditioned generator ``G(x_s, s)``: DMD2's few-step generator and a consistency model.

* DMD2 (Yin et al. 2024, arXiv 2405.14867, Sec. 4.5): ``G`` samples in ``K`` steps over fixed
  timesteps of the teacher's grid (:mod:`scoredistill.fewstep`), and its training inputs come from
  *backward simulation*: each sample's input at step ``k`` is produced by the generator's own chain
  from noise (no grad), then one step with grad. A method's generator terms see ``x = G(z)`` as
  for a one-step generator, so any of them trains a few-step generator unchanged.
* Consistency models (Song et al. 2023, arXiv 2303.01469, Appendix C): with
  ``parameterization: consistency``, ``f(x, s) = c_skip(s) x + c_out(s) F(x, s)`` with
  ``c_skip = sd^2 / ((s - s_min)^2 + sd^2)`` and ``c_out = sd (s - s_min) / sqrt(sd^2 + s^2)``,
  so that ``f(x, s_min) = x`` exactly (the boundary condition). ``F`` is the network's raw output,
  read from its denoiser ``D = c_skip^EDM x + c_out^EDM F``: ``F = (D - c_skip^EDM x) / c_out^EDM``.
* LCM (Luo et al. 2023, Sec. 4.2): with ``guidance_embedding > 0`` (a conditional teacher), the network is
  also conditioned on the guidance scale ``g`` (:mod:`scoredistill_consistency.guidance`).

The network is a trainable copy of the teacher's (an image teacher's UNet) or, for an analytic
teacher of flat data, an EDM-preconditioned MLP denoiser.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.fewstep import chain_inputs, chain_sigmas, sample_chain
from scoredistill.mlp import FourierEmbedding, MLPDenoiserNet
from scoredistill.registry import component
from scoredistill.io import load_tensors, save_tensors
from scoredistill.roles import BuildContext, Generator, append_dims, edm_preconditioning, stable_hash

from scoredistill_consistency.guidance import GuidanceEmbedding

#: bump when fit_to_teacher changes: cached fits are keyed by it
FIT_VERSION = 1


def consistency_coefficients(sigma: Tensor, sigma_min: float, sigma_data: float) -> tuple[Tensor, Tensor]:
    """Song et al. 2023, Appendix C: ``c_skip(s) = sd^2 / ((s - s_min)^2 + sd^2)``, ``c_out(s) = sd (s - s_min) / sqrt(sd^2 + s^2)``."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma_data**2 + sigma**2).sqrt()
    return c_skip, c_out


def fit_to_teacher(denoiser: nn.Module, teacher, steps: int, seed: int, batch_size: int = 256, lr: float = 1e-3) -> None:
    """Initialise ``denoiser`` from the teacher: ``steps`` Adam steps on ``lambda(s) ||D(x_s, s) - D_real(x_s, s)||^2``
    (the teacher's own weighting and noise levels, its real samples), under a forked RNG seeded by ``seed``."""
    if steps == 0:
        return
    device = teacher.sigmas.device
    opt = torch.optim.Adam(denoiser.to(device).parameters(), lr=lr)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(steps):
            x0 = teacher.real_samples(batch_size)
            sigma = teacher.training_sigmas(batch_size)
            cond = teacher.sample_conditions(batch_size)
            x_s = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
            with torch.no_grad():
                target = teacher(x_s, sigma, cond)
            err = (denoiser(x_s, sigma, cond) - target).flatten(1).pow(2).mean(1)
            loss = (teacher.loss_weight(sigma) * err).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


class LossWeighting(nn.Module):
    """A learned per-noise-level log-weight ``w_phi(s)``: a linear layer on Fourier features of ``log(s) / 4``, zero at
    initialisation (sCM's adaptive weighting, Lu & Song 2024, Sec. 4.3, after EDM2's uncertainty head)."""

    def __init__(self, features: int = 64) -> None:
        super().__init__()
        self.embed = FourierEmbedding(features, scale=1.0, seed=3)
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, sigma: Tensor) -> Tensor:
        return self.linear(self.embed(sigma.log() / 4)).squeeze(1)


@component("fewstep_generator", role="generator",
           paper="Yin et al. 2024 (DMD2), Sec. 4.5 (backward simulation); Song et al. 2023, Appendix C (boundary condition)")
class FewStepGenerator(Generator):
    """A generator G(x_s, s) conditioned on its input noise level: K-step sampling and DMD2's backward simulation."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        steps: int = Field(1, ge=1, description="K, the steps of its sampling chain (DMD2: 4); 1 = G(s_max z, s_max)")
        timesteps: Optional[list[int]] = Field(
            None, description="the chain's teacher timesteps, largest first; default DMD2's T-1-k*floor(T/K) (999, 749, 499, 249)")
        backward_simulation: bool = Field(
            True, description="training inputs from the generator's own chain (DMD2), each sample at a random step k")
        parameterization: Literal["denoiser", "consistency"] = Field(
            "denoiser", description="denoiser: G = D_gen (DMD2); consistency: Song et al.'s c_skip/c_out with f(x, s_min) = x")
        width: int = Field(128, ge=1, description="MLP network (a teacher of flat data without a network): hidden units")
        depth: int = Field(3, ge=1, description="MLP network: hidden layers")
        input_features: int = Field(64, ge=0, description="MLP network: random Fourier features of the input")
        input_scale: float = Field(1.0, gt=0, description="MLP network: their frequency scale")
        time_scale: float = Field(4.0, gt=0, description="MLP network: frequency scale of its Fourier features of the noise "
                                                         "level (sCM: 1; high time frequencies make the continuous-time "
                                                         "tangent large and its training unstable, Lu & Song 2024, Sec. 4.1)")
        teacher_init_steps: int = Field(1000, ge=0, description="MLP network: fit it to the teacher's denoiser for this many "
                                                                 "Adam steps when built (an analytic teacher has no weights to copy; cached on disk)")
        loss_weighting: bool = Field(False, description="add sCM's learned loss weighting w_phi(s) (trained with G; "
                                                         "the scm loss uses it; Lu & Song 2024, Sec. 4.3)")
        guidance_embedding: int = Field(0, ge=0, description="LCM's guidance-scale embedding: its dimension (diffusers' "
                                                             "time_cond_proj_dim; LCM: 256), 0 = none; ignored for an unconditional teacher")
        guidance_range: tuple[float, float] = Field((1.0, 4.0), description="[g_min, g_max]: with an embedding, the loss "
                                                                            "draws the guidance scale g uniformly from it per sample "
                                                                            "(1 = the conditional teacher unguided; LCM on SD: [3, 15])")
        guidance_scale: float = Field(2.0, description="with an embedding: the g it samples at unless given (sample --guidance-scale)")

    def __init__(self, config: "FewStepGenerator.Config", ctx: BuildContext) -> None:
        super().__init__()
        teacher = ctx.teacher
        self.config = config
        network = getattr(teacher, "denoiser", None)
        if network is not None and callable(getattr(network, "trainable_copy", None)):
            self.denoiser = network.trainable_copy()  # the teacher's own network, trainable (DMD Sec. 3.1)
        elif len(teacher.data_shape) == 1:
            self.denoiser = MLPDenoiserNet(teacher.data_shape[0], teacher.sigma_data, config.width, config.depth,
                                           input_features=config.input_features, input_scale=config.input_scale,
                                           num_classes=teacher.num_classes, time_scale=config.time_scale)
            self._init_from_teacher(teacher, ctx)
        else:
            raise UserError(f"generator 'fewstep_generator' copies the teacher's network, but teacher '{type(teacher).__name__}' "
                            "has none to copy (no trainable_copy) and its data is not flat")
        self.latent_shape = tuple(teacher.data_shape)
        self.sampling_steps = config.steps
        self.sigma_min, self.sigma_data = float(teacher.sigma_min), float(teacher.sigma_data)
        self.register_buffer("teacher_sigmas", teacher.sigmas.detach().clone().float(), persistent=False)
        self.register_buffer("chain", chain_sigmas(self.teacher_sigmas, config.steps, config.timesteps), persistent=False)
        self.scheduler_config = dict(getattr(teacher, "scheduler_config", None) or {})  # exports ship it with the network
        if config.loss_weighting:
            self.loss_weighting = LossWeighting()
        self.guidance = self._guidance_embedding(config, teacher)

    def _guidance_embedding(self, config: "FewStepGenerator.Config", teacher) -> Optional[GuidanceEmbedding]:
        """LCM's w-embedding in the network (:mod:`~scoredistill_consistency.guidance`), or ``None``."""
        if config.guidance_embedding == 0:
            return None
        if teacher.sample_conditions(1, torch.Generator()) is None:
            return None  # nothing to guide: an unconditional teacher's LCM is plain CD
        lo, hi = config.guidance_range
        if not lo <= hi:
            raise UserError(f"generator.guidance_range must be [g_min, g_max] with g_min <= g_max (got [{lo}, {hi}])")
        embedding = GuidanceEmbedding(config.guidance_embedding)
        if not embedding.attach(self.denoiser):
            sys.stderr.write(f"scoredistill: the generator's network ({type(getattr(self.denoiser, 'unet', self.denoiser)).__name__}) "
                             "has no place for LCM's guidance-scale embedding: it is trained at one fixed guidance scale "
                             "(losses.consistency.guidance_scale)\n")
            return None
        return embedding.to(self.teacher_sigmas.device)

    @property
    def takes_guidance_scale(self) -> bool:
        return self.guidance is not None

    def _guided(self, g: Optional[Union[float, Tensor]], n: int, like: Tensor):
        """Within: the network conditioned on the guidance scale ``g`` (default ``guidance_scale``), if it takes one."""
        if self.guidance is None:
            if g is not None:
                raise UserError("a guidance scale was given but this generator has no guidance-scale embedding "
                                "(generator.guidance_embedding=0, or its network has no place for one)")
            return contextlib.nullcontext()
        g = self.config.guidance_scale if g is None else g
        g = torch.as_tensor(g, dtype=torch.float32, device=like.device).reshape(-1).expand(n)
        return self.guidance.scale(g)

    def _init_from_teacher(self, teacher, ctx: BuildContext) -> None:
        """:func:`fit_to_teacher`, cached on disk by teacher, settings and seed (the fit is deterministic)."""
        c = self.config
        if c.teacher_init_steps == 0:
            return
        key = stable_hash(teacher.fingerprint(), c.width, c.depth, c.input_features, c.input_scale, c.teacher_init_steps,
                          ctx.seed, FIT_VERSION, *([] if c.time_scale == 4.0 else [c.time_scale]))
        path = Path(ctx.cache_dir) / "fewstep_init" / f"mlp-{key}.safetensors"
        if path.is_file():
            self.denoiser.load_state_dict(load_tensors(path))
            return
        fit_to_teacher(self.denoiser, teacher, c.teacher_init_steps, seed=ctx.seed)
        save_tensors(path, {k: v.detach().cpu().contiguous() for k, v in self.denoiser.state_dict().items()})

    def denoise(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None,
                guidance: Optional[Union[float, Tensor]] = None) -> Tensor:
        """``G(x_s, s)``: the network's denoiser, or the consistency function ``f(x_s, s)`` (its boundary condition);
        ``guidance``: the guidance scale ``g`` (a float or per sample) of a generator with LCM's embedding."""
        with self._guided(guidance, x_noisy.shape[0], x_noisy):
            d = self.denoiser(x_noisy, sigma, cond)
        if self.config.parameterization == "denoiser":
            return d
        sigma = sigma.to(x_noisy.dtype)
        edm_skip, edm_out, _, _ = edm_preconditioning(sigma, self.sigma_data)
        c_skip, c_out = consistency_coefficients(sigma, self.sigma_min, self.sigma_data)
        raw = (d - append_dims(edm_skip, x_noisy.ndim) * x_noisy) / append_dims(edm_out, x_noisy.ndim)
        return append_dims(c_skip, x_noisy.ndim) * x_noisy + append_dims(c_out, x_noisy.ndim) * raw

    def forward(self, z: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """One training step's ``x``: ``G(s_0 z, s_0)``, or with backward simulation ``G(x_{s_k}, s_k)`` at random ``k``."""
        sigmas = self.chain.to(z.dtype)
        n, K = z.shape[0], len(sigmas)
        if self.training and K > 1 and self.config.backward_simulation:
            k = torch.randint(0, K, (n,), device=z.device)
            x = chain_inputs(self.denoise, z, sigmas, k, cond)
            return self.denoise(x, sigmas[k], cond)
        return self.denoise(z * sigmas[0], sigmas[0].expand(n), cond)

    def sample(self, z: Tensor, cond: Optional[Tensor] = None, steps: Optional[int] = None,
               noise: Optional[Callable[[], Tensor]] = None, guidance: Optional[float] = None) -> Tensor:
        """The ``K``-step chain (``steps``, default the configured ``K``; DMD2's timesteps for any other ``K``), at the
        guidance scale ``guidance`` (default ``guidance_scale``) of a generator with LCM's embedding."""
        sigmas = self.chain if steps is None or steps == self.sampling_steps else chain_sigmas(self.teacher_sigmas, steps)
        denoise = self.denoise if guidance is None else functools.partial(self.denoise, guidance=guidance)
        return sample_chain(denoise, z, sigmas, cond, noise)

    def export(self, folder, provenance) -> None:
        """The network, the teacher's scheduler config and the chain (:mod:`scoredistill_consistency.export`)."""
        from scoredistill_consistency.export import export_fewstep

        export_fewstep(self, folder, provenance)

    def compile_targets(self) -> list[nn.Module]:
        unet = getattr(self.denoiser, "unet", None)
        return [unet] if isinstance(unet, nn.Module) else [self]
