"""Consistency distillation (CD, LCM) and continuous-time consistency distillation (sCM) as generator loss terms.

* CD: Song et al. 2023, "Consistency Models" (arXiv 2303.01469), Algorithm 2 / eq. 7.
* LCM: Luo et al. 2023, "Latent Consistency Models" (arXiv 2310.04378), Algorithm 1: CD with
  guidance folded into the solver (eq. 9), ``w`` drawn per sample and the student conditioned on it
  (Sec. 4.2, a generator with a guidance-scale embedding; else a fixed ``w``), and a skipping step ``k``.
* sCM: Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models"
  (arXiv 2410.11081), Algorithm 1: TrigFlow, the tangent by forward-mode differentiation, its
  normalisation and warm-up.

Each term calls the generator itself (``G(x_s, s)``, a :class:`~scoredistill_consistency.generator.FewStepGenerator`);
the trainer's ``batch.x`` is not used.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from scoredistill.config import build_part
from scoredistill.errors import UserError
from scoredistill.registry import component
from scoredistill.roles import BuildContext, GeneratorBatch, GeneratorLoss, Models, append_dims

from scoredistill_consistency.maths import (SOLVERS, default_huber_c, guided, lpips_distance, pseudo_huber, squared_l2,
                                            trigflow_F, trigflow_velocity)


def _needs_denoising_generator(ctx: BuildContext, what: str) -> None:
    if not callable(getattr(ctx.generator, "denoise", None)):
        raise UserError(f"{what} needs a generator conditioned on its noise level, G(x_s, s); "
                        f"generator '{type(ctx.generator).__name__}' is one-step: set generator.component: fewstep_generator")


def _math_attention():
    """Within: ``scaled_dot_product_attention`` by its math backend (torch >= 2.3; the fused kernels have no jvp)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _has_labelled_data(teacher) -> bool:
    """Whether a class-conditional teacher provides real samples with their labels."""
    if teacher.num_classes is None:
        return False
    try:
        teacher.real_labelled_samples(1)
    except UserError:
        return False
    return True


