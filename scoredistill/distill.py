"""The score-distillation maths that methods share, in the sigma form ``x_s = x + s * eps``.

A method plugin builds its losses from these instead of importing another plugin:

* noising and noise levels: :func:`add_noise`, :func:`timestep_sigmas`, :class:`TimestepRange`;
* querying the real and fake denoisers at one noised sample: :func:`query_denoisers`;
* DMD's KL gradient, ``(D_fake(x_s) - D_real(x_s)) / mean|x - D_real(x_s)|``
  (Yin et al. 2024, eq. 7-8): :func:`dmd_gradient`;
* the surrogate loss that turns a per-sample direction into a gradient,
  ``0.5 * mean((x - sg(x - grad))**2)`` (DMD Algorithm 2): :func:`distribution_matching_loss`;
* the fake score's denoising loss (DMD eq. 6, with the teacher's weighting): :func:`denoising_loss`;
* a discriminator head on the fake score's features and its logits on noised samples
  (DMD2, Yin et al. 2024b, Sec. 4.3): :class:`GANHead`, :func:`attach_gan_head`, :func:`discriminator_logits`.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.roles import FakeScore, Models, Teacher, append_dims

# --------------------------------------------------------------------------- noise levels and noising


def per_sample_mean(t: Tensor) -> Tensor:
    """The mean of each sample's entries: ``(N, ...) -> (N,)``."""
    return t.flatten(1).mean(dim=1)


def add_noise(x: Tensor, sigma: Tensor) -> Tensor:
    """``x_s = x + s * eps`` with ``eps ~ N(0, I)`` (one noise level ``s`` per sample; Karras et al. 2022, eq. 1-2)."""
    return x + append_dims(sigma, x.ndim) * torch.randn_like(x)


def timestep_sigmas(teacher: Teacher, n: int, min_ratio: float, max_ratio: float) -> Tensor:
    """``t ~ U{floor(min_ratio T), ..., floor(max_ratio T)}`` on the teacher's discrete schedule; returns ``s_t``."""
    T = teacher.num_timesteps
    lo, hi = int(min_ratio * T), min(int(max_ratio * T), T - 1)
    t = torch.randint(lo, hi + 1, (n,), device=teacher.sigmas.device)
    return teacher.sigmas[t]


