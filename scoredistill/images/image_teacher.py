"""The image teacher: a sigma-form denoiser (:mod:`scoredistill.images.denoisers`) with the teacher's own discrete
schedule (``sigmas``, ascending), its own loss weighting and training noise distribution (for the fake score's loss),
its multi-step sampler (deterministic Heun on the EDM grid, or on the flow scheduler's own grid; ``sampler_steps``
steps) and, optionally, the real images it models (``data``: ``digits`` or a folder of images).

The teacher says what the rest of a run needs (:class:`scoredistill.roles.Teacher`): its parameterisation, data space,
conditioning, and trainable copies of its network. The registered teachers (:mod:`scoredistill.images.teachers`) load
one and build it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.roles import Teacher, default_cache_dir, stable_hash
from scoredistill.sampling import heun_sample, karras_sigmas

from scoredistill.images.data import DIGITS_SHAPE, digits
from scoredistill.images.denoisers import NetworkDenoiser, flow_sigmas
from scoredistill.images.loading import LoadedTeacher, weights_digest

EDM_P_MEAN, EDM_P_STD = -1.2, 1.2


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
