"""The roles a score-distillation method is built from, and what each must provide.

Notation follows EDM (Karras et al., NeurIPS 2022) and the DMD paper (Yin et al., CVPR 2024): sigma-form
noising ``x_s = x + s * eps``; a denoiser ``D(x_s, s, cond) ~ E[x | x_s]``; its
score is ``(D(x_s, s) - x_s) / s**2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Protocol

import torch
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.hashing import stable_hash  # noqa: F401  (re-exported: components hash their settings with it)

if TYPE_CHECKING:
    from scoredistill.registry import Registry


def score_from_denoiser(denoised: Tensor, x_noisy: Tensor, sigma: Tensor) -> Tensor:
    """``grad log p_s(x_s) = (D(x_s, s) - x_s) / s**2`` (Tweedie's formula)."""
    return (denoised - x_noisy) / append_dims(sigma, x_noisy.ndim) ** 2


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Reshape a per-sample tensor ``(N,)`` to broadcast against ``(N, ...)`` of ``ndim`` dims."""
    return t.reshape(*t.shape, *(1,) * (ndim - t.ndim))  # (not t.shape + (...): a new torch.Size, twice the host time)


class Role(nn.Module):
    """What the three network roles (teacher, generator, fake score) share."""

    def compile_targets(self) -> list[nn.Module]:
        """The modules ``runtime.compile`` compiles (``torch.compile``, in place): by default the role itself.

        A role wrapping a large network returns that network alone. Roles built on one architecture
        (DMD's teacher, generator and fake score are copies of one UNet) then give torch the same
        module code to compile (fewer graphs, a shorter warm-up), and the thin wrapper around it
        (preconditioning, guidance) stays eager.
        """
        return [self]


class Teacher(Role):
    """The frozen real denoiser ``D_real`` with its noise schedule.

    Subclasses implement :meth:`forward` (the denoiser) and :meth:`fingerprint`.
    ``sigmas`` is the teacher's own discrete schedule in ascending order: timestep
    ``t`` has noise level ``sigmas[t]`` (``T = len(sigmas)``).
    """

    data_shape: tuple[int, ...]
    sigma_data: float
    #: class labels are ``0 .. num_classes - 1`` (a networks' label table size); ``None``: no class labels
    num_classes: Optional[int] = None
    #: how the network's output becomes ``D`` (``"edm"``, ``"vp"``, ``"flow"``, ... ; exports record it)
    parameterisation: str = "edm"
    #: what one sample is: ``"flat"`` (a vector), ``"pixels"`` or ``"latents"`` (``C x H x W``)
    data_space: str = "flat"
    #: ``"none"``, ``"class"`` (labels from :meth:`sample_conditions`) or ``"text"`` (prompt indices)
    conditioning: str = "none"
    #: steps of the teacher's own multi-step sampler (:meth:`sample`)
    sampler_steps: int = 18
    #: the denoiser is a continuous-time model of every noise level (EDM, flow matching, an analytic teacher), not a
    #: discrete-time one (DDPM's VP timesteps): continuous-time consistency (sCM's TrigFlow) can express it
    continuous_time: bool = True

    def trainable_copy(self, role: str = "copy", lora: Any = None) -> nn.Module:
        """A trainable copy of the teacher's denoiser, for the generator and the fake score to start from.

        With ``lora`` (``train.lora``: :class:`scoredistill.lora.LoraSettings`) the copy is the teacher's own network
        with a new adapter ``role`` (one shared frozen base) instead of a full copy; a teacher that cannot refuses.

        The copy is an ``nn.Module`` called as ``D(x_s, sigma, cond)`` with gradients on and guidance
        off; it may provide ``features(x_s, sigma, cond)`` (DMD2's GAN head), ``compile_targets()``,
        ``describe()`` (a dict: how its output becomes ``D``, for exports) and ``save_network(folder)``
        (``save_pretrained`` into a subfolder, returning its name). The stock image generator and fake
        score (``unet_generator``, ``unet_denoiser``) take any teacher that implements this.
        """
        raise UserError(f"teacher '{type(self).__name__}' makes no trainable copies of its network: "
                        "choose a generator and fake score of their own (e.g. mlp_generator, mlp_denoiser)")

    def sampling_sigmas(self, steps: int, rho: float = 7.0) -> Tensor:
        """The noise levels of the teacher's deterministic sampler, descending, ending at 0 (default: EDM eq. 5)."""
        from scoredistill.sampling import karras_sigmas

        return karras_sigmas(steps, self.sigma_min, self.sigma_max, rho)

    @torch.no_grad()
    def solve(self, z: Tensor, sigmas: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """The probability-flow ODE from noise ``z`` (at ``sigmas[0]``) down the grid ``sigmas``: Heun (EDM Algorithm 1)."""
        from scoredistill.sampling import heun_sample

        return heun_sample(self, z * sigmas[0].to(z.dtype), sigmas, cond)

    def sample(self, z: Tensor, steps: Optional[int] = None, cond: Optional[Tensor] = None) -> Tensor:
        """The teacher's deterministic multi-step sample from noise ``z``: :meth:`solve` on :meth:`sampling_sigmas`."""
        return self.solve(z, self.sampling_sigmas(steps or self.sampler_steps), cond)

    @property
    def sampler_nfe(self) -> int:
        return 2 * self.sampler_steps - 1

    def decode(self, x: Tensor) -> Tensor:
        """What a sample looks like: images in [-1, 1] from the teacher's data (a latent teacher's VAE decoder), with
        gradient. Teachers of images implement it; others have nothing to show."""
        raise UserError(f"teacher '{type(self).__name__}' has no decoder: its samples ({self.data_space}) are not images")

    def forward(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def fingerprint(self) -> str:  # pragma: no cover
        """A stable hash of everything that determines the denoiser (used as a cache key)."""
        raise NotImplementedError

    @property
    def sigma_min(self) -> float:
        return self._sigma_range()[0]

    @property
    def sigma_max(self) -> float:
        return self._sigma_range()[1]

    def _sigma_range(self) -> tuple[float, float]:
        """``(sigmas[0], sigmas[-1])`` as floats, read from the device once (not a host sync per training step).

        Re-read when ``sigmas`` is replaced (``.to(device)``) or changed in place (its version counter).
        """
        sigmas = self.sigmas
        cached = self.__dict__.get("_sigma_range_cache")
        if cached is None or cached[0] is not sigmas or cached[1] != sigmas._version:
            cached = (sigmas, sigmas._version, (float(sigmas[0]), float(sigmas[-1])))
            self.__dict__["_sigma_range_cache"] = cached
        return cached[2]

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    def training_sigmas(self, n: int) -> Tensor:
        """Noise levels as the teacher was trained on them: uniform over its discrete timesteps."""
        t = torch.randint(0, self.num_timesteps, (n,), device=self.sigmas.device)
        return self.sigmas[t]

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """The teacher's own denoising-loss weighting ``lambda(s)``.

        Default: EDM (Karras et al. 2022, eq. 8 / Table 1),
        ``lambda(s) = (s**2 + sd**2) / (s * sd)**2 = 1/s**2 + 1/sd**2``.
        """
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    def features(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """Hidden features ``(N, F)`` of the frozen teacher at ``(x_s, sigma)``, with gradient to ``x_s`` (a discriminator's input)."""
        raise UserError(f"teacher '{type(self).__name__}' exposes no features; choose a method without a teacher-feature discriminator")

    def feature_tokens(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """:meth:`features` before pooling, ``(N, L, F)``: per position or token (LADD's heads); default one token."""
        return self.features(x_noisy, sigma, cond).unsqueeze(1)

    def real_samples(self, n: int) -> Tensor:
        """``n`` samples of the data the teacher models (for losses that need real data, e.g. a GAN)."""
        raise UserError(f"teacher '{type(self).__name__}' provides no real data; choose a method without a real-data term")

    def real_labelled_samples(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` real samples with their conditions (a conditional discriminator's real half): class labels, or a text
        teacher's caption indices (see :meth:`condition_vectors`)."""
        raise UserError(f"teacher '{type(self).__name__}' provides no labelled real data; a class-conditional real-data term needs it")

    def condition_vectors(self, cond: Tensor) -> Tensor:
        """One vector ``(N, E)`` per condition (a text teacher's pooled prompt embedding): DMD2's GAN head on text."""
        raise UserError(f"teacher '{type(self).__name__}' has no condition embeddings (its conditioning: {self.conditioning})")

    def sample_conditions(self, n: int, generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
        """Conditions ``c`` for ``n`` samples, distributed as a run distils them; ``None``: unconditional. The trainer
        passes the same ``c`` to ``G(z, c)``, ``D_real`` and ``D_fake`` (DMD's class-conditional ImageNet runs); image
        teachers draw class labels uniformly. Without ``generator``: drawn on the teacher's device (no host copy in the
        training step); with a CPU ``generator``: seeded (pairs, evaluation) and moved."""
        return None


class Generator(Role):
    """The one-step generator ``G(z, cond) -> x``; ``latent_shape`` is the shape of one ``z``.

    A few-step generator (DMD2's, a consistency model) also samples in ``K > 1`` steps: it overrides
    :meth:`sample` and sets ``sampling_steps`` (its default ``K``); ``forward`` stays what a training
    step calls.
    """

    latent_shape: tuple[int, ...]
    #: steps of the generator's own sampling chain (1: ``G(z)``)
    sampling_steps: int = 1
    #: whether :meth:`sample` takes a ``guidance`` scale (a generator conditioned on it, LCM's w-embedding)
    takes_guidance_scale: bool = False

    def forward(self, z: Tensor, cond: Optional[Tensor] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def sample(self, z: Tensor, cond: Optional[Tensor] = None, steps: Optional[int] = None,
               noise: Optional[Callable[[], Tensor]] = None) -> Tensor:
        """Samples from noise ``z`` in ``steps`` steps (default ``sampling_steps``); ``noise()`` draws re-noising noise."""
        if steps is not None and steps != 1:
            raise UserError(f"generator '{type(self).__name__}' is one-step (G(z)): it cannot sample in {steps} steps; "
                            "train a few-step generator (generator.component: fewstep_generator) for --steps > 1")
        return self(z, cond)

    def export(self, folder: Path, provenance: dict[str, Any]) -> None:
        """Write this generator into the empty ``folder`` as a diffusers-loadable model, with a ``README.md``.

        ``scoredistill export`` calls it with the run's provenance (method, preset,
        weights, ``latent_shape``, ...) for the README. Helpers:
        :func:`scoredistill.export.save_diffusers_model` (a ``ModelMixin`` with its code),
        :func:`scoredistill.export.save_unet_generator` (a UNet copy plus ``sigma_max``).
        """
        raise UserError(f"generator '{type(self).__name__}' cannot be exported: it does not implement Generator.export")


class FakeScore(Role):
    """The fake denoiser ``D_fake`` of the generator's distribution (DMD Sec. 3.2).

    Called as ``fake(x_s, sigma, cond, x_clean=x)``. A trained denoiser must ignore
    ``x_clean`` (otherwise it is not a score of ``p_fake``); it is passed so that
    the ``sample_itself`` ablation can return it.
    """

    def forward(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None, *, x_clean: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def features(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """Hidden features ``(N, F)`` of the network at ``(x_s, sigma)`` (DMD2's bottleneck), with gradient."""
        raise UserError(f"fake score '{type(self).__name__}' exposes no features; choose one that does (e.g. mlp_denoiser)")


@dataclass
class Models:
    """The networks a loss may call. ``teacher`` is frozen; the others are trained."""

    teacher: Teacher
    generator: Generator
    fake_score: FakeScore


@dataclass
class GeneratorBatch:
    """One generator step's inputs: ``x = G(z)`` (with grad) and, if a term needs them, ODE pairs.

    With pairs, the trainer evaluates ``G`` once on ``cat(z, z_ref)`` (DMD, Algorithm 1 runs
    ``G(z)`` and ``G(z_ref)`` as two passes; one batched call is the same arithmetic per sample for
    a generator whose samples do not interact, and cheaper) and hands both halves over:
    ``x`` and ``x_ref = G(z_ref)``, both with grad. A term built by hand may leave ``x_ref``
    empty; the regression terms (``l2_regression``, ...) then call the generator themselves.
    """

    z: Tensor
    x: Tensor
    cond: Optional[Tensor] = None
    z_ref: Optional[Tensor] = None
    y_ref: Optional[Tensor] = None
    x_ref: Optional[Tensor] = None
    cond_ref: Optional[Tensor] = None  # the condition each pair was solved with


class GeneratorLoss(nn.Module):
    """A term of the generator objective: ``term(batch, models) -> scalar``.

    Set ``needs_pairs = True`` to receive ``batch.z_ref`` / ``batch.y_ref``.
    Set ``differentiates_fake_score = True`` if the term back-propagates through
    ``models.fake_score`` (a GAN term on its features): the trainer then freezes the fake
    score's weights during the generator step, so that no gradient reaches them.
    Set ``checkpointed = True`` if the term keeps state of its own across steps (a consistency
    model's EMA target network): its ``state_dict`` is saved in checkpoints and restored on resume.
    """

    needs_pairs: ClassVar[bool] = False
    differentiates_fake_score: ClassVar[bool] = False
    #: the term's ``state_dict`` changes during training (an EMA target network): checkpoints keep it
    checkpointed: ClassVar[bool] = False

    def forward(self, batch: GeneratorBatch, models: Models) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class FakeScoreLoss(nn.Module):
    """Trains the fake score on detached generator samples: ``loss(x, cond, models) -> scalar``."""

    def forward(self, x: Tensor, cond: Optional[Tensor], models: Models) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class PairSource:
    """Noise-to-data pairs ``(z_ref, y_ref)`` with ``y_ref`` the teacher's ODE solution from ``z_ref``.

    ``c`` holds the condition each pair was solved with (``None`` for an unconditional teacher).
    """

    z: Tensor
    y: Tensor
    c: Optional[Tensor] = None

    def sample(self, n: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``n`` pairs drawn with replacement: ``(z_ref, y_ref, c_ref)``."""
        # drawn on the pairs' device: CPU indices into GPU pairs would be a blocking host-to-device copy every step
        idx = torch.randint(0, len(self.z), (n,), device=self.z.device)
        return self.z[idx], self.y[idx], (self.c[idx] if self.c is not None else None)


class TargetNetwork(nn.Module):
    """A copy of the generator that moves slowly, for consistency losses: ``target(x_s, s, cond) = G_theta-(x_s, s)``.

    Built from ``ctx.generator``; the loss term that owns it calls :meth:`update` once per generator
    step and keeps it in its ``state_dict`` (``GeneratorLoss.checkpointed``).
    """

    def update(self, generator: nn.Module) -> None:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class Curriculum:
    """The noise levels ``s_1 < ... < s_N`` a consistency loss draws adjacent pairs ``(s_n, s_{n+k})`` from."""

    def levels(self, teacher: Teacher) -> Tensor:  # pragma: no cover
        """The ascending levels, on the teacher's device."""
        raise NotImplementedError

    def pairs(self, levels: Tensor, n: int) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """``n`` draws of ``(s_n, s_{n+k})``."""
        raise NotImplementedError


def seeded_conditions(teacher: Teacher, n: int, seed: int) -> Optional[Tensor]:
    """The conditions of ``n`` seeded samples (pairs, evaluation): drawn from ``seed + 1``, so that the noise drawn
    from ``seed`` is the same as for an unconditional teacher."""
    return teacher.sample_conditions(n, torch.Generator().manual_seed(seed + 1))


def cat_conditions(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """``cat([a, b])`` of two batches' conditions, ``None`` when both are."""
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("one batch has conditions and the other has none")
    return torch.cat([a, b])


class ComponentSource(Protocol):
    """What a component's constructor may use of the plugin system (``BuildContext.hooks``): the registry.

    :class:`scoredistill.plugins.Hooks` is one.
    """

    @property
    def registry(self) -> Registry:
        """Every registered component, method and preset."""


@dataclass
class BuildContext:
    """What a component's constructor may use besides its own config."""

    hooks: ComponentSource
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())
    teacher: Optional[Teacher] = None
    generator: Optional[Generator] = None
    fake_score: Optional[FakeScore] = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``train.lora`` (a :class:`~scoredistill.lora.LoraSettings`): the trainable roles are adapters on the teacher's
    #: network (:func:`scoredistill.lora.adapter_copy`) instead of full copies; ``None``: full copies
    lora: Optional[Any] = None


def default_cache_dir() -> Path:
    """``$SCOREDISTILL_CACHE`` or ``~/.cache/scoredistill``."""
    import os

    root = os.environ.get("SCOREDISTILL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "scoredistill"


def edm_preconditioning(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM (Karras et al. 2022, Table 1): ``c_skip, c_out, c_in, c_noise`` for noise level ``sigma``."""
    sd2 = sigma_data**2
    var = sigma**2 + sd2  # computed once (small per-sample tensors: each op costs microseconds of dispatch)
    root = var.sqrt()
    c_skip = sd2 / var
    c_out = sigma * sigma_data / root
    c_in = 1.0 / root
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


