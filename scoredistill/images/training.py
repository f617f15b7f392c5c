"""Training the embedded ``digits`` teacher: an EDM-preconditioned diffusers ``UNet2DModel``.

EDM (Karras et al. 2022): ``D(x, s) = c_skip x + c_out F(c_in x, log(s) / 4)``, trained on
the digits *train* split with ``ln s ~ N(P_mean, P_std^2)`` and the loss
``lambda(s) |D(x + s eps, s) - x|^2``, ``lambda = (s^2 + sd^2) / (s sd)^2`` (eq. 8),
Adam with a linear warm-up and an EMA of the weights (the EMA is what is saved).

The result is a diffusers folder::

    FOLDER/unet/                 config.json + diffusion_pytorch_model.safetensors (EMA weights)
    FOLDER/scheduler/            scheduler_config.json (EDMEulerScheduler: sigma_min/max, sigma_data)
    FOLDER/scoredistill.json     settings, data split, final loss, seconds, versions

so :func:`scoredistill.images.loading.load_denoiser` (and diffusers itself) loads it.
Training checkpoints into ``FOLDER.partial/state.pt`` every ``checkpoint_every`` steps and
resumes from there (same batches and noise as an uninterrupted run) until the folder is
complete; the finished folder appears atomically (renamed into place).

Location: ``$SCOREDISTILL_DIGITS_TEACHER`` if set, else
``$SCOREDISTILL_CACHE/teachers/digits-<hash of every setting>``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from scoredistill.errors import UserError
from scoredistill.io import atomic_write, environment_versions, write_json
from scoredistill.progress import progress as progress_display
from scoredistill.roles import default_cache_dir, stable_hash

from scoredistill.images.data import DIGITS_SHAPE, DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE, digits
from scoredistill.images.denoisers import EDMDenoiser
from scoredistill.images.loading import METADATA_FILE

ENV_DIGITS_TEACHER = "SCOREDISTILL_DIGITS_TEACHER"
STATE_FILE = "state.pt"


class DigitsTeacherSettings(BaseModel):
    """Architecture, noise schedule and training of the digits teacher (all part of its cache key)."""

    model_config = ConfigDict(extra="forbid")
    objective: Literal["edm", "flow"] = Field("edm", description="'edm': EDM-preconditioned denoising (Karras et al. 2022); "
                                              "'flow': rectified-flow velocity matching (logit-normal t, Esser et al. 2024)")
    block_out_channels: list[int] = Field([32, 64], min_length=1, description="UNet channels per resolution level")
    layers_per_block: int = Field(1, ge=1, description="ResNet blocks per level")
    attention: bool = Field(True, description="self-attention at the lowest resolution")
    norm_num_groups: int = Field(8, ge=1, description="GroupNorm groups")
    sigma_min: float = Field(0.002, gt=0, description="smallest noise level (EDM)")
    sigma_max: float = Field(80.0, gt=0, description="largest noise level; the generator starts from z * sigma_max")
    sigma_data: float = Field(0.75, gt=0, description="data standard deviation in EDM's preconditioning (digits: 0.752)")
    num_timesteps: int = Field(1000, ge=2, description="length of the discrete Karras schedule DMD samples t from")
    rho: float = Field(7.0, gt=0, description="spacing of that schedule (EDM eq. 5)")
    p_mean: float = Field(-1.2, description="training noise: ln s ~ N(p_mean, p_std^2) (EDM)")
    p_std: float = Field(1.2, gt=0, description="training noise: ln s ~ N(p_mean, p_std^2) (EDM)")
    train_steps: int = Field(6000, ge=1, description="teacher optimisation steps")
    train_batch_size: int = Field(128, ge=1, description="teacher batch size")
    train_lr: float = Field(1e-3, gt=0, description="teacher Adam learning rate")
    warmup_steps: int = Field(200, ge=0, description="linear learning-rate warm-up")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of the teacher's weights (saved)")
    train_seed: int = Field(0, description="seed of the teacher's initialisation, batches and noise")


def settings_key(s: DigitsTeacherSettings) -> str:
    dump = s.model_dump(mode="json")
    if dump["objective"] == "edm":
        dump.pop("objective")  # the key of an EDM teacher is the one it had before flow teachers existed
    return stable_hash("digits-teacher-v1", dump, DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)


def teacher_folder(s: DigitsTeacherSettings, cache_dir: Optional[Path] = None) -> Path:
    """Where the digits teacher with settings ``s`` lives (``$SCOREDISTILL_DIGITS_TEACHER`` wins)."""
    env = os.environ.get(ENV_DIGITS_TEACHER)
    if env:
        return Path(env).expanduser()
    return Path(cache_dir or default_cache_dir()) / "teachers" / f"digits-{settings_key(s)}"


def is_complete(folder: Path) -> bool:
    return (folder / "unet" / "config.json").is_file() and (folder / "scheduler" / "scheduler_config.json").is_file()


def make_unet(s: DigitsTeacherSettings):
    from diffusers import UNet2DModel

    n = len(s.block_out_channels)
    down = ["DownBlock2D"] * n
    if s.attention and n > 1:
        down[-1] = "AttnDownBlock2D"
    up = [d.replace("Down", "Up") for d in reversed(down)]
    return UNet2DModel(sample_size=DIGITS_SHAPE[1], in_channels=1, out_channels=1, block_out_channels=tuple(s.block_out_channels),
                       layers_per_block=s.layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
                       norm_num_groups=s.norm_num_groups, attention_head_dim=8)


def _progress(enabled: bool):
    return progress_display(enabled, "info")


def edm_loss(den: EDMDenoiser, x: torch.Tensor, s: DigitsTeacherSettings, gen: torch.Generator) -> torch.Tensor:
    n = torch.randn((len(x),), generator=gen)
    sigma = (s.p_mean + s.p_std * n).exp()
    eps = torch.randn(x.shape, generator=gen)
    pred = den.denoise(x + sigma[:, None, None, None] * eps, sigma)
    return (den.loss_weight(sigma) * ((pred - x) ** 2).flatten(1).mean(1)).mean()


def flow_loss(unet, x: torch.Tensor, s: DigitsTeacherSettings, gen: torch.Generator) -> torch.Tensor:
    """Rectified flow (Liu et al. 2023; SD3, Esser et al. 2024, eq. 2 with logit-normal ``t``, their Sec. 3.1):
    ``x_t = (1 - t) x + t eps``, ``|v_hat(x_t, 1000 t) - (eps - x)|^2``, ``logit(t) ~ N(0, 1)``."""
    t = torch.sigmoid(torch.randn((len(x),), generator=gen))
    eps = torch.randn(x.shape, generator=gen)
    tt = t[:, None, None, None]
    v_hat = unet(((1 - tt) * x + tt * eps), t * s.num_timesteps).sample
    return ((v_hat - (eps - x)) ** 2).flatten(1).mean(1).mean()


def train_digits_teacher(s: DigitsTeacherSettings, folder: Path, *, progress: bool = True, checkpoint_every: int = 500,
                         max_steps: Optional[int] = None, log=None) -> Path:
    """Train (or resume training) the digits teacher into ``folder``; returns it. ``max_steps`` stops early (tests)."""
    from diffusers import EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    if is_complete(folder):
        return folder
    log = log or (lambda msg: print(msg, file=sys.stderr))
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    x_train, _ = digits("train")
    torch.manual_seed(s.train_seed)
    unet = make_unet(s)
    den = EDMDenoiser(unet, s.sigma_data).train()
    ema = torch.optim.swa_utils.AveragedModel(unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(s.ema_decay))
    opt = torch.optim.Adam(unet.parameters(), lr=s.train_lr)
    gen = torch.Generator().manual_seed(s.train_seed + 1)
    step, history, seconds = 0, [], 0.0
    state_path = partial / STATE_FILE
    if state_path.is_file():
        try:
            # weights_only: tensors, numbers, strings and containers, never code (a shared cache may be writable by others)
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            unet.load_state_dict(state["unet"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            step, history, seconds = state["step"], state["history"], state["seconds"]
            log(f"resuming digits teacher training at step {step}/{s.train_steps} from {state_path}")
        except Exception as exc:  # a corrupt checkpoint: start again
            log(f"ignoring unreadable checkpoint {state_path} ({type(exc).__name__}); training from scratch")

    def save_state() -> None:
        state = {"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                 "step": step, "history": history, "seconds": seconds}
        atomic_write(state_path, lambda p: torch.save(state, p))

    stop = min(s.train_steps, max_steps) if max_steps is not None else s.train_steps
    t0 = time.perf_counter() - seconds
    running = None
    with _progress(progress) as bar:
        task = bar.add_task("digits teacher", total=s.train_steps, completed=step, info="")
        while step < stop:
            lr = s.train_lr * min(1.0, (step + 1) / max(s.warmup_steps, 1))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(0, len(x_train), (s.train_batch_size,), generator=gen)
            loss = edm_loss(den, x_train[idx], s, gen) if s.objective == "edm" else flow_loss(unet, x_train[idx], s, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update_parameters(unet)
            step += 1
            value = float(loss.detach())
            running = value if running is None else 0.98 * running + 0.02 * value
            if step % 50 == 0 or step == stop:
                history.append({"step": step, "loss": round(running, 5), "time": round(time.perf_counter() - t0, 2)})
                bar.update(task, completed=step, info=f"loss={running:.4f}")
            if step % checkpoint_every == 0 and step < s.train_steps:
                seconds = time.perf_counter() - t0
                save_state()
    seconds = time.perf_counter() - t0
    if step < s.train_steps:
        save_state()
        return partial
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ema.module.save_pretrained(str(tmp / "unet"), safe_serialization=True)
    if s.objective == "edm":
        EDMEulerScheduler(sigma_min=s.sigma_min, sigma_max=s.sigma_max, sigma_data=s.sigma_data, num_train_timesteps=s.num_timesteps,
                          rho=s.rho, prediction_type="epsilon").save_pretrained(str(tmp / "scheduler"))
    else:
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=s.num_timesteps, shift=1.0).save_pretrained(str(tmp / "scheduler"))
    what = "EDM-preconditioned" if s.objective == "edm" else "rectified-flow"
    write_json(tmp / METADATA_FILE, {
        "what": f"scoredistill digits teacher ({what} UNet2DModel, EMA weights)",
        "settings": s.model_dump(mode="json"), "key": settings_key(s),
        "data": {"name": "sklearn digits", "split": "train", "train_images": len(x_train), "test_size": DIGITS_TEST_SIZE,
                 "split_seed": DIGITS_SPLIT_SEED, "scaling": "v / 16 * 2 - 1"},
        "parameters": sum(p.numel() for p in unet.parameters()), "steps": step, "seconds": round(seconds, 1),
        "final_loss": history[-1]["loss"] if history else None,
        **({"training_sigmas": {"p_mean": s.p_mean, "p_std": s.p_std}} if s.objective == "edm" else {}),
        "history": history, "versions": environment_versions(),
    })
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    shutil.rmtree(partial, ignore_errors=True)
    return folder


def read_metadata(folder: Path) -> dict:
    path = Path(folder) / METADATA_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raise UserError(f"teacher metadata {path} is corrupt: delete the folder {folder} to retrain") from None