def _real_data(models: Models, batch: GeneratorBatch, labelled: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """Real ``x_0`` and its condition: labelled real data where the teacher has it (each ``x_0`` with its own class,
    as LCM's (x, c) pairs), else real samples with the batch's conditions."""
    if labelled:
        return models.teacher.real_labelled_samples(len(batch.z))
    return models.teacher.real_samples(len(batch.z)), batch.cond


@component("consistency_distillation", role="generator_loss",
           paper="Song et al. 2023 (Consistency Models), Algorithm 2, eq. 7; Luo et al. 2023 (LCM), Algorithm 1, eq. 9, Sec. 4.2-4.3")
class ConsistencyDistillation(GeneratorLoss):
    """CD: d(f_theta(x_{s_{n+k}}, s_{n+k}), f_theta-(x^phi_{s_n}, s_n)), x^phi one teacher ODE step (LCM: guided)."""

    checkpointed = True

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        solver: Literal["heun", "euler"] = Field("heun", description="the teacher's one-step ODE solver Phi (Song et al.: Heun)")
        distance: Literal["l2", "pseudo_huber", "lpips"] = Field("l2", description="d(x, y): squared L2 per dimension, "
                                                                  "pseudo-Huber (iCT) or LPIPS (images)")
        huber_c: Optional[float] = Field(None, gt=0, description="pseudo-Huber c; default iCT's 0.00054 sqrt(dim)")
        target: dict[str, Any] = Field(default_factory=dict, description="the target network theta-, a component of role "
                                                                         "target (default {component: ema_target, decay: 0.95})")
        curriculum: dict[str, Any] = Field(default_factory=dict, description="the noise levels and skipping step, a component of "
                                                                             "role curriculum (default {component: karras_grid})")
        lpips_backbone: Literal["imagenet", "random"] = Field("imagenet", description="distance lpips: 'random' runs offline "
                                                              "but is not perceptual (tests only)")
        guidance_scale: Optional[float] = Field(None, description="LCM without a guidance embedding: the fixed w of the guided "
                                                                  "solver D_u + w (D_c - D_u) (a conditional teacher); with "
                                                                  "generator.guidance_embedding, w is drawn per sample from "
                                                                  "generator.guidance_range instead")

    def __init__(self, config: "ConsistencyDistillation.Config", ctx: BuildContext) -> None:
        super().__init__()
        _needs_denoising_generator(ctx, "loss 'consistency_distillation'")
        teacher = ctx.teacher
        if config.guidance_scale is not None and teacher.num_classes is None:
            raise UserError("consistency_distillation.guidance_scale (LCM) needs a conditional teacher (class labels); "
                            f"teacher '{type(teacher).__name__}' is unconditional: leave guidance_scale null")
        self.embedded_guidance = bool(getattr(ctx.generator, "takes_guidance_scale", False))
        if self.embedded_guidance and config.guidance_scale is not None:
            raise UserError("losses.consistency.guidance_scale fixes w, but the generator is conditioned on w "
                            "(generator.guidance_embedding > 0; w drawn from generator.guidance_range): leave one of them out")
        self.labelled = _has_labelled_data(teacher)
        self.config = config
        self.solve = SOLVERS[config.solver]
        self.target = build_part(ctx, "losses.consistency.target", "target", config.target, "ema_target")
        self.curriculum = build_part(ctx, "losses.consistency.curriculum", "curriculum", config.curriculum, "karras_grid")
        self.register_buffer("levels", self.curriculum.levels(teacher), persistent=False)
        dim = math.prod(teacher.data_shape)
        self.huber_c = config.huber_c or default_huber_c(dim)
        self.__dict__["lpips"] = None
        if config.distance == "lpips":
            if len(teacher.data_shape) != 3:
                raise UserError(f"distance lpips needs images; the teacher's data shape is {tuple(teacher.data_shape)}: "
                                "use distance l2 or pseudo_huber")
            # shared: duplicate of scoredistill_dmd.lpips_regression's backbone check, to move into the core module
            weights = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
            if config.lpips_backbone == "imagenet" and not weights.is_file():
                raise UserError(f"distance lpips needs the ImageNet weights of its VGG backbone: place {weights.name} in "
                                f"{weights.parent} (or set TORCH_HOME), or choose distance l2 / pseudo_huber")
            import lpips

            net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=config.lpips_backbone == "random", verbose=False)
            # not a registered submodule: the term's checkpointed state is its target network, not LPIPS's fixed weights
            self.__dict__["lpips"] = net.eval().requires_grad_(False)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        if self.config.distance == "pseudo_huber":
            return pseudo_huber(a, b, self.huber_c)
        if self.config.distance == "lpips":
            if next(self.lpips.parameters()).device != a.device:
                self.lpips.to(a.device)
            return lpips_distance(self.lpips, a, b)
        return squared_l2(a, b)

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        self.target.update(models.generator)
        x0, cond = _real_data(models, batch, self.labelled)
        s_n, s_next = self.curriculum.pairs(self.levels, len(x0))
        x_next = x0 + append_dims(s_next, x0.ndim) * torch.randn_like(x0)
        w, kw = self.config.guidance_scale, {}
        if self.embedded_guidance:  # LCM, Algorithm 1: w ~ U[w_min, w_max] per sample, the student conditioned on it
            lo, hi = models.generator.config.guidance_range
            w = lo + (hi - lo) * torch.rand(len(x0), device=x0.device)
            kw = {"guidance": w}
        teacher = models.teacher if w is None else guided(models.teacher, w)
        with torch.no_grad():
            x_n = self.solve(teacher, x_next, s_next, s_n, cond)
            target = self.target(x_n, s_n, cond, **kw)
        online = models.generator.denoise(x_next, s_next, cond, **kw)
        return self.distance(online, target).mean()


