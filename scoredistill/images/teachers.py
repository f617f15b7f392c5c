"""Image teachers: any supported diffusers model or pipeline (``diffusers``) and the embedded digits teacher (``digits_unet``).

Both are :class:`ImageTeacher`: a sigma-form denoiser (:mod:`scoredistill.images.denoisers`)
with the teacher's own discrete schedule (``sigmas``, ascending), its own loss weighting
and training noise distribution (for the fake score's loss), its multi-step sampler
(deterministic Heun on the EDM grid, or on the flow scheduler's own grid; ``sampler_steps``
steps) and, optionally, the real images it models (``data``: ``digits`` or a folder of images).
The teacher says what the rest of a run needs (:class:`scoredistill.roles.Teacher`): its
parameterisation, data space, conditioning, and trainable copies of its network.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.registry import component
from scoredistill.roles import BuildContext, Teacher, default_cache_dir, stable_hash
from scoredistill.sampling import heun_sample, karras_sigmas

from scoredistill.images.data import DIGITS_SHAPE, digits
from scoredistill.images.denoisers import NetworkDenoiser, flow_sigmas
from scoredistill.images.loading import LoadedTeacher, load_denoiser, weights_digest
from scoredistill.images.training import DigitsTeacherSettings, ENV_DIGITS_TEACHER, is_complete, teacher_folder, train_digits_teacher

EDM_P_MEAN, EDM_P_STD = -1.2, 1.2


#: ``teacher.dtype``: the frozen teacher UNet's weights
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype_field():
    return Field("fp32", description="the frozen teacher UNet's weights: bf16 or fp16 halve its memory and, under "
                 "runtime.mixed_precision, spare autocast's cast of its weights on every call (the generator and fake "
                 "score stay float32 copies)")


class ImageTeacher(Teacher):
    """A frozen image denoiser with its schedule, sampler and (optionally) its real data."""

    data_space = "pixels"  # "latents" for a network in a pipeline with a VAE
    #: the prompt strings of a run given --prompts (prompt index k is prompts[k]); None otherwise
    prompts: Optional[list[str]] = None

    def __init__(self, loaded: LoadedTeacher, data: Optional[str] = None, sampler_steps: int = 18, source: str = "",
                 resize: bool = False, crop: str = "center", caption_column: Optional[str] = None,
                 cache_dir: Optional[Path] = None, progress: bool = True) -> None:
        super().__init__()
        self.denoiser: NetworkDenoiser = loaded.denoiser
        self.register_buffer("sigmas", loaded.sigmas.float())
        self.kind = self.parameterisation = loaded.kind
        self.terminal = loaded.terminal
        self.flow_mu = loaded.flow_mu
        self.conditioning = "text" if self.denoiser.num_prompts is not None else self.denoiser.conditioning
        self.data_space = "latents" if self.data_shape_is_latent(loaded) else "pixels"
        self.vae_dir = loaded.unet_dir.parent / "vae" if self.data_space == "latents" else None
        #: what a sample looks like decoded: the data's shape, or a latent teacher's images (its VAE's channels and scale)
        self.image_shape = tuple(self.denoiser.data_shape)
        if self.vae_dir is not None and (self.vae_dir / "config.json").is_file():  # pixels per latent (SDXL's size conditions)
            vae_cfg = json.loads((self.vae_dir / "config.json").read_text())
            scale = self.denoiser.backbone.vae_scale = 2 ** (len(vae_cfg.get("block_out_channels") or [0] * 4) - 1)
            _, h, w = self.image_shape
            self.image_shape = (int(vae_cfg.get("out_channels", 3)), h * scale, w * scale)
        self.scheduler_config = dict(loaded.scheduler_config)  # exports ship it next to the network
        self.data_shape = tuple(self.denoiser.data_shape)
        self.sigma_data = float(getattr(self.denoiser, "sigma_data", 0.5))
        self.sampler_steps = sampler_steps
        self.data = data
        self.source = source
        self.resize, self.crop, self.cache_dir, self.progress = resize, crop, cache_dir, progress
        #: a folder's image files and their captions (``None``: no captions); see :mod:`scoredistill.images.folders`
        self.data_files: Optional[list[Path]] = None
        self.data_captions: Optional[list[str]] = None
        train = (loaded.metadata or {}).get("training_sigmas") or {}
        self.p_mean, self.p_std = float(train.get("p_mean", EDM_P_MEAN)), float(train.get("p_std", EDM_P_STD))
        prompts = [t if isinstance(t, Tensor) else t.fingerprint  # a tensor table by its bytes, a cached one by its key
                   for t in (self.denoiser.prompt_embeddings, self.denoiser.prompt_pooled) if t is not None]
        if getattr(self.denoiser.backbone, "time_ids", None) is not None:
            prompts.append(("sdxl_time_ids", self.denoiser.backbone.time_ids))  # SDXL's size conditions change D
        self._digest = stable_hash(loaded.kind, loaded.unet_config, loaded.scheduler_config, self.denoiser.prediction_type,
                                   self.denoiser.guidance_scale, self.denoiser.null_class, weights_digest(self.denoiser.unet), *prompts)
        self.register_buffer("class_labels", _class_labels(self.denoiser), persistent=False)
        if data == "digits":
            self.real_data("train")  # fail now on a digits teacher of another shape
        elif data is not None:  # fail now on a missing folder, no images, missing captions, an unreadable or wrong-sized image
            from scoredistill.images.folders import check_images, scan_image_folder

            self.data_files, self.data_captions = scan_image_folder(data, caption_column)
            check_images(self.data_files, self.image_shape, resize, cache_dir or default_cache_dir())

    @staticmethod
    def data_shape_is_latent(loaded: LoadedTeacher) -> bool:
        """A network in a pipeline with a VAE works on its latents; a pipeline whose ``model_index.json`` names a part
        that is not in the folder is refused (one line)."""
        folder = loaded.unet_dir.parent
        if loaded.unet_dir.name not in ("unet", "transformer"):
            return False
        index = folder / "model_index.json"
        if index.is_file():
            try:
                parts = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v and v[0] is not None]
            except ValueError:
                raise UserError(f"cannot read {index}: not JSON") from None
            missing = [k for k in parts if not (folder / k).is_dir()]
            if missing:
                raise UserError(f"pipeline folder '{folder}' lacks {', '.join(m + '/' for m in missing)} (its model_index.json "
                                "names them): save the whole pipeline with save_pretrained, or copy the missing parts")
        return (folder / "vae").is_dir()

    # -- what samples look like
    def decode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1]: pixels as they are; latents through the pipeline's VAE, ``vae.decode(x / scaling_factor +
        shift_factor)`` (the pipelines' own unscaling; LDM, Rombach et al. 2022, Sec. 3), with gradient to ``x``."""
        if self.data_space != "latents":
            return x
        vae = self.vae()
        cfg = vae.config
        z = x / float(cfg.scaling_factor) + float(getattr(cfg, "shift_factor", None) or 0.0)
        return vae.decode(z.to(vae.dtype), return_dict=False)[0].to(x.dtype)

    @torch.no_grad()
    def encode(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """The data of images in [-1, 1]: pixels as they are; a latent teacher's scaled latents, ``(E(x) - shift_factor) *
        scaling_factor`` with ``E(x)`` the mean of the VAE encoder's posterior (the inverse of :meth:`decode`)."""
        if self.data_space != "latents":
            return images
        vae = self.vae()
        sf, shift = float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)
        parts = [vae.encode(images[i : i + batch_size].to(vae.dtype)).latent_dist.mean for i in range(0, len(images), batch_size)]
        return ((torch.cat(parts).float() - shift) * sf).to(images.dtype)

    def vae(self) -> nn.Module:
        """The pipeline's VAE (loaded on first use, frozen, in the teacher network's dtype, on the teacher's device;
        not part of the teacher's state)."""
        vae = self.__dict__.get("_vae")
        if vae is None:
            import diffusers

            cfg = self.vae_dir / "config.json"
            name = json.loads(cfg.read_text()).get("_class_name", "AutoencoderKL") if cfg.is_file() else "AutoencoderKL"
            cls = getattr(diffusers, name, None) or diffusers.AutoencoderKL
            try:
                vae = cls.from_pretrained(str(self.vae_dir), local_files_only=True, torch_dtype=self.denoiser.unet_dtype())
            except Exception as exc:
                raise UserError(f"cannot load the pipeline's VAE from '{self.vae_dir}': {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
            if self.vae_tiling and hasattr(vae, "enable_tiling"):
                vae.enable_tiling()
            vae = self.__dict__["_vae"] = vae.eval().requires_grad_(False)
        return vae.to(self.sigmas.device)

    vae_tiling = False

    # -- the teacher protocol
    def forward(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return self.denoiser(x_noisy, sigma, cond)

    def features(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return self.denoiser.features(x_noisy, sigma, cond)  # the UNet's pooled mid-block output

    def feature_tokens(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return self.denoiser.feature_tokens(x_noisy, sigma, cond)  # its positions or tokens (LADD's heads)

    def compile_targets(self) -> list[nn.Module]:
        return [self.denoiser.unet]  # the diffusers network: guidance and preconditioning stay eager

    @property
    def continuous_time(self) -> bool:
        return self.denoiser.continuous_time

    def fingerprint(self) -> str:
        return f"unet-{self._digest}"

    def trainable_copy(self, role: str = "copy", lora=None) -> NetworkDenoiser:
        """The denoiser with trainable float32 weights and no guidance (DMD's generator and fake score start from it);
        with ``lora``, a LoRA adapter ``role`` on the teacher's own network instead (the base stays shared and frozen)."""
        if lora is None:
            return self.denoiser.trainable_copy()
        from scoredistill.lora import adapter_copy

        twin = adapter_copy(self.denoiser, "unet", role, lora)
        twin.guidance_scale = 1.0
        return twin

    @property
    def num_classes(self) -> Optional[int]:
        """The network's class-table size (``null_class`` among them) when it has one, else ``None``."""
        return self.denoiser.backbone.num_classes if self.denoiser.class_conditional else None

    def sample_conditions(self, n: int, generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
        """Class labels drawn uniformly from the UNet's classes (``null_class`` left out), or prompt indices drawn
        uniformly from the prompt table (``teacher.embeddings``); ``None`` for a UNet with neither. A run thus
        distils the conditional teacher, guided by ``guidance_scale`` on the real score, into a conditional
        generator ``G(z, c)``."""
        labels = self.class_labels
        if labels is None:
            return None
        if generator is None:
            return labels[torch.randint(0, len(labels), (n,), device=labels.device)]
        return labels[torch.randint(0, len(labels), (n,), generator=generator).to(labels.device)]

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """The network's own training weighting (EDM eq. 8, or the epsilon / v / x MSE of a VP model)."""
        return self.denoiser.loss_weight(sigma)

    def training_sigmas(self, n: int) -> Tensor:
        """VP: uniform over the discrete timesteps; EDM: ``ln s ~ N(p_mean, p_std^2)`` clipped to the schedule."""
        if self.kind != "edm":
            return super().training_sigmas(n)
        ln = self.p_mean + self.p_std * torch.randn((n,), device=self.sigmas.device)
        return ln.exp().clamp(self.sigma_min, self.sigma_max)

    # -- data
    def real_data(self, split: str = "train") -> Tensor:
        """The real images the teacher models (``digits``: the fixed ``train`` / ``test`` split; a folder: all its images,
        sized by ``teacher.resize`` / ``teacher.crop``, for every split), in [-1, 1]."""
        if self.data is None:
            raise UserError("the teacher has no real data: set teacher.data (--data) to 'digits' or a folder of images")
        if self.data == "digits":
            return _real_data(self.data, split, self.image_shape)
        from scoredistill.images.folders import folder_digest, load_images

        key = (self.data, tuple(self.image_shape), self.resize, self.crop, stable_hash(folder_digest(self.data_files)))
        if key not in _DATA_CACHE:
            _DATA_CACHE[key] = load_images(self.data_files, self.image_shape, self.resize, self.crop)
        return _DATA_CACHE[key]

    def _real_train(self) -> Tensor:
        """The real training data in the teacher's data space, on its device: a latent teacher's folder encoded by its
        VAE once (cached on disk, :func:`scoredistill.images.folders.cached_latents`), else :meth:`encode` of the images."""
        device = self.sigmas.device
        cached = self.__dict__.get("_real_train_cache")  # drawn on the device: no host copy per step (a CUDA graph can replay it)
        if cached is None or cached.device != device:
            if self.data_space == "latents" and self.data_files is not None:
                from scoredistill.images.folders import cached_latents
                from scoredistill.images.text_encoders import file_fingerprint

                vae_key = file_fingerprint(self.vae_dir) + str(self.denoiser.unet_dtype())
                x = cached_latents(self.data_files, self.image_shape, self.resize, self.crop, vae_key,
                                   lambda images: self.encode(images.to(device)), self.cache_dir or default_cache_dir(),
                                   progress=self.progress, log=lambda m: print(f"scoredistill: {m}", file=sys.stderr))
            else:
                x = self.encode(self.real_data("train").to(device))
            cached = self.__dict__["_real_train_cache"] = x.to(device)
        return cached

    def real_samples(self, n: int) -> Tensor:
        """``n`` samples of the real training data (latents for a latent teacher), drawn with replacement."""
        cached = self._real_train()
        return cached[torch.randint(0, len(cached), (n,), device=cached.device)]

    def real_labelled_samples(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` real samples with their conditions, drawn with replacement: ``teacher.data=digits``: images and their
        digit; a text teacher's captioned folder: latents and their captions' condition indices (:meth:`caption_conditions`)."""
        if self.conditioning == "text":
            x, first = self._real_train(), self.caption_conditions()
            pick = torch.randint(0, len(x), (n,), device=x.device)
            return x[pick], pick + first
        if self.data != "digits":
            raise UserError(f"a class-conditional dmd2 run needs real images with class labels: teacher.data=digits has them, "
                            f"a folder of images ('{self.data}') has none")
        device = self.sigmas.device
        cached = self.__dict__.get("_real_labelled")
        if cached is None or cached[0].device != device:
            x, y = digits("train")
            cached = self.__dict__["_real_labelled"] = (x.to(device), y.long().to(device))
        pick = torch.randint(0, len(cached[0]), (n,), device=device)
        return cached[0][pick], cached[1][pick]

    #: ``embed_captions(captions) -> index of the first caption's condition`` (a text pipeline teacher sets it)
    embed_captions = None

    def caption_conditions(self) -> int:
        """The condition index of the folder's first caption (caption ``j`` is ``first + j``): the captions are embedded
        by the pipeline's encoders into the prompt cache once, on first use, and appended to the prompt table."""
        first = self.__dict__.get("_caption_first")
        if first is None:
            if self.data is None:
                raise UserError("a text-conditional dmd2 run needs real images with captions: give --data FOLDER (teacher.data)")
            if self.data_captions is None:
                raise UserError(f"teacher.data '{self.data}' has no captions, and a text-conditional dmd2 run needs them: add a "
                                "metadata.jsonl / metadata.csv (file_name, text) or a NAME.txt caption beside each image")
            if self.embed_captions is None:
                raise UserError(f"teacher '{type(self).__name__}' cannot embed captions")
            first = self.__dict__["_caption_first"] = int(self.embed_captions(self.data_captions))
        return first

    def condition_vectors(self, cond: Tensor) -> Tensor:
        """One vector per condition (prompt or caption index) for a conditional discriminator: the pipeline's pooled
        text embedding where its network takes one (SDXL, SD3, Flux), else the mean of the prompt's token embeddings
        (SD 1.x / 2.x, whose UNet takes no pooled embedding); float32, on ``cond``'s device."""
        den = self.denoiser
        if self.conditioning != "text" or den.prompt_embeddings is None:
            return super().condition_vectors(cond)
        if den.prompt_pooled is not None:
            return den.prompt_pooled[cond].float().to(cond.device)
        return den.prompt_embeddings[cond].float().mean(dim=1).to(cond.device)

    # -- sampling
    def sampling_sigmas(self, steps: int, rho: float = 7.0) -> Tensor:
        """The sampler's noise levels, descending, ending at 0: a flow teacher's own scheduler grid (its shift, or its
        dynamic shift for this image size), converted by ``s = t / (1 - t)``; otherwise EDM eq. 5 between the table's
        ends, after one step down from an infinite (terminal) top level, as diffusers' first DDIM step takes it."""
        if self.kind == "flow":
            import diffusers

            sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
            sched.set_timesteps(steps, mu=self.flow_mu)
            return flow_sigmas(sched.sigmas, self.sigma_max).to(self.sigmas.device)
        if self.terminal:
            rest = karras_sigmas(max(steps - 1, 1), self.sigma_min, float(self.sigmas[-2]), rho)
            return torch.cat([rest.new_tensor([self.sigma_max]), rest])
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, rho)

    @property
    def sampler_nfe(self) -> int:
        """Network evaluations of :meth:`sample`: Heun's ``2 steps - 1``, one fewer from a terminal level (one Euler step)."""
        return 2 * self.sampler_steps - 1 - int(self.terminal)

    @torch.no_grad()
    def solve(self, z: Tensor, sigmas: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """Heun down ``sigmas`` from noise ``z``. From a terminal (infinite) top level the first step is its exact limit,
        ``x_1 = D(s_T z, s_T) + s_1 z`` (the noise estimate is ``z`` itself): diffusers' first DDIM step from a
        zero-SNR timestep, and FlowMatchEuler's first step from ``t = 1``."""
        if not self.terminal or float(sigmas[0]) < self.sigma_max:
            return super().solve(z, sigmas, cond)
        top = sigmas[0].to(z.dtype)
        x = self(z * top, top.expand(z.shape[0]), cond) + sigmas[1].to(z.dtype) * z
        return heun_sample(self, x, sigmas[1:], cond) if len(sigmas) > 2 else x


def _class_labels(denoiser: NetworkDenoiser) -> Optional[Tensor]:
    """The conditions a run draws from: a class-conditional network's labels ``0 .. num_classes - 1`` without
    ``null_class``, or the prompt indices ``0 .. P - 1`` of a prompt table."""
    if denoiser.num_prompts is not None:
        return torch.arange(denoiser.num_prompts)
    count = denoiser.backbone.num_classes
    if not denoiser.class_conditional or not count:
        return None
    labels = torch.tensor([k for k in range(int(count)) if k != denoiser.null_class], dtype=torch.long)
    if len(labels) == 0:
        raise UserError(f"the teacher network has {count} class labels and null_class={denoiser.null_class}: no class is left to sample")
    return labels


_DATA_CACHE: dict[tuple, Tensor] = {}


def _real_data(data: str, split: str, shape: tuple[int, ...]) -> Tensor:
    """The bundled digits' ``split`` (a folder's images are read by :meth:`ImageTeacher.real_data` itself)."""
    key = (data, split, tuple(shape))
    if key not in _DATA_CACHE:
        if tuple(shape) != DIGITS_SHAPE:
            raise UserError(f"teacher.data 'digits' holds 1x8x8 images but the teacher makes {'x'.join(map(str, shape))} "
                            "images: use a digits-shaped teacher or set teacher.data to a folder of matching images")
        _DATA_CACHE[key] = digits(split)[0]
    return _DATA_CACHE[key]


# --------------------------------------------------------------------------- components


@component("diffusers", role="teacher", paper="diffusers UNets and DiT / SD3 / Flux transformers in the sigma form (Karras et al. 2022, Sec. 2)")
class DiffusersTeacher(ImageTeacher):
    """Any supported diffusers model or pipeline folder (or hub id): VP, EDM or flow-matching, adapted to the sigma form."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: Optional[str] = Field(None, description="diffusers pipeline folder (unet/ or transformer/, scheduler/), model "
                                    "folder (config.json + scheduler_config.json) or hub id (--teacher sets it)")
        prediction_type: Optional[str] = Field(None, description="override the scheduler config's epsilon / v_prediction / sample")
        guidance_scale: float = Field(1.0, description="classifier-free guidance D_u + g (D_c - D_u) on the real score; 1 = none")
        null_class: Optional[int] = Field(None, description="class label meaning 'no class' (unconditional branch of a "
                                          "class-conditional network; a DiT's is its class count)")
        dtype: Literal["fp32", "bf16", "fp16"] = _dtype_field()
        prompts: Optional[str] = Field(None, description="prompts for a text-to-image pipeline folder (--prompts): .txt (one a "
                                       "line), .jsonl, .csv or .parquet (column teacher.prompt_column); embedded once by the "
                                       "pipeline's own text encoders into a cache, drawn uniformly for each batch")
        prompt_column: str = Field("prompt", description="the prompts' field (.jsonl) or column (.csv, .parquet)")
        negative_prompt: str = Field("", description="the unconditional branch of guidance: this prompt's embedding (as the "
                                     "pipelines' negative_prompt; default the empty prompt)")
        max_sequence_length: Optional[int] = Field(None, ge=1, description="T5's token count for SD3 / Flux prompts (the "
                                                   "pipelines' max_sequence_length; default theirs: 256 / 512)")
        text_batch_size: int = Field(64, ge=1, description="prompts per batch of the text encoders when filling the cache")
        embeddings: Optional[str] = Field(None, description="prompt embeddings for a text-conditional network: a .safetensors "
                                          "file with 'embeddings' (prompts, tokens, dim), drawn uniformly for each batch, "
                                          "'pooled' (prompts, pooled dim) for SD3 / Flux, and optionally 'null' / "
                                          "'null_pooled', the empty prompt's for guidance (default zeros)")
        sample_size: Optional[int] = Field(None, gt=0, description="height = width of the images or latents, where the "
                                           "model config has no sample_size (Flux)")
        flux_guidance: float = Field(3.5, description="the guidance embedding's value for a guidance-distilled Flux model")
        data: Optional[str] = Field(None, description="real images (--data): 'digits' or a folder, with captions for a text "
                                    "teacher (metadata.jsonl / metadata.csv: file_name, text; or NAME.txt beside each image): "
                                    "the FID reference and the real data of dmd2's discriminator")
        sampler_steps: int = Field(18, ge=2, description="steps of the teacher's multi-step Heun sampler (2*steps-1 NFE)")
        sdxl_time_ids: Optional[list[float]] = Field(None, min_length=6, max_length=6, description="an SDXL UNet's size "
                                                    "conditions (original H, W, crop top, left, target H, W) in pixels; "
                                                    "default the image's own size, uncropped")
        vae_tiling: bool = Field(False, description="decode latents tile by tile (the VAE's enable_tiling): less memory for "
                                 "large images")
        resize: bool = Field(False, description="teacher.data images of another size than the teacher's: scale the shorter "
                             "side to it (bicubic) and crop (teacher.crop); false: such images are refused")
        crop: Literal["center", "random"] = Field("center", description="with teacher.resize: crop the centre, or at a random "
                                                  "offset (one per image, from a fixed seed: the cached latents stay valid)")
        caption_column: Optional[str] = Field(None, description="the caption field of a teacher.data folder's metadata.jsonl / "
                                              "metadata.csv (default 'text', else 'caption')")

    def __init__(self, config: "DiffusersTeacher.Config", ctx: Optional[BuildContext] = None) -> None:
        if not config.path:
            raise UserError("no teacher given: pass --teacher FOLDER_OR_HUB_ID (or --set teacher.path=...), a diffusers "
                            "model or pipeline folder")
        loaded = load_denoiser(config.path, guidance_scale=config.guidance_scale, null_class=config.null_class,
                               prediction_type=config.prediction_type, dtype=TEACHER_DTYPES[config.dtype],
                               sample_size=config.sample_size, flux_guidance=config.flux_guidance)
        den = loaded.denoiser
        name = type(den.unet).__name__
        self.data_shape_is_latent(loaded)  # a pipeline missing a part: refused before any prompt is encoded
        if config.sdxl_time_ids is not None:
            if not getattr(den.backbone, "text_time", False):
                raise UserError(f"teacher.sdxl_time_ids applies to an SDXL UNet (addition_embed_type 'text_time'), not to this {name}")
            den.backbone.time_ids = tuple(config.sdxl_time_ids)
        prompts = None
        if config.prompts:
            if config.embeddings:
                raise UserError("give teacher.prompts (--prompts) or teacher.embeddings, not both")
            from scoredistill.images.prompts import attach_prompt_cache

            prompts = attach_prompt_cache(den, config, TEACHER_DTYPES[config.dtype], ctx)
        elif config.embeddings:
            den.set_prompts(*read_prompt_embeddings(config.embeddings))
        elif den.conditioning == "text":
            raise UserError(f"the teacher {name} is text-conditional: give prompts with --prompts FILE (a pipeline folder with "
                            "its text encoders), or precomputed prompt embeddings with teacher.embeddings=FILE.safetensors "
                            "('embeddings' (prompts, tokens, dim)" + (", 'pooled' (prompts, pooled dim)" if den.backbone.text_dims[1] else "") + ")")
        if den.class_conditional and den.null_class is None:
            raise UserError(f"the teacher {name} is class-conditional ({den.backbone.num_classes} labels): set "
                            "teacher.null_class to the label it was trained with for 'no class'")
        super().__init__(loaded, config.data, config.sampler_steps, source=config.path, resize=config.resize, crop=config.crop,
                         caption_column=config.caption_column, cache_dir=ctx.cache_dir if ctx is not None else None,
                         progress=ctx.extra.get("progress", True) if ctx is not None else True)
        self.prompts, self.vae_tiling = prompts, config.vae_tiling
        self.max_sequence_length = config.max_sequence_length  # T5's token count of the prompts (SD3, Flux)
        if self.conditioning == "text":  # captions join the prompt cache (a table of teacher.embeddings is refused there)
            from scoredistill.images.prompts import attach_caption_cache

            dtype = TEACHER_DTYPES[config.dtype]
            self.embed_captions = lambda captions: attach_caption_cache(den, config, dtype, captions, ctx)


@component("diffusers_unet", role="teacher", paper="diffusers UNets and DiT / SD3 / Flux transformers in the sigma form (Karras et al. 2022, Sec. 2)")
class DiffusersUNetTeacher(DiffusersTeacher):
    """The ``diffusers`` teacher under its earlier name (same config, same behaviour)."""


def read_prompt_embeddings(path: str) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(embeddings, null, pooled, null_pooled)`` from a .safetensors file (see ``teacher.embeddings``); one-line errors."""
    from scoredistill.io import load_tensors

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"teacher.embeddings: no file {file}; save the text encoder's outputs there with "
                        "safetensors.torch.save_file({'embeddings': E, 'null': E_empty}, PATH)")
    try:
        tensors = load_tensors(file)
    except Exception as exc:
        raise UserError(f"teacher.embeddings: cannot read {file} as safetensors: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if "embeddings" not in tensors:
        raise UserError(f"teacher.embeddings: {file} has no tensor 'embeddings' (it has: {', '.join(sorted(tensors)) or 'none'})")
    return tensors["embeddings"], tensors.get("null"), tensors.get("pooled"), tensors.get("null_pooled")


@component("digits_unet", role="teacher", paper="EDM (Karras et al. 2022) UNet2DModel trained by scoredistill on sklearn digits")
class DigitsTeacher(ImageTeacher):
    """The embedded digits teacher: trained on first use (about 13 min on 2 CPU cores), then cached."""

    class Config(DigitsTeacherSettings):
        model_config = ConfigDict(extra="forbid")
        path: Optional[str] = Field(None, description=f"teacher folder; default ${ENV_DIGITS_TEACHER} or the cache folder")
        sampler_steps: int = Field(18, ge=2, description="Heun steps of the teacher's multi-step sampler (2*steps-1 NFE)")
        dtype: Literal["fp32", "bf16", "fp16"] = _dtype_field()

    @staticmethod
    def settings(config: "DigitsTeacher.Config") -> DigitsTeacherSettings:
        return DigitsTeacherSettings(**config.model_dump(exclude={"path", "sampler_steps", "dtype"}))

    @staticmethod
    def folder(config: "DigitsTeacher.Config", cache_dir: Optional[Path] = None) -> Path:
        return Path(config.path).expanduser() if config.path else teacher_folder(DigitsTeacher.settings(config), cache_dir)

    def __init__(self, config: "DigitsTeacher.Config", ctx: Optional[BuildContext] = None) -> None:
        folder = self.folder(config, ctx.cache_dir if ctx is not None else None)
        if not is_complete(folder):
            if config.path:
                raise UserError(f"teacher.path '{config.path}' holds no trained digits teacher: run 'scoredistill teacher "
                                f"train --preset digits --out {config.path}' or unset teacher.path to use the cache")
            progress = ctx.extra.get("progress", True) if ctx is not None else True
            print(f"scoredistill: no cached digits teacher at {folder}: training it now (about 13 minutes on 2 CPU cores; "
                  "'scoredistill teacher train --preset digits' does this ahead of time)", file=sys.stderr)
            train_digits_teacher(self.settings(config), folder, progress=progress)
        try:
            loaded = load_denoiser(str(folder), dtype=TEACHER_DTYPES[config.dtype])
        except UserError as err:
            if config.path:
                raise
            raise UserError(f"{err}; this cached digits teacher is damaged: delete {folder} and run again to retrain it") from None
        if tuple(loaded.denoiser.data_shape) != DIGITS_SHAPE:
            raise UserError(f"the digits teacher in {folder} makes {loaded.denoiser.data_shape} images, not 1x8x8: delete it to retrain")
        _check_trained_settings(self.settings(config), loaded.metadata.get("settings"), folder)
        super().__init__(loaded, "digits", config.sampler_steps, source=str(folder))


#: the settings a digits teacher folder fixes (its UNet, noise schedule and training noise are read from it)
FOLDER_SETTINGS = ("objective", "block_out_channels", "layers_per_block", "attention", "norm_num_groups", "sigma_min", "sigma_max",
                   "sigma_data", "num_timesteps", "rho", "p_mean", "p_std")


def _check_trained_settings(asked: DigitsTeacherSettings, trained: Optional[dict], folder: Path) -> None:
    """A teacher folder given by ``teacher.path`` (or ``$SCOREDISTILL_DIGITS_TEACHER``) is used as it was trained: a
    config asking for another architecture or schedule would be silently ignored, and the run's config.yaml would
    misstate its teacher. One line names every difference."""
    if not trained:
        return  # a folder written by other tools: nothing recorded to compare
    want = asked.model_dump(mode="json")
    diffs = [f"teacher.{k}={want[k]} (it has {trained[k]})" for k in FOLDER_SETTINGS if k in trained and trained[k] != want[k]]
    if diffs:
        raise UserError(f"the digits teacher in {folder} was trained with other settings than the config asks for: "
                        f"{', '.join(diffs)}; set them to the teacher's, or train a teacher with yours "
                        "('scoredistill teacher train --preset digits --set ... --out DIR')")
