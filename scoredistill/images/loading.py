"""Loading a diffusers teacher: a model or pipeline folder (or hub id) to a sigma-form denoiser.

:func:`load_denoiser` finds the network and its scheduler config in a folder
(:func:`find_parts`), tells the parameterisation from the scheduler
(:func:`scheduler_schedule`: VP, EDM or flow matching), loads the network with diffusers'
``from_pretrained``, wraps it in the matching denoiser of :mod:`scoredistill.images.denoisers`
and builds its discrete noise levels. Every failure is one line saying what to place where.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.hashing import sha256_digest
from scoredistill.sampling import karras_schedule
from scoredistill.images.backbones import BACKBONES, FluxBackbone, make_backbone
from scoredistill.images.denoisers import (EDMDenoiser, FlowDenoiser, NetworkDenoiser, VPDenoiser, exponential_schedule,
                                           flow_shift_mu, flow_sigmas)

EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
METADATA_FILE = "scoredistill.json"


@dataclass
class LoadedTeacher:
    """What :func:`load_denoiser` found: the denoiser, its discrete schedule and provenance."""

    denoiser: NetworkDenoiser
    sigmas: Tensor
    kind: str  # the parameterisation: "vp", "edm" or "flow"
    unet_dir: Path
    unet_config: dict
    scheduler_config: dict
    metadata: dict = field(default_factory=dict)
    #: a dynamically shifted flow scheduler's ``mu`` for this image size (``None``: no dynamic shift)
    flow_mu: Optional[float] = None
    #: whether the top level stands for an infinite one (zero terminal SNR, flow's ``t = 1``)
    terminal: bool = False


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


HUB_PATTERNS = ["model_index.json", "unet/*", "transformer/*", "scheduler/*", "config.json", "scheduler_config.json",
                "vae/*", "text_encoder*/*", "tokenizer*/*",
                "diffusion_pytorch_model*", METADATA_FILE]


def resolve_model_folder(path: str) -> Path:
    """A local folder for ``path``: the folder itself, or a hub id's snapshot (the local cache first; a download only
    where the hub is reachable and ``HF_HUB_OFFLINE`` is unset)."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"teacher path '{path}' is a file; give a diffusers model or pipeline folder (saved with save_pretrained)")
        return p
    if not _looks_like_hub_id(path):
        raise UserError(f"teacher folder '{path}' does not exist: give a diffusers model or pipeline folder (saved with "
                        "save_pretrained, with its scheduler config) or a Hugging Face hub id")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of diffusers
        snapshot_download = None
    hint = (f"teacher '{path}' is not a local folder nor in the Hugging Face cache ($HF_HOME, default ~/.cache/huggingface): "
            f"where the network allows, run 'huggingface-cli download {path}' (it lands in that cache), or save the pipeline "
            "with save_pretrained and pass its folder")
    if snapshot_download is None:
        raise UserError(hint)
    try:
        return Path(snapshot_download(path, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    if env_flag("HF_HUB_OFFLINE"):
        raise UserError(hint + " (HF_HUB_OFFLINE is set: no download was tried)")
    try:
        return Path(snapshot_download(path, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated ...
        raise UserError(f"{hint} (download failed: {type(exc).__name__})") from None


def find_parts(folder: Path) -> tuple[Path, Optional[Path]]:
    """``(network folder, scheduler config file or None)`` in a pipeline folder (``model_index.json`` with ``unet/`` or
    ``transformer/``, ``scheduler/``) or a model folder (``config.json`` beside ``scheduler_config.json``)."""
    net_dir = None
    for sub in ("unet", "transformer"):
        if (folder / sub / "config.json").is_file():
            net_dir = folder / sub
            break
    if net_dir is None and (folder / "config.json").is_file():
        net_dir = folder
    if net_dir is None:
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())[:12]
        raise UserError(f"teacher folder '{folder}' holds no diffusers model: found {', '.join(found) or 'nothing'}; supported: "
                        "a pipeline folder with unet/ or transformer/ (each with config.json) and scheduler/, or a model "
                        "folder with config.json and scheduler_config.json")
    for cand in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json", net_dir / "scheduler_config.json"):
        if cand.is_file():
            return net_dir, cand
    return net_dir, None


def scheduler_schedule(sched_cfg: dict, where: Path) -> tuple[str, Optional[Any]]:
    """``("edm", None)``, ``("flow", scheduler)`` or ``("vp", alphas_cumprod)`` from a diffusers scheduler config."""
    import diffusers

    name = sched_cfg.get("_class_name", "")
    if name in EDM_SCHEDULERS:
        return "edm", None
    cls = getattr(diffusers, name, None) if name else None
    if cls is None:
        raise UserError(f"scheduler config {where} names an unknown scheduler class '{name}'")
    if name in FLOW_SCHEDULERS:
        cls = diffusers.FlowMatchEulerDiscreteScheduler  # the flow schedulers share its training table
    try:
        sched = cls.from_config(sched_cfg)
    except Exception as exc:
        raise UserError(f"cannot build scheduler {name} from {where}: {str(exc).splitlines()[0]}") from None
    if name in FLOW_SCHEDULERS:
        return "flow", sched
    abar = getattr(sched, "alphas_cumprod", None)
    if abar is None:
        raise UserError(f"scheduler {name} ({where}) has no discrete VP schedule (alphas_cumprod); supported: DDPM/DDIM/"
                        f"Euler-style VP schedulers, {', '.join(EDM_SCHEDULERS)} and {', '.join(FLOW_SCHEDULERS)}")
    return "vp", torch.as_tensor(abar, dtype=torch.float64)


def _seq_len(den: NetworkDenoiser) -> int:
    """The image's token count, as the pipelines compute it for the dynamic flow shift."""
    if isinstance(den.backbone, FluxBackbone):
        return den.backbone.seq_len
    patch = int(getattr(den.unet.config, "patch_size", None) or 1)
    return (den.data_shape[1] // patch) * (den.data_shape[2] // patch)


def load_denoiser(path: str, *, guidance_scale: float = 1.0, null_class: Optional[int] = None,
                  prediction_type: Optional[str] = None, device: Optional[torch.device] = None,
                  dtype: Optional[torch.dtype] = None, sample_size: Optional[int] = None,
                  flux_guidance: float = 3.5) -> LoadedTeacher:
    """Load a diffusers network + scheduler config (local folder or hub id) as a sigma-form denoiser.

    ``prediction_type`` overrides the scheduler config's; ``dtype`` is the network's weights'
    (diffusers' ``torch_dtype``; by default diffusers loads float32); ``sample_size`` the latent / image
    size where the model config has none (Flux). Every failure is a one-line
    :class:`~scoredistill.errors.UserError` saying what to place where.
    """
    import diffusers

    folder = resolve_model_folder(path)
    net_dir, sched_file = find_parts(folder)
    net_cfg = _read_json(net_dir / "config.json", "model config")
    cls_name = net_cfg.get("_class_name")
    if cls_name not in BACKBONES:
        raise UserError(f"teacher model class '{cls_name}' in {net_dir / 'config.json'} is not supported; "
                        f"supported: {', '.join(BACKBONES)}")
    if sched_file is None:
        raise UserError(f"teacher folder '{folder}' has no scheduler config (scheduler/scheduler_config.json or "
                        "scheduler_config.json): save the scheduler the model was trained with there (scheduler.save_pretrained)")
    sched_cfg = _read_json(sched_file, "scheduler config")
    kind, schedule = scheduler_schedule(sched_cfg, sched_file)
    try:
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        net = getattr(diffusers, cls_name).from_pretrained(str(net_dir), local_files_only=True, **kwargs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the teacher {cls_name} from '{net_dir}' (missing or corrupt weights?): {first}") from None
    net.eval().requires_grad_(False)
    backbone = make_backbone(net, sample_size, flux_guidance)
    pred = prediction_type or sched_cfg.get("prediction_type") or "epsilon"
    meta_file = folder / METADATA_FILE
    metadata = _read_json(meta_file, "teacher metadata") if meta_file.is_file() else {}
    kw = dict(guidance_scale=guidance_scale, null_class=null_class, backbone=backbone)
    mu = None
    if kind == "edm":
        den: NetworkDenoiser = EDMDenoiser(net, float(sched_cfg.get("sigma_data", 0.5)), pred, **kw)
        make = exponential_schedule if sched_cfg.get("sigma_schedule", "karras") == "exponential" else karras_schedule
        args = [int(sched_cfg.get("num_train_timesteps", 1000)), float(sched_cfg.get("sigma_min", 0.002)), float(sched_cfg.get("sigma_max", 80.0))]
        sigmas = make(*args, float(sched_cfg.get("rho", 7.0))) if make is karras_schedule else make(*args)
    elif kind == "flow":
        if prediction_type not in (None, "flow_prediction"):
            raise UserError(f"teacher.prediction_type '{prediction_type}' does not apply to a flow-matching teacher (it predicts velocity)")
        den = FlowDenoiser(net, int(schedule.config.num_train_timesteps), **kw)
        t = schedule.sigmas.double()
        mu = flow_shift_mu(sched_cfg, _seq_len(den))
        if mu is not None:
            t = schedule.time_shift(mu, 1.0, t)
        sigmas = flow_sigmas(t).flip(0)
        den.terminal = float(sigmas[-1])
    else:
        zero_snr = bool(sched_cfg.get("rescale_betas_zero_snr")) or float(schedule[-1]) <= 0
        den = VPDenoiser(net, schedule, pred, terminal=zero_snr, **kw)
        sigmas = den.sigmas.clone()
    if device is not None:
        den = den.to(device)
    terminal = kind == "flow" or (kind == "vp" and zero_snr)
    return LoadedTeacher(den, sigmas, kind, net_dir, net_cfg, sched_cfg, metadata, mu, terminal)


def weights_digest(module: nn.Module, max_elements: int = 100_000_000) -> str:
    """A hash of a module's weights (all bytes up to ``max_elements``; otherwise shapes and a strided sample)."""
    state = module.state_dict()
    total = sum(t.numel() for t in state.values())

    def chunks():
        for name, t in sorted(state.items()):
            flat = t.detach().cpu().contiguous().reshape(-1)
            yield from (name.encode(), str(tuple(t.shape)).encode(),
                        (flat[:: max(1, flat.numel() // 1024)] if total > max_elements else flat).float())

    return sha256_digest(chunks())


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def schedule_summary(sigmas: Tensor) -> str:
    return f"{len(sigmas)} levels, sigma {float(sigmas[0]):.4g}..{float(sigmas[-1]):.4g}"
