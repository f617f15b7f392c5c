"""LPIPS regression (DMD eq. 9), through the ``lpips`` package with real ImageNet backbones."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from scoredistill.errors import UserError
from scoredistill.registry import component
from scoredistill.roles import BuildContext

from scoredistill_dmd.losses import PairRegression

#: torchvision checkpoint file of each LPIPS backbone (what lpips downloads)
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def backbone_path(net: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


@component("lpips_regression", role="generator_loss", paper="Yin et al. 2024 (DMD), eq. 9; Zhang et al. 2018 (LPIPS)")
class LPIPSRegression(PairRegression):
    """LPIPS distance between G(z_ref) and y_ref, images resized to 224 as in the paper."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        net: Literal["alex", "vgg", "squeeze"] = Field("vgg", description="LPIPS backbone (the paper uses VGG)")
        backbone: Literal["imagenet", "random"] = Field(
            "imagenet", description="'random' runs offline but is not perceptual: for tests only"
        )
        resize: Optional[int] = Field(224, ge=16, description="bilinear resize before LPIPS (paper: 224); null keeps size")

    def __init__(self, config: "LPIPSRegression.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()
        teacher = ctx.teacher if ctx is not None else None
        shape = tuple(teacher.data_shape) if teacher is not None else None
        #: latents are compared as the images they decode to (the teacher's VAE, with gradient): DMD's LPIPS in pixels
        self.latents = getattr(teacher, "data_space", None) == "latents"
        if not self.latents and shape is not None and (len(shape) != 3 or shape[0] not in (1, 3)):
            raise UserError(
                f"lpips_regression needs images of shape (1 or 3, H, W); the teacher's data shape is {shape}: "
                "use losses.regression.component=l2_regression or pseudo_huber_regression"
            )
        if config.backbone == "imagenet" and not backbone_path(config.net).is_file():
            raise UserError(
                f"LPIPS needs the ImageNet weights of its '{config.net}' backbone: place {BACKBONE_FILES[config.net]} "
                f"in {backbone_path(config.net).parent} (or set TORCH_HOME), or choose "
                "losses.regression.component=l2_regression / pseudo_huber_regression"
            )
        import lpips

        self.resize = config.resize
        self.lpips = lpips.LPIPS(net=config.net, pretrained=True, pnet_rand=config.backbone == "random", verbose=False)
        self.lpips.eval().requires_grad_(False)

    def forward(self, batch, models) -> Tensor:
        """DMD eq. 9; a latent teacher's ``G(z_ref)`` and ``y_ref`` are decoded to images first (``teacher.decode``)."""
        if not self.latents:
            return super().forward(batch, models)
        pred = batch.x_ref if batch.x_ref is not None else models.generator(batch.z_ref, batch.cond_ref)
        with torch.no_grad():
            target = models.teacher.decode(batch.y_ref)
        return self.distance(models.teacher.decode(pred), target).mean()

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape[1] == 1:
            pred, target = pred.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        if self.resize is not None and pred.shape[-1] != self.resize:
            pred = F.interpolate(pred, size=self.resize, mode="bilinear", align_corners=False)
            target = F.interpolate(target, size=self.resize, mode="bilinear", align_corners=False)
        return self.lpips(pred, target).flatten()
