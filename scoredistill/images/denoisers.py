"""diffusers UNets as sigma-form denoisers ``D(x_s, s, cond)`` (DESIGN.md's one convention).

Noising is ``x_s = x + s * eps``. Two families of trained networks are adapted:

**Discrete VP (DDPM) models** (``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``
and every other diffusers scheduler with ``alphas_cumprod``). Timestep ``t`` of the
training schedule has cumulative alpha ``abar_t`` and noise level
``s_t = sqrt((1 - abar_t) / abar_t)``; the network saw ``x_vp = sqrt(abar) x + sqrt(1 - abar) eps
= x_s / sqrt(1 + s**2)``. So, with ``a = 1 / sqrt(1 + s**2)`` and ``b = s / sqrt(1 + s**2)``:

* ``epsilon``: ``D = x_s - s * eps_hat``;
* ``v_prediction`` (``v = a eps - b x``): ``D = a * x_vp - b * v_hat = x_s / (1 + s**2) - s / sqrt(1 + s**2) * v_hat``;
* ``sample``: ``D = x_hat``.

A noise level between two training timesteps gets a fractional timestep, linear in
``log s`` between its neighbours (k-diffusion's ``DiscreteSchedule.sigma_to_t``); the
UNets' sinusoidal embeddings accept it. A network with learned variance (twice the
input channels out) contributes its first half.

**EDM-preconditioned models** (``EDMEulerScheduler`` / ``EDMDPMSolverMultistepScheduler``
configs, Karras et al. 2022, Table 1): ``D = c_skip x_s + c_out F(c_in x_s, c_noise)``
with ``c_noise = log(s) / 4`` and ``c_out`` negated for ``v_prediction`` (diffusers'
``precondition_outputs``). The digits teacher is one of these.

**Classifier-free guidance** on the real score, in the standard form

    D_g = D_u + g * (D_c - D_u)

(Ho & Salimans 2022 with ``g = 1 + w``; the same form diffusers pipelines apply to
``eps``, which is equivalent because ``D`` is affine in ``eps``). ``g = 1`` is the plain
conditional denoiser, ``g = 0`` the unconditional one. Since the score is affine in
``D``, the guided score is ``s_u + g (s_c - s_u)``. Guidance applies when a condition
is given; the unconditional branch uses ``null_class`` (class-conditional models) or a
zero embedding (cross-attention models), see :meth:`UNetDenoiser.null_condition`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.roles import append_dims

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
METADATA_FILE = "scoredistill.json"


class _StopForward(Exception):
    """Raised by a forward hook to stop a UNet after its mid block (features only)."""


class UNetDenoiser(nn.Module):
    """A diffusers UNet as ``D(x_s, s, cond)``; subclasses define the preconditioning.

    ``cond`` is ``None`` (unconditional, or the null condition of a conditional UNet),
    a ``long`` tensor ``(N,)`` of class labels, or a float tensor ``(N, L, D)`` of
    encoder hidden states (``UNet2DConditionModel``). With a prompt table
    (:meth:`set_prompts`), a ``long`` ``cond`` holds prompt indices instead, and the UNet
    sees their embeddings.
    """

    continuous_time = True  # Teacher.continuous_time

    def __init__(self, unet: nn.Module, *, guidance_scale: float = 1.0, null_class: Optional[int] = None) -> None:
        super().__init__()
        self.unet = unet
        self.guidance_scale = float(guidance_scale)
        self.null_class = null_class
        self.cross_attention = type(unet).__name__ == "UNet2DConditionModel"
        self.class_conditional = getattr(unet, "class_embedding", None) is not None
        cfg = unet.config
        size = cfg.sample_size
        if size is None:
            raise UserError("the teacher UNet's config has no sample_size: save it with sample_size set (the image size)")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.data_shape = (int(cfg.in_channels), int(h), int(w))
        self.out_channels = int(cfg.out_channels)
        self.register_buffer("prompt_embeddings", None, persistent=False)  # (P + 1, L, D): P prompts, then the null prompt

    def set_prompts(self, embeddings: Tensor, null: Optional[Tensor] = None) -> None:
        """Condition a cross-attention UNet on a table of ``P`` prompt embeddings ``(P, L, D)`` (a text
        encoder's outputs, computed beforehand): conditions become prompt indices ``0 .. P - 1``, and the
        unconditional branch of guidance uses ``null`` ``(L, D)`` (the empty prompt's embedding; zeros
        when not given) as index ``P``. Shapes are checked against the UNet, with one-line errors."""
        if not self.cross_attention:
            raise UserError(f"teacher.embeddings was given but the teacher UNet ({type(self.unet).__name__}) has no "
                            "cross-attention: prompt embeddings need a UNet2DConditionModel")
        if self.class_conditional:
            raise UserError("teacher.embeddings was given but the teacher UNet is also class-conditional: "
                            "conditions are class labels or prompts, not both")
        dim = self.unet.config.cross_attention_dim
        dim = int(dim[0] if isinstance(dim, (list, tuple)) else dim)
        if embeddings.ndim != 3 or embeddings.shape[0] < 1 or embeddings.shape[2] != dim:
            raise UserError(f"teacher.embeddings: 'embeddings' must have shape (prompts, tokens, {dim}) for this UNet "
                            f"(cross_attention_dim {dim}); got {tuple(embeddings.shape)}")
        tokens = embeddings.shape[1]
        if null is None:
            null = torch.zeros((tokens, dim))
        null = null.reshape(null.shape[-2:]) if null.ndim == 3 and null.shape[0] == 1 else null
        if tuple(null.shape) != (tokens, dim):
            raise UserError(f"teacher.embeddings: 'null' must have shape ({tokens}, {dim}) like one prompt's embedding; "
                            f"got {tuple(null.shape)}")
        self.prompt_embeddings = torch.cat([embeddings.float(), null.float()[None]]).to(self.unet.device)

    @property
    def num_prompts(self) -> Optional[int]:
        """``P`` with a prompt table, else ``None``."""
        return None if self.prompt_embeddings is None else len(self.prompt_embeddings) - 1

    # -- what subclasses define
    def precondition(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """``(network input, network timestep)`` for noisy ``x`` at per-sample ``sigma``."""
        raise NotImplementedError

    def output(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:  # pragma: no cover
        """The clean estimate ``D`` from the network output ``out``."""
        raise NotImplementedError

    # -- conditions
    @property
    def conditional(self) -> bool:
        return self.class_conditional or self.cross_attention

    def null_condition(self, cond: Optional[Tensor], n: int, device: torch.device) -> Optional[Tensor]:
        """The unconditional branch's condition: ``null_class`` labels, the null prompt's index, or a zero embedding."""
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

    def _unet_kwargs(self, cond: Optional[Tensor], n: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.prompt_embeddings is not None and (cond is None or not cond.is_floating_point()):
            index = cond if cond is not None else self.null_condition(None, n, device)
            kw["encoder_hidden_states"] = self.prompt_embeddings[index].to(dtype)  # prompt indices -> embeddings
            return kw
        labels = cond if cond is not None and not cond.is_floating_point() else None
        if self.class_conditional:
            kw["class_labels"] = labels if labels is not None else self.null_condition(None, n, device)
        elif labels is not None:
            raise UserError("class labels were given but the teacher UNet has no class embedding")
        if self.cross_attention:
            if cond is not None and cond.is_floating_point():
                kw["encoder_hidden_states"] = cond.to(dtype)
            else:
                dim = self.unet.config.cross_attention_dim
                dim = dim[0] if isinstance(dim, (list, tuple)) else dim
                kw["encoder_hidden_states"] = torch.zeros((n, 1, int(dim)), device=device, dtype=dtype)
        elif cond is not None and cond.is_floating_point():
            raise UserError("an embedding condition was given but the teacher UNet has no cross-attention")
        return kw

    def unet_dtype(self) -> torch.dtype:
        """The UNet's ``dtype`` (diffusers' ``ModelMixin.dtype`` walks every submodule, about 0.3 ms for a small
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
        out = self.unet(x_in.to(dtype), t, return_dict=False, **self._unet_kwargs(cond, x.shape[0], x.device, dtype))[0]
        out = out.to(x.dtype)
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
        """The UNet's mid-block output at ``(x_s, sigma)``, averaged over space: ``(N, C_mid)``, with gradient.

        The forward pass stops after the mid block (the up path is not computed).
        """
        mid = getattr(self.unet, "mid_block", None)
        if mid is None:
            raise UserError("the UNet has no mid block (mid_block_type=None): its features are undefined")
        captured: dict[str, Tensor] = {}

        def hook(module, inputs, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        handle = mid.register_forward_hook(hook)
        try:
            self.denoise(x_noisy, sigma, cond)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["h"].float().mean(dim=(2, 3)).to(x_noisy.dtype)

    def trainable_copy(self) -> "UNetDenoiser":
        """A deep copy with gradients on and guidance off (``g = 1``): DMD's generator and fake score.

        Its weights are float32 (the optimiser's master weights) whatever the frozen teacher's
        dtype (``teacher.dtype``); a bf16 or fp16 teacher's copies start from its rounded weights.
        """
        twin = copy.deepcopy(self)
        twin.guidance_scale = 1.0
        if twin.unet_dtype() != torch.float32:
            twin.unet.float()  # (diffusers' .to(dtype) warns about fp32 modules even when there are none)
        return twin.train().requires_grad_(True)


class VPDenoiser(UNetDenoiser):
    """A discrete-time VP (DDPM) UNet with ``epsilon``, ``v_prediction`` or ``sample`` output."""

    continuous_time = False  # trained on DDPM's discrete timesteps (Teacher.continuous_time)

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon", **kw) -> None:
        super().__init__(unet, **kw)
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"unknown prediction_type '{prediction_type}'; allowed: {', '.join(PREDICTION_TYPES)}")
        self.prediction_type = prediction_type
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp(min=1e-12, max=1.0)
        sig = ((1 - abar) / abar).sqrt()
        if not bool((sig[1:] > sig[:-1]).all()) or float(sig[0]) <= 0:
            raise UserError("the scheduler's alphas_cumprod must decrease strictly from below 1 (noise must grow with t)")
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


class EDMDenoiser(UNetDenoiser):
    """An EDM-preconditioned UNet (Karras et al. 2022, Table 1; diffusers' EDM schedulers)."""

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5, prediction_type: str = "epsilon", **kw) -> None:
        super().__init__(unet, **kw)
        if prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"EDM models support prediction_type epsilon or v_prediction (got '{prediction_type}')")
        self.sigma_data = float(sigma_data)
        self.prediction_type = prediction_type

    def precondition(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        c_in = 1 / (sigma**2 + self.sigma_data**2).sqrt()
        return x * append_dims(c_in, x.ndim), sigma.log() / 4

    def output(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        if self.prediction_type == "v_prediction":
            c_out = -c_out
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * out

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """EDM eq. 8: ``lambda(s) = (s^2 + sd^2) / (s sd)^2``."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


def karras_schedule(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``n`` noise levels, ascending, spaced as EDM eq. 5 (a teacher's discrete schedule)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv = 1.0 / rho
    return ((sigma_min**inv + ramp * (sigma_max**inv - sigma_min**inv)) ** rho).float()


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedTeacher:
    """What :func:`load_denoiser` found: the denoiser, its discrete schedule and provenance."""

    denoiser: UNetDenoiser
    sigmas: Tensor
    kind: str  # "vp" or "edm"
    unet_dir: Path
    unet_config: dict
    scheduler_config: dict
    metadata: dict = field(default_factory=dict)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the {what} {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"the {what} {path} is not a JSON object")
    return data


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))


def resolve_model_folder(path: str) -> Path:
    """A local folder for ``path``: the folder itself, or a hub id's snapshot (cache or download)."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"teacher path '{path}' is a file; give a diffusers model folder (saved with save_pretrained)")
        return p
    if not _looks_like_hub_id(path):
        raise UserError(f"teacher folder '{path}' does not exist: give a diffusers model folder (saved with "
                        "save_pretrained, with scheduler_config.json) or a Hugging Face hub id")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["unet/*", "scheduler/*", "config.json", "scheduler_config.json", "diffusion_pytorch_model*", METADATA_FILE]
        return Path(snapshot_download(path, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated ...
        raise UserError(
            f"teacher '{path}' is not a local folder and cannot be fetched from the Hugging Face hub "
            f"({type(exc).__name__}): download it where the network allows and pass teacher.path=FOLDER"
        ) from None


def find_parts(folder: Path) -> tuple[Path, Path]:
    """``(unet folder, scheduler config file)`` in a pipeline folder (``unet/``, ``scheduler/``) or a model folder."""
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"teacher folder '{folder}' has no config.json (nor unet/config.json): "
                        "save the UNet there with save_pretrained")
    for cand in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json", unet_dir / "scheduler_config.json"):
        if cand.is_file():
            return unet_dir, cand
    raise UserError(f"teacher folder '{folder}' has no scheduler_config.json (nor scheduler/scheduler_config.json): "
                    "save the training scheduler there with scheduler.save_pretrained")


def scheduler_schedule(sched_cfg: dict, where: Path) -> tuple[str, Optional[Tensor]]:
    """``("edm", None)`` or ``("vp", alphas_cumprod)`` from a diffusers scheduler config."""
    import diffusers

    name = sched_cfg.get("_class_name", "")
    if name in EDM_SCHEDULERS:
        return "edm", None
    cls = getattr(diffusers, name, None) if name else None
    if cls is None:
        raise UserError(f"scheduler config {where} names an unknown scheduler class '{name}'")
    try:
        sched = cls.from_config(sched_cfg)
    except Exception as exc:
        raise UserError(f"cannot build scheduler {name} from {where}: {str(exc).splitlines()[0]}") from None
    abar = getattr(sched, "alphas_cumprod", None)
    if abar is None:
        raise UserError(f"scheduler {name} ({where}) has no discrete VP schedule (alphas_cumprod); "
                        f"supported: DDPM/DDIM/Euler-style VP schedulers and {', '.join(EDM_SCHEDULERS)}")
    return "vp", torch.as_tensor(abar, dtype=torch.float64)


def load_denoiser(path: str, *, guidance_scale: float = 1.0, null_class: Optional[int] = None,
                  prediction_type: Optional[str] = None, device: Optional[torch.device] = None,
                  dtype: Optional[torch.dtype] = None) -> LoadedTeacher:
    """Load a diffusers UNet + scheduler config (local folder or hub id) as a sigma-form denoiser.

    ``prediction_type`` overrides the scheduler config's; ``dtype`` is the UNet's weights'
    (diffusers' ``torch_dtype``; by default diffusers loads float32). Every failure is a one-line
    :class:`~scoredistill.errors.UserError` saying what to place where.
    """
    import diffusers

    folder = resolve_model_folder(path)
    unet_dir, sched_file = find_parts(folder)
    unet_cfg = _read_json(unet_dir / "config.json", "UNet config")
    sched_cfg = _read_json(sched_file, "scheduler config")
    cls_name = unet_cfg.get("_class_name")
    if cls_name not in UNET_CLASSES:
        raise UserError(f"teacher UNet class '{cls_name}' in {unet_dir / 'config.json'} is not supported; "
                        f"supported: {', '.join(UNET_CLASSES)}")
    kind, abar = scheduler_schedule(sched_cfg, sched_file)
    try:
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        unet = getattr(diffusers, cls_name).from_pretrained(str(unet_dir), local_files_only=True, **kwargs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the teacher UNet from '{unet_dir}' (missing or corrupt weights?): {first}") from None
    unet.eval().requires_grad_(False)
    pred = prediction_type or sched_cfg.get("prediction_type") or "epsilon"
    meta_file = folder / METADATA_FILE
    metadata = _read_json(meta_file, "teacher metadata") if meta_file.is_file() else {}
    kw = dict(guidance_scale=guidance_scale, null_class=null_class)
    if kind == "edm":
        den: UNetDenoiser = EDMDenoiser(unet, float(sched_cfg.get("sigma_data", 0.5)), pred, **kw)
        sigmas = karras_schedule(int(sched_cfg.get("num_train_timesteps", 1000)), float(sched_cfg.get("sigma_min", 0.002)),
                                 float(sched_cfg.get("sigma_max", 80.0)), float(sched_cfg.get("rho", 7.0)))
    else:
        den = VPDenoiser(unet, abar, pred, **kw)
        sigmas = den.sigmas.clone()
    if device is not None:
        den = den.to(device)
    return LoadedTeacher(den, sigmas, kind, unet_dir, unet_cfg, sched_cfg, metadata)


def weights_digest(module: nn.Module, max_elements: int = 100_000_000) -> str:
    """A hash of a module's weights (all bytes up to ``max_elements``; otherwise shapes and a strided sample)."""
    import hashlib

    h = hashlib.sha256()
    total = sum(t.numel() for t in module.state_dict().values())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        if total > max_elements:
            flat = flat[:: max(1, flat.numel() // 1024)]
        h.update(flat.float().numpy().tobytes())
    return h.hexdigest()[:16]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def schedule_summary(sigmas: Tensor) -> str:
    return f"{len(sigmas)} levels, sigma {float(sigmas[0]):.4g}..{float(sigmas[-1]):.4g}"

