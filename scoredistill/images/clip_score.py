"""CLIP score of images against their prompts, with transformers' ``CLIPModel`` from a local folder.

CLIPScore (Hessel et al. 2021, eq. 1, with ``w = 100`` as torchmetrics' ``CLIPScore``): for each image
``x`` and its prompt ``c``, ``100 * max(cos(E_I(x), E_T(c)), 0)`` with ``E_I`` / ``E_T`` CLIP's
projected image and text embeddings; the score is the mean over the pairs. Images are quantised to
uint8 (the format images are evaluated in) and preprocessed by the folder's own ``CLIPProcessor``
(resize, centre crop, normalisation); prompts are tokenised and truncated to CLIP's context.

``eval.clip_model`` names the folder (``CLIPModel.save_pretrained`` plus its processor files, e.g.
a download of ``openai/clip-vit-large-patch14``); without it the metric is skipped with one note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from scoredistill.errors import UserError

SKIPPED_NOTE = "skipped: set eval.clip_model to a local CLIP model folder (CLIPModel + CLIPProcessor files)"


def check_clip_folder(path: Optional[str]) -> None:
    """One line, before training, for an ``eval.clip_model`` that is not a CLIP model folder."""
    if path is None:
        return
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(f"eval.clip_model '{path}' is not a model folder (no config.json): give a local CLIP folder "
                        "(CLIPModel.save_pretrained with its processor files), or unset it to skip the CLIP score")


def load_clip(path: str, device: torch.device):
    """``(model, processor)`` from the folder, offline, float32, eval mode; one line when it cannot be loaded."""
    from transformers import CLIPModel, CLIPProcessor

    from scoredistill.images.text_encoders import _load

    folder = Path(path).expanduser()
    check_clip_folder(path)
    return _load(CLIPModel, folder).to(device).eval(), _load(CLIPProcessor, folder)


def _features(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output  # (transformers 5 returns the output object)


@torch.no_grad()
def clip_scores(images: Tensor, prompts: list[str], model, processor, batch_size: int = 32) -> Tensor:
    """``100 * max(cos(E_I(x_i), E_T(c_i)), 0)`` for each image ``x_i`` (``(N, C, H, W)`` in [-1, 1]) and prompt ``c_i``."""
    from scoredistill.images.data import to_uint8

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    device = next(model.parameters()).device
    pixels = to_uint8(images)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    out = []
    for i in range(0, len(images), batch_size):
        batch = [im.permute(1, 2, 0).numpy() for im in pixels[i : i + batch_size].cpu()]
        inputs = processor(text=prompts[i : i + batch_size], images=batch, return_tensors="pt", padding=True, truncation=True)
        img = _features(model.get_image_features(pixel_values=inputs["pixel_values"].to(device)))
        txt = _features(model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                                attention_mask=inputs["attention_mask"].to(device)))
        out.append(100 * torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).clamp(min=0).cpu())
    return torch.cat(out)


def clip_score(images: Tensor, prompts: list[str], model, processor) -> float:
    """The mean CLIP score of the pairs (:func:`clip_scores`)."""
    return float(clip_scores(images, prompts, model, processor).mean())