@component("scm", role="generator_loss", paper="Lu & Song 2024 (sCM), Algorithm 1 (continuous-time consistency distillation)")
class ContinuousConsistency(GeneratorLoss):
    """sCM: ||F_theta - F_theta- - g||^2 with the TrigFlow tangent g (jvp), normalised and warmed up."""

    checkpointed = True

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        p_mean: float = Field(-0.8, description="log-normal proposal of tan(t) sd: mean of log s")
        p_std: float = Field(1.6, gt=0, description="log-normal proposal: std of log s")
        tangent: Literal["jvp", "finite_difference"] = Field("jvp", description="dF/dt by torch.func.jvp or a central difference")
        fd_eps: float = Field(1e-3, gt=0, description="finite_difference: step along the ODE (in t)")
        tangent_norm: float = Field(0.1, gt=0, description="c of the tangent normalisation g / (||g|| + c)")
        tangent_scale: float = Field(1.0, gt=0, description="a factor on the normalised tangent (1: the paper's); its "
                                                            "per-dimension size is ~1/sqrt(dim), so low-dimensional data "
                                                            "takes far larger steps than images")
        warmup_steps: int = Field(10000, ge=0, description="H: the tangent's second term is weighted min(1, step / H)")
        target: dict[str, Any] = Field(default_factory=lambda: {"decay": 0.0},
                                       description="the target network, a component of role target (sCM: theta- = sg(theta): "
                                                   "{component: ema_target, decay: 0})")
        adaptive_weighting: bool = Field(True, description="e^w / D ||.||^2 - w with the generator's learned w_phi(s) "
                                                           "(needs generator.loss_weighting: true); false: plain ||.||^2 / D")

    def __init__(self, config: "ContinuousConsistency.Config", ctx: BuildContext) -> None:
        super().__init__()
        _needs_denoising_generator(ctx, "loss 'scm'")
        teacher = ctx.teacher
        if not teacher.continuous_time:
            raise UserError(f"loss 'scm' needs a teacher that TrigFlow can express (a continuous-time EDM or flow denoiser); "
                            f"teacher '{type(teacher).__name__}' is a discrete-time VP model: use method cd instead")
        if config.adaptive_weighting and not isinstance(getattr(ctx.generator, "loss_weighting", None), torch.nn.Module):
            raise UserError("loss 'scm' with adaptive_weighting needs the generator's learned weighting: set "
                            "generator.loss_weighting=true (fewstep_generator), or losses.consistency.adaptive_weighting=false")
        self.config = config
        self.sigma_data = float(teacher.sigma_data)
        self.s_range = (float(teacher.sigma_min), float(teacher.sigma_max))
        self.target = build_part(ctx, "losses.consistency.target", "target", config.target, "ema_target")
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def tangent(self, target, x_t: Tensor, t: Tensor, dxdt: Tensor, cond: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``(F_theta-(x_t / sd, t), cos t sin t dF_theta-/dt)``, the total derivative along the teacher's ODE."""
        sd = self.sigma_data
        cs = t.cos() * t.sin()
        v_x, v_t = append_dims(cs, x_t.ndim) * dxdt / sd, cs

        def F(x_in: Tensor, tt: Tensor) -> Tensor:
            return trigflow_F(target, x_in, tt, sd, cond)

        if self.config.tangent == "jvp":
            try:
                with _math_attention():  # attention by matmuls and softmax: they have forward-mode rules
                    return torch.func.jvp(F, (x_t / sd, t), (v_x, v_t))
            except (RuntimeError, NotImplementedError) as exc:
                raise UserError(f"loss 'scm': the generator's network does not support forward-mode differentiation "
                                f"({str(exc).splitlines()[0][:120]}); set losses.consistency.tangent=finite_difference") from None
        h = self.config.fd_eps
        plus, minus = F(x_t / sd + h * v_x, t + h * v_t), F(x_t / sd - h * v_x, t - h * v_t)
        return F(x_t / sd, t), (plus - minus) / (2 * h)

    def direction(self, teacher, x_t: Tensor, t: Tensor, cond: Optional[Tensor], r) -> tuple[Tensor, Tensor]:
        """``(F_theta-, g)`` with Lu & Song 2024's (Algorithm 1) un-normalised tangent
        ``g = -cos^2 t (sd F- - dx_t/dt) - r cos t sin t (x_t + sd dF-/dt)`` (``r``: the warm-up weight), which is
        ``cos t df-/dt`` along the teacher's ODE at ``r = 1``; ``dx_t/dt`` is the teacher's TrigFlow velocity."""
        sd, nd = self.sigma_data, x_t.ndim
        cos, sin = append_dims(t.cos(), nd), append_dims(t.sin(), nd)
        dxdt = trigflow_velocity(teacher, x_t, t, sd, cond)
        F_minus, dF = self.tangent(self.target, x_t, t, dxdt, cond)  # dF = cos t sin t dF-/dt
        return F_minus, -cos**2 * (sd * F_minus - dxdt) - r * (cos * sin * x_t + sd * dF)

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:
        self.target.update(models.generator)
        self.calls += 1
        c, sd = self.config, self.sigma_data
        x0, cond = _real_data(models, batch)
        n, nd = len(x0), x0.ndim
        s = (torch.randn(n, device=x0.device) * c.p_std + c.p_mean).exp().clamp(*self.s_range)
        t = torch.atan(s / sd).to(x0.dtype)
        cos, sin = append_dims(t.cos(), nd), append_dims(t.sin(), nd)
        x_t = cos * x0 + sin * sd * torch.randn_like(x0)
        with torch.no_grad():
            r = (self.calls / c.warmup_steps).clamp(max=1.0).to(x0.dtype) if c.warmup_steps else 1.0
            F_minus, g = self.direction(models.teacher, x_t, t, cond, r)
            g = c.tangent_scale * g / (append_dims(g.flatten(1).norm(dim=1), nd) + c.tangent_norm)  # tangent normalisation
        F_theta = trigflow_F(models.generator.denoise, x_t / sd, t, sd, cond)
        per_sample = (F_theta - F_minus - g).flatten(1).pow(2).mean(1)
        if not c.adaptive_weighting:
            return per_sample.mean()
        w = models.generator.loss_weighting(s.to(x0.dtype))  # Lu & Song 2024, eq. 9: e^w / D ||.||^2 - w
        return (w.exp() * per_sample - w).mean()
