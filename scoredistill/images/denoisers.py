"""diffusers networks as sigma-form denoisers ``D(x_s, s, cond)`` (the project's one convention).

Noising is ``x_s = x + s * eps``. A denoiser is a diffusers network called through its
:class:`~scoredistill.images.backbones.Backbone` (how that model class takes its input, timestep
and conditions) and one of three parameterisations:

**Discrete VP (DDPM) models** (``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``
and every other diffusers scheduler with ``alphas_cumprod``). Timestep ``t`` of the
training schedule has cumulative alpha ``abar_t`` and noise level
``s_t = sqrt((1 - abar_t) / abar_t)``; the network saw ``x_vp = sqrt(abar) x + sqrt(1 - abar) eps
= x_s / sqrt(1 + s**2)``. So, with ``a = 1 / sqrt(1 + s**2)`` and ``b = s / sqrt(1 + s**2)``:

* ``epsilon``: ``D = x_s - s * eps_hat``;
* ``v_prediction`` (``v = a eps - b x``): ``D = a * x_vp - b * v_hat = x_s / (1 + s**2) - s / sqrt(1 + s**2) * v_hat``;
* ``sample``: ``D = x_hat``.

A noise level between two training timesteps gets a fractional timestep, linear in
``log s`` between its neighbours (k-diffusion's ``DiscreteSchedule.sigma_to_t``); sinusoidal
embeddings accept it, a learned (table) embedding gets the nearest integer. A network with
learned variance (twice the input channels out) contributes its first half. A zero-terminal-SNR
schedule (``abar_T = 0``, Lin et al. 2024) has an infinite top level: it is held at the finite
``TERMINAL_FACTOR`` times the level below it, where ``x_vp = x_s / sqrt(1 + s**2)`` is the pure
noise the network saw at ``T`` to a relative ``1 / TERMINAL_FACTOR`` squared, and ``D`` its
``x_0`` prediction (``-v_hat`` for v-prediction) as diffusers' first DDIM step uses it.

**EDM-preconditioned models** (``EDMEulerScheduler`` / ``EDMDPMSolverMultistepScheduler``
configs, Karras et al. 2022, Table 1): ``D = c_skip x_s + c_out F(c_in x_s, c_noise)``
with ``c_noise = log(s) / 4`` and ``c_out`` negated for ``v_prediction`` (diffusers'
``precondition_outputs``). The digits teacher is one of these.

**Flow matching / rectified flow** (``FlowMatchEulerDiscreteScheduler`` configs; Liu et al. 2023,
Lipman et al. 2023; SD3, Esser et al. 2024, eq. 2): ``x_t = (1 - t) x + t eps``, the network
predicts the velocity ``v = eps - x`` at timestep ``1000 t``. In the sigma form
``s = t / (1 - t)``, ``x_s = x_t / (1 - t)``, so ``t = s / (1 + s)``, ``x_t = x_s / (1 + s)`` and
``D = x_t - t v_hat``. The top level ``t = 1`` is held at ``TERMINAL_FACTOR`` times the level below.

**Classifier-free guidance** on the real score, in the standard form

    D_g = D_u + g * (D_c - D_u)

(Ho & Salimans 2022 with ``g = 1 + w``; the same form diffusers pipelines apply to
``eps``, which is equivalent because ``D`` is affine in ``eps``). ``g = 1`` is the plain
conditional denoiser, ``g = 0`` the unconditional one. Since the score is affine in
``D``, the guided score is ``s_u + g (s_c - s_u)``. Guidance applies when a condition
is given; the unconditional branch uses the null class (class-conditional models), the null
prompt of a prompt table, or a zero embedding, see :meth:`NetworkDenoiser.null_condition`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.roles import append_dims, edm_preconditioning
from scoredistill.images.backbones import BACKBONES, Backbone, UNetBackbone

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: an infinite top noise level (zero terminal SNR, flow's t = 1) is held at this factor times the level below it
TERMINAL_FACTOR = 1e4


class _StopForward(Exception):
    """Raised by a forward hook to stop a network after its feature block (features only)."""


class NetworkDenoiser(nn.Module):
    """A diffusers network as ``D(x_s, s, cond)``; subclasses define the parameterisation.

    ``cond`` is ``None`` (unconditional, or the null condition of a conditional network),
    a ``long`` tensor ``(N,)`` of class labels, or a float tensor ``(N, L, D)`` of
    encoder hidden states (``UNet2DConditionModel``). With a prompt table
    (:meth:`set_prompts`), a ``long`` ``cond`` holds prompt indices instead, and the network
    sees their embeddings (and pooled embeddings, for SD3 / Flux transformers).
    """

    #: what :meth:`describe` calls this parameterisation
    parameterisation = "?"
    continuous_time = True  # Teacher.continuous_time

    def __init__(self, unet: nn.Module, *, guidance_scale: float = 1.0, null_class: Optional[int] = None,
                 backbone: Optional[Backbone] = None) -> None:
        super().__init__()
        self.unet = unet  # the network (a UNet or a transformer; the name is kept for the roles that compile it)
        self.backbone = backbone or BACKBONES.get(type(unet).__name__, UNetBackbone)(unet)
        self.guidance_scale = float(guidance_scale)
        self.null_class = null_class if null_class is not None else self.backbone.default_null_class
        self.class_conditional = self.backbone.conditioning == "class"
        self.cross_attention = self.backbone.text_dims is not None
        self.data_shape = self.backbone.data_shape
        self.out_channels = self.backbone.out_channels
        self.register_buffer("prompt_embeddings", None, persistent=False)  # (P + 1, L, D): P prompts, then the null prompt
        self.register_buffer("prompt_pooled", None, persistent=False)  # (P + 1, D_pooled) for SD3 / Flux

    @property
    def conditioning(self) -> str:
        """``none``, ``class`` or ``text``."""
        return self.backbone.conditioning

    def set_prompts(self, embeddings: Tensor, null: Optional[Tensor] = None, pooled: Optional[Tensor] = None,
                    null_pooled: Optional[Tensor] = None) -> None:
        """Condition a text-conditional network on a table of ``P`` prompt embeddings ``(P, L, D)`` (a text
        encoder's outputs, computed beforehand), with ``pooled`` ``(P, D_pooled)`` for networks that also take a
        pooled embedding (SD3, Flux): conditions become prompt indices ``0 .. P - 1``, and the unconditional
        branch of guidance uses ``null`` ``(L, D)`` / ``null_pooled`` (the empty prompt's; zeros when not given)
        as index ``P``. Shapes are checked against the network, with one-line errors."""
        name = type(self.unet).__name__
        if not self.cross_attention:
            raise UserError(f"teacher.embeddings was given but the teacher network ({name}) has no cross-attention: "
                            "prompt embeddings need a UNet2DConditionModel, SD3 or Flux transformer")
        if self.class_conditional:
            raise UserError("teacher.embeddings was given but the teacher network is also class-conditional: "
                            "conditions are class labels or prompts, not both")
        dim, pooled_dim = self.backbone.text_dims
        if embeddings.ndim != 3 or embeddings.shape[0] < 1 or embeddings.shape[2] != dim:
            attr = "cross_attention_dim" if pooled_dim is None else "joint_attention_dim"
            raise UserError(f"teacher.embeddings: 'embeddings' must have shape (prompts, tokens, {dim}) for this {name} "
                            f"({attr} {dim}); got {tuple(embeddings.shape)}")
        prompts, tokens = embeddings.shape[:2]
        null = torch.zeros((tokens, dim)) if null is None else null
        null = null.reshape(null.shape[-2:]) if null.ndim == 3 and null.shape[0] == 1 else null
        if tuple(null.shape) != (tokens, dim):
            raise UserError(f"teacher.embeddings: 'null' must have shape ({tokens}, {dim}) like one prompt's embedding; "
                            f"got {tuple(null.shape)}")
        device = next(self.unet.parameters()).device
        self.prompt_embeddings = torch.cat([embeddings.float(), null.float()[None]]).to(device)
        if pooled_dim is None:
            return
        if pooled is None or tuple(pooled.shape) != (prompts, pooled_dim):
            got = "none" if pooled is None else str(tuple(pooled.shape))
            raise UserError(f"teacher.embeddings: this {name} also takes a pooled text embedding: the file needs 'pooled' "
                            f"of shape ({prompts}, {pooled_dim}) (got {got})")
        null_pooled = torch.zeros(pooled_dim) if null_pooled is None else null_pooled.reshape(-1)
        if null_pooled.shape[0] != pooled_dim:
            raise UserError(f"teacher.embeddings: 'null_pooled' must have {pooled_dim} values; got {tuple(null_pooled.shape)}")
        self.prompt_pooled = torch.cat([pooled.float(), null_pooled.float()[None]]).to(device)

    def set_prompt_table(self, embeddings: Any, pooled: Any = None) -> None:
        """Condition on a lazily read prompt table (:class:`scoredistill.images.prompts.PromptTable`): ``P + 1``
        rows, the last the null prompt's, gathered by index onto the index's device. Same conditions as
        :meth:`set_prompts` (prompt indices ``0 .. P - 1``, ``P`` for guidance's unconditional branch), without the
        whole table on the device."""
        name = type(self.unet).__name__
        if not self.cross_attention or self.class_conditional:
            raise UserError(f"prompts were given but the teacher network ({name}) is not text-conditional "
                            f"({self.conditioning}): --prompts needs a UNet2DConditionModel, SD3 or Flux pipeline")
        dim, pooled_dim = self.backbone.text_dims
        if embeddings.shape[-1] != dim or (pooled_dim is not None and (pooled is None or pooled.shape[-1] != pooled_dim)):
            raise UserError(f"the pipeline's text encoders give embeddings of width {embeddings.shape[-1]} but its {name} "
                            f"takes {dim}" + (f" (and pooled {pooled_dim})" if pooled_dim else ""))
        for attr, table in (("prompt_embeddings", embeddings), ("prompt_pooled", pooled if pooled_dim is not None else None)):
            self._buffers.pop(attr, None)  # a table on disk, not a buffer: .to(device) leaves it; lookups land on the device
            setattr(self, attr, table)

    @property
    def num_prompts(self) -> Optional[int]:
        """``P`` with a prompt table, else ``None``."""
        return None if self.prompt_embeddings is None else len(self.prompt_embeddings) - 1

    # -- what subclasses define
    def precondition(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """``(network input, scheduler timestep)`` for noisy ``x`` at per-sample ``sigma``."""
        raise NotImplementedError

    def output(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:  # pragma: no cover
        """The clean estimate ``D`` from the network output ``out``."""
        raise NotImplementedError

    def loss_weight(self, sigma: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """How the network's output becomes ``D`` (written into exports): parameterisation and its settings."""
        return {"type": self.parameterisation, "prediction_type": getattr(self, "prediction_type", None),
                "model_class": type(self.unet).__name__}

    # -- conditions
    @property
    def conditional(self) -> bool:
        return self.class_conditional or self.cross_attention

    def null_condition(self, cond: Optional[Tensor], n: int, device: torch.device) -> Optional[Tensor]:
        """The unconditional branch's condition: the null class, the null prompt's index, or a zero embedding."""
        if cond is not None and cond.is_floating_point():
            return torch.zeros_like(cond)
        if self.prompt_embeddings is not None:
            return torch.full((n,), self.num_prompts, dtype=torch.long, device=device)
        if self.class_conditional:
            if self.null_class is None:
                raise UserError("the teacher is class-conditional: set teacher.null_class (the label it was trained "
                                "with for 'no class') to sample it unconditionally or with guidance")
            return torch.full((n,), self.null_class, dtype=torch.long, device=device)
        return None

    def _net_kwargs(self, cond: Optional[Tensor], n: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.prompt_embeddings is not None and (cond is None or not cond.is_floating_point()):
            index = cond if cond is not None else self.null_condition(None, n, device)
            kw["encoder_hidden_states"] = self.prompt_embeddings[index].to(dtype)  # prompt indices -> embeddings
            if self.prompt_pooled is not None:
                kw["pooled_projections"] = self.prompt_pooled[index].to(dtype)
            return kw
        labels = cond if cond is not None and not cond.is_floating_point() else None
        if self.class_conditional:
            kw["class_labels"] = labels if labels is not None else self.null_condition(None, n, device)
        elif labels is not None:
            raise UserError("class labels were given but the teacher network has no class embedding")
        if self.cross_attention:
            dim, pooled_dim = self.backbone.text_dims
            if pooled_dim is not None:
                raise UserError(f"the teacher {type(self.unet).__name__} takes text: give its precomputed prompt embeddings "
                                "with teacher.embeddings=FILE.safetensors ('embeddings', 'pooled', optionally 'null', 'null_pooled')")
            if cond is not None and cond.is_floating_point():
                kw["encoder_hidden_states"] = cond.to(dtype)
            else:
                kw["encoder_hidden_states"] = torch.zeros((n, 1, dim), device=device, dtype=dtype)
        elif cond is not None and cond.is_floating_point():
            raise UserError("an embedding condition was given but the teacher network has no cross-attention")
        return kw

    def unet_dtype(self) -> torch.dtype:
        """The network's ``dtype`` (diffusers' ``ModelMixin.dtype`` walks every submodule, about 0.3 ms for a small
        UNet): looked up again only when the dtype of its first parameter changes (``.to(dtype)``, ``.half()``)."""
        first = next(self.unet.parameters(), None)
        if first is None:
            return self.unet.dtype
        cached = self.__dict__.get("_dtype_cache")
        if cached is None or cached[0] != first.dtype:
            cached = self.__dict__["_dtype_cache"] = (first.dtype, self.unet.dtype)
        return cached[1]

    # -- the denoiser
    def denoise(self, x: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """One network evaluation: ``D(x, sigma, cond)`` without guidance."""
        sigma = sigma.to(x.dtype).reshape(-1).expand(x.shape[0])
        x_in, t = self.precondition(x, sigma)
        dtype = self.unet_dtype()
        kw = self._net_kwargs(cond, x.shape[0], x.device, dtype)
        out = self.backbone.forward(self.unet, x_in.to(dtype), t, kw).to(x.dtype)
        if out.shape[1] == 2 * x.shape[1] and self.out_channels == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned variance: the mean part
        return self.output(x, sigma, out)

    def forward(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        g = self.guidance_scale
        if cond is None or g == 1.0:
            return self.denoise(x_noisy, sigma, cond)
        n = x_noisy.shape[0]
        null = self.null_condition(cond, n, x_noisy.device)
        if g == 0.0:
            return self.denoise(x_noisy, sigma, null)
        sigma = sigma.to(x_noisy.dtype).reshape(-1).expand(n)
        both = self.denoise(torch.cat([x_noisy, x_noisy]), torch.cat([sigma, sigma]), torch.cat([null, cond]))
        d_u, d_c = both[:n], both[n:]
        return d_u + g * (d_c - d_u)

    def features(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """The output of the network's middle block (a UNet's mid block, a transformer's middle block), averaged
        over space or tokens: ``(N, C)``, with gradient. The forward pass stops after that block."""
        return self.feature_tokens(x_noisy, sigma, cond).float().mean(dim=1).to(x_noisy.dtype)

    def feature_tokens(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """The middle block's output as tokens, ``(N, L, C)``: a UNet's ``H * W`` positions, a transformer's tokens."""
        block = self.backbone.feature_module(self.unet)
        captured: dict[str, Tensor] = {}

        def hook(module, inputs, output):
            captured["h"] = output[-1] if isinstance(output, tuple) else output  # joint blocks: (text, image)
            raise _StopForward

        handle = block.register_forward_hook(hook)
        try:
            self.denoise(x_noisy, sigma, cond)
        except _StopForward:
            pass
        finally:
            handle.remove()
        h = captured["h"]
        return (h.flatten(2).transpose(1, 2) if h.ndim == 4 else h).to(x_noisy.dtype)

    def compile_targets(self) -> list[nn.Module]:
        return [self.unet]  # the diffusers network: guidance and preconditioning stay eager

    def trainable_copy(self) -> "NetworkDenoiser":
        """A deep copy with gradients on and guidance off (``g = 1``): DMD's generator and fake score.

        Its weights are float32 (the optimiser's master weights) whatever the frozen teacher's
        dtype (``teacher.dtype``); a bf16 or fp16 teacher's copies start from its rounded weights.
        """
        twin = copy.deepcopy(self)
        twin.guidance_scale = 1.0
        if twin.unet_dtype() != torch.float32:
            twin.unet.float()  # (diffusers' .to(dtype) warns about fp32 modules even when there are none)
        return twin.train().requires_grad_(True)

    def save_network(self, folder: Path) -> str:
        """``save_pretrained`` of the network into ``folder/<unet or transformer>``; returns that subfolder's name."""
        sub = self.backbone.subfolder
        self.unet.save_pretrained(str(Path(folder) / sub), safe_serialization=True)
        return sub


UNetDenoiser = NetworkDenoiser  # the name it had when only UNets were adapted


class VPDenoiser(NetworkDenoiser):
    """A discrete-time VP (DDPM) network with ``epsilon``, ``v_prediction`` or ``sample`` output."""

    parameterisation = "vp"
    continuous_time = False  # trained on DDPM's discrete timesteps (Teacher.continuous_time)

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon", terminal: bool = False, **kw) -> None:
        super().__init__(unet, **kw)
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"unknown prediction_type '{prediction_type}'; allowed: {', '.join(PREDICTION_TYPES)}")
        self.prediction_type = prediction_type
        sig = vp_sigmas(torch.as_tensor(alphas_cumprod, dtype=torch.float64), terminal)
        self.register_buffer("sigmas", sig.float())
        self.register_buffer("log_sigmas", sig.log().float())

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The (fractional) training timestep of ``sigma``: linear in ``log sigma`` between neighbours."""
        ls = sigma.float().log()
        table = self.log_sigmas
        hi = torch.searchsorted(table, ls.contiguous()).clamp(1, len(table) - 1)
        lo = hi - 1
        w = ((ls - table[lo]) / (table[hi] - table[lo])).clamp(0, 1)
        return lo.float() + w

    def precondition(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return x / append_dims((1 + sigma**2).sqrt(), x.ndim), self.sigma_to_t(sigma)

    def output(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        s = append_dims(sigma, x.ndim)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x / (1 + s**2) - s / (1 + s**2).sqrt() * out
        return out

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """The weight that makes ``lambda(s) |D - x|^2`` the network's own training MSE.

        epsilon-MSE: ``|D - x|^2 / s^2``; v-MSE: ``|D - x|^2 (1 + s^2) / s^2``; x-MSE: 1.
        """
        if self.prediction_type == "epsilon":
            return 1 / sigma**2
        if self.prediction_type == "v_prediction":
            return (1 + sigma**2) / sigma**2
        return torch.ones_like(sigma)


def vp_sigmas(abar: Tensor, terminal: bool = False) -> Tensor:
    """``s_t = sqrt((1 - abar_t) / abar_t)``, ascending; a zero-terminal-SNR top level (``terminal``, or ``abar_T = 0``;
    diffusers' Euler scheduler stores 2**-24 there) held at ``TERMINAL_FACTOR`` times the level below it."""
    abar = abar.double()
    if len(abar) < 2 or not bool((abar[1:] < abar[:-1]).all()) or float(abar[0]) >= 1 or float(abar[0]) <= 0:
        raise UserError("the scheduler's alphas_cumprod must decrease strictly from below 1 (noise must grow with t)")
    terminal = terminal or float(abar[-1]) <= 0
    body = abar[:-1] if terminal else abar
    sig = ((1 - body) / body.clamp(min=1e-300)).sqrt()
    if terminal:
        sig = torch.cat([sig, sig[-1:] * TERMINAL_FACTOR])
    return sig


class EDMDenoiser(NetworkDenoiser):
    """An EDM-preconditioned network (Karras et al. 2022, Table 1; diffusers' EDM schedulers)."""

    parameterisation = "edm"

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5, prediction_type: str = "epsilon", **kw) -> None:
        super().__init__(unet, **kw)
        if prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"EDM models support prediction_type epsilon or v_prediction (got '{prediction_type}')")
        self.sigma_data = float(sigma_data)
        self.prediction_type = prediction_type

    def precondition(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        _, _, c_in, c_noise = edm_preconditioning(sigma, self.sigma_data)
        return x * append_dims(c_in, x.ndim), c_noise

    def output(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        c_skip, c_out, _, _ = edm_preconditioning(sigma, self.sigma_data)
        if self.prediction_type == "v_prediction":
            c_out = -c_out
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * out

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """EDM eq. 8: ``lambda(s) = (s^2 + sd^2) / (s sd)^2``."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "sigma_data": self.sigma_data}


class FlowDenoiser(NetworkDenoiser):
    """A flow-matching (rectified-flow) velocity network: ``t = s / (1 + s)``, ``D = x_s / (1 + s) - t v_hat``."""

    parameterisation = "flow"
    prediction_type = "flow_prediction"

    def __init__(self, unet: nn.Module, num_train_timesteps: int = 1000, terminal: Optional[float] = None, **kw) -> None:
        super().__init__(unet, **kw)
        self.num_train_timesteps = int(num_train_timesteps)
        self.terminal = terminal  # the level standing for t = 1: the network sees timestep num_train_timesteps there

    def precondition(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        t = sigma / (1 + sigma)
        if self.terminal is not None:
            t = torch.where(sigma >= self.terminal * (1 - 1e-6), torch.ones_like(t), t)
        return x / append_dims(1 + sigma, x.ndim), t * self.num_train_timesteps

    def output(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        s = append_dims(sigma, x.ndim)
        return x / (1 + s) - s / (1 + s) * out

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """The velocity MSE: ``|v_hat - v|^2 = |D - x|^2 / t^2``, so ``lambda(s) = ((1 + s) / s)^2``."""
        return ((1 + sigma) / sigma) ** 2

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_train_timesteps": self.num_train_timesteps}


def exponential_schedule(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """``n`` noise levels, ascending, equally spaced in ``log s`` (diffusers' EDM ``sigma_schedule="exponential"``)."""
    return torch.linspace(float(torch.tensor(sigma_min).log()), float(torch.tensor(sigma_max).log()), n, dtype=torch.float64).exp().float()


def flow_shift_mu(sched_cfg: dict, seq_len: int) -> Optional[float]:
    """The resolution-dependent shift ``mu`` of a dynamically shifted flow scheduler (SD3.5 / Flux pipelines): linear
    in the image's token count between ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``."""
    if not sched_cfg.get("use_dynamic_shifting"):
        return None
    x0, x1 = float(sched_cfg.get("base_image_seq_len", 256)), float(sched_cfg.get("max_image_seq_len", 4096))
    y0, y1 = float(sched_cfg.get("base_shift", 0.5)), float(sched_cfg.get("max_shift", 1.15))
    return y0 + (y1 - y0) / (x1 - x0) * (seq_len - x0)


def flow_sigmas(t: Tensor, terminal: Optional[float] = None) -> Tensor:
    """Flow times ``t`` (any order) as sigma-form levels ``t / (1 - t)``; ``t = 1`` held at ``terminal`` (default
    ``TERMINAL_FACTOR`` times the largest finite level)."""
    t = t.double()
    top = t >= 1
    s = t / (1 - t).clamp(min=1e-300)
    if bool(top.any()):
        s = torch.where(top, terminal if terminal is not None else s[~top].max() * TERMINAL_FACTOR, s)
    return s.float()

