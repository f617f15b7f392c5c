"""Image teachers as components: any supported diffusers model or pipeline (``diffusers``; ``diffusers_unet``, its
older name) and the embedded digits teacher (``digits_unet``), each an :class:`~scoredistill.images.image_teacher.ImageTeacher`
built from its config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from scoredistill.errors import UserError
from scoredistill.registry import component
from scoredistill.roles import BuildContext

from scoredistill.images.data import DIGITS_SHAPE
from scoredistill.images.image_teacher import ImageTeacher
from scoredistill.images.loading import load_denoiser
from scoredistill.images.training import DigitsTeacherSettings, ENV_DIGITS_TEACHER, is_complete, teacher_folder, train_digits_teacher

#: ``teacher.dtype``: the frozen teacher UNet's weights
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype_field():
    return Field("fp32", description="the frozen teacher UNet's weights: bf16 or fp16 halve its memory and, under "
                 "runtime.mixed_precision, spare autocast's cast of its weights on every call (the generator and fake "
                 "score stay float32 copies)")


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