class TimestepRange(BaseModel):
    """``t ~ U{min_ratio T, ..., max_ratio T}`` on the teacher's schedule (DMD and DreamFusion: 0.02-0.98)."""

    model_config = ConfigDict(extra="forbid")
    min_timestep_ratio: float = Field(0.02, ge=0, le=1, description="t >= min_ratio * T (paper: 0.02)")
    max_timestep_ratio: float = Field(0.98, ge=0, le=1, description="t <= max_ratio * T (paper: 0.98)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_timestep_ratio > self.max_timestep_ratio:
            raise ValueError("min_timestep_ratio must be <= max_timestep_ratio")
        return self

    def sigmas(self, teacher: Teacher, n: int) -> Tensor:
        return timestep_sigmas(teacher, n, self.min_timestep_ratio, self.max_timestep_ratio)


def query_denoisers(models: Models, x: Tensor, sigma: Tensor, cond: Optional[Tensor] = None,
                    fake: bool = True) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(x_s, D_real(x_s, s, c), D_fake(x_s, s, c))`` at one noised sample ``x_s = x + s * eps`` (``fake=False``: no D_fake).

    DMD Algorithm 2 (and Diff-Instruct, SDS) query both denoisers at the same ``x_s``.
    ``D_fake`` receives ``x_clean=x`` (which a trained denoiser ignores; see :class:`~scoredistill.roles.FakeScore`).
    """
    x_noisy = add_noise(x, sigma)
    real = models.teacher(x_noisy, sigma, cond)
    return x_noisy, real, models.fake_score(x_noisy, sigma, cond, x_clean=x) if fake else None


# --------------------------------------------------------------------------- generator gradients


def dmd_gradient(x: Tensor, real: Tensor, fake: Tensor, normalize: bool = True) -> Tensor:
    """The per-sample KL gradient of DMD eq. 7 with the normalisation of eq. 8 (Yin et al. 2024).

    ``grad = (D_fake(x_s) - D_real(x_s)) * w`` with ``w = 1 / mean_{C,H,W} |x - D_real(x_s)|``.
    Since ``s_fake - s_real = (D_fake - D_real) / s**2``, this is the score difference
    up to a positive per-sample factor. Non-finite entries are zeroed.
    """
    diff = fake - real
    if normalize:
        diff = diff / append_dims(per_sample_mean((x - real).abs()), x.ndim)
    return torch.nan_to_num(diff)


def distribution_matching_loss(x: Tensor, grad: Tensor) -> Tensor:
    """``0.5 * mean((x - sg(x - grad))**2)`` (DMD Algorithm 2): a surrogate whose gradient in ``x`` is ``grad / numel``."""
    return 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")


def denoising_loss(x: Tensor, cond: Optional[Tensor], models: Models,
                   noise_levels: Literal["timesteps", "teacher"] = "timesteps") -> Tensor:
    """The fake score's denoising loss on ``x`` (DMD eq. 6; EDM eq. 2 with the teacher's weighting ``lambda(s)``).

    ``E_s[lambda(s) mean |D_fake(x + s eps, s) - x|^2]`` with ``s`` uniform over the teacher's
    discrete timesteps (``timesteps``) or as the teacher was trained (``teacher``).
    """
    teacher = models.teacher
    sigma = timestep_sigmas(teacher, len(x), 0.0, 1.0) if noise_levels == "timesteps" else teacher.training_sigmas(len(x))
    pred = models.fake_score(add_noise(x, sigma), sigma, cond, x_clean=x)
    return (teacher.loss_weight(sigma) * per_sample_mean((pred - x) ** 2)).mean()


# --------------------------------------------------------------------------- a discriminator on the fake score

HEAD_NAME = "gan_head"


class GANHead(nn.Module):
    """A discriminator branch: an MLP from fake-score features to one realism logit (DMD2 Sec. 4.3); for a conditional
    teacher, a projection discriminator (Miyato & Koyama 2018, eq. 3): ``D(h, c) = w^T phi(h) + e_c^T phi(h)``, with
    ``phi`` the MLP's hidden layer and ``e_c`` a learned class embedding, or for a text teacher ``e_c = W v_c``, a
    learned projection of the prompt's pooled text embedding ``v_c`` (:meth:`scoredistill.roles.Teacher.condition_vectors`).
    Both start at zero: the head starts unconditional."""

    def __init__(self, in_features: int, width: int, max_timestep_ratio: float, num_classes: Optional[int] = None,
                 text_dim: Optional[int] = None) -> None:
        super().__init__()
        self.max_timestep_ratio = max_timestep_ratio
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.SiLU(), nn.Linear(width, 1))
        self.class_embedding = nn.Embedding(num_classes, width) if num_classes else None
        self.text_projection = nn.Linear(text_dim, width, bias=False) if text_dim else None
        for table in (self.class_embedding, self.text_projection):
            if table is not None:
                nn.init.zeros_(table.weight)

    @property
    def conditional(self) -> bool:
        return self.class_embedding is not None or self.text_projection is not None

    def forward(self, features: Tensor, cond: Optional[Tensor] = None, vectors: Optional[Tensor] = None) -> Tensor:
        h = self.net[1](self.net[0](features))
        logit = self.net[2](h).squeeze(-1)
        if self.class_embedding is not None:
            if cond is None or cond.is_floating_point():
                raise UserError("the class-conditional GAN head needs the class labels of its samples")
            logit = logit + (self.class_embedding(cond) * h).sum(-1)
        if self.text_projection is not None:
            if vectors is None:
                raise UserError("the text-conditional GAN head needs the text embeddings of its samples")
            logit = logit + (self.text_projection(vectors.to(h.dtype)) * h).sum(-1)
        return logit


def attach_gan_head(fake: FakeScore, teacher: Teacher, width: int, max_timestep_ratio: float) -> GANHead:
    """Add a :class:`GANHead` to ``fake`` as ``fake.gan_head`` (once), sized to its features (and to a class-conditional
    teacher's classes, or a text teacher's condition vectors): the fake score's optimiser then trains it with the fake
    score, as DMD2's branch shares the fake network's optimiser."""
    head = getattr(fake, HEAD_NAME, None)
    if isinstance(head, GANHead):
        return head
    conditioning = getattr(teacher, "conditioning", "none")
    if conditioning not in ("none", "class", "text"):
        raise UserError(f"the GAN discriminator takes class labels or text, but the teacher's conditioning is '{conditioning}'")
    classes = teacher.num_classes if conditioning == "class" else None
    with torch.no_grad():
        probe = torch.zeros((2, *teacher.data_shape), device=teacher.sigmas.device)
        c = teacher.sample_conditions(2) if classes or conditioning == "text" else None
        width_in = fake.features(probe, teacher.sigmas[-1:].expand(2), c).shape[-1]
        text_dim = teacher.condition_vectors(c).shape[-1] if conditioning == "text" else None
    head = GANHead(width_in, width, max_timestep_ratio, classes, text_dim).to(teacher.sigmas.device)
    fake.add_module(HEAD_NAME, head)
    return head


def discriminator_logits(models: Models, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
    """``D(x)``: noise ``x`` at ``t ~ U{0..max_ratio T}`` (DMD2's diffusion GAN), fake-score features, head."""
    head = getattr(models.fake_score, HEAD_NAME, None)
    if not isinstance(head, GANHead):
        raise UserError(
            "the gan_generator term needs the discriminator head that fake_score_loss 'fake_score_denoise_gan' "
            "adds to the fake score; use that fake-score loss"
        )
    sigma = timestep_sigmas(models.teacher, len(x), 0.0, head.max_timestep_ratio)
    vectors = models.teacher.condition_vectors(cond) if head.text_projection is not None else None
    return head(models.fake_score.features(add_noise(x, sigma), sigma, cond), cond, vectors)
