"""DMD's image generator and fake score, both initialised as copies of the teacher's network.

* ``unet_generator``: ``G(z) = D_gen(s_max z, s_max)`` with ``D_gen`` a trainable copy of
  the teacher's denoiser (DMD Sec. 3.1), so at step 0 ``G`` is the teacher's one-step
  denoising of pure noise.
* ``unet_denoiser``: the fake denoiser ``D_fake``, a trainable copy of the teacher's
  denoiser (DMD Sec. 3.2). Its :meth:`~UNetFakeScore.features` are the copy's (a UNet's
  mid-block output averaged over space: DMD2's bottleneck features for the GAN head).

Both take any teacher that makes trainable copies (:meth:`scoredistill.roles.Teacher.trainable_copy`),
whatever its family: a UNet or a transformer, VP, EDM or flow. Copies never carry the teacher's
classifier-free guidance (DMD guides the real score only).
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.registry import component
from scoredistill.roles import BuildContext, FakeScore, Generator


def _targets(denoiser: nn.Module) -> list[nn.Module]:
    targets = getattr(denoiser, "compile_targets", None)
    return targets() if targets is not None else [denoiser]


def _trainable_denoiser(ctx: BuildContext, role: str) -> nn.Module:
    """The teacher's denoiser made trainable for ``role``: a full copy, or with ``train.lora`` LoRA adapters on the
    teacher's own network (one shared frozen base; :meth:`scoredistill.roles.Teacher.trainable_copy`)."""
    if ctx.lora is None:
        return ctx.teacher.trainable_copy()
    return ctx.teacher.trainable_copy(role=role, lora=ctx.lora)


@component("unet_generator", role="generator", paper="Yin et al. 2024 (DMD), Sec. 3.1: G initialised from the teacher")
class UNetGenerator(Generator):
    """One-step generator G(z) = D_gen(s_max z, s_max), D_gen a trainable copy of the teacher's UNet."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        sigma: Optional[float] = Field(None, gt=0, description="noise level G starts from; default the teacher's sigma_max")

    def __init__(self, config: "UNetGenerator.Config", ctx: BuildContext) -> None:
        super().__init__()
        teacher = ctx.teacher
        self.denoiser = _trainable_denoiser(ctx, "generator")
        self.sigma = float(config.sigma or teacher.sigma_max)
        self.latent_shape = tuple(teacher.data_shape)
        self.scheduler_config = dict(getattr(teacher, "scheduler_config", None) or {})
        from scoredistill.images.pipeline_export import pipeline_folder

        # a text-to-image pipeline's generator exports as that pipeline, one step (where a scheduler reproduces G exactly)
        self.pipeline = pipeline_folder(teacher) if self.sigma == float(teacher.sigma_max) else None
        self.kind = getattr(teacher, "parameterisation", None)
        self.max_sequence_length = getattr(teacher, "max_sequence_length", None)  # an export's README passes it on

    def forward(self, z: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        sigma = torch.full((z.shape[0],), self.sigma, device=z.device, dtype=z.dtype)
        return self.denoiser(z * self.sigma, sigma, cond)

    def compile_targets(self) -> list[nn.Module]:
        return _targets(self.denoiser)  # the teacher's architecture: the same compiled code as the other roles

    def export(self, folder, provenance) -> None:
        """The network (``unet/`` or ``transformer/``) + ``scheduler/`` (the teacher's) + ``sigma_max`` and what the
        teacher says of its parameterisation (how the network's output becomes ``D``)."""
        import json

        from scoredistill.export import readme, save_unet_generator

        den = self.denoiser
        if not (hasattr(den, "describe") and hasattr(den, "save_network")):
            raise UserError(f"the teacher's trainable copy ({type(den).__name__}) has no describe() / save_network(): "
                            "it cannot be exported as a diffusers model")
        if self.pipeline is not None:
            from scoredistill.export import UNET_INFO
            from scoredistill.images.pipeline_export import export_pipeline

            export_pipeline(folder, self, self.pipeline, self.kind, self.scheduler_config,
                            readme(f"{provenance['method']} one-step text-to-image pipeline ({provenance['preset']})", provenance, ""))
            (folder / UNET_INFO).write_text(json.dumps({"generator": "G(z) = D(sigma_max * z, sigma_max)", "sigma_max": self.sigma,
                                                        "network": den.backbone.subfolder, "preconditioning": den.describe()}, indent=2) + "\n")
            return
        body = UNET_SAMPLING.format(shape=", ".join(map(str, self.latent_shape)), sigma=self.sigma)
        if getattr(den, "class_conditional", False):
            body += UNET_CLASS_LABELS.format(sigma=self.sigma, null=den.null_class)
        if getattr(den, "num_prompts", None) is not None:
            body += UNET_PROMPTS.format(sigma=self.sigma, prompts=den.num_prompts, shape=", ".join(map(str, den.prompt_embeddings.shape[1:])))
        save_unet_generator(folder, den, sigma_max=self.sigma, preconditioning=den.describe(),
                            how_to_sample=readme(f"{provenance['method']} one-step generator ({provenance['preset']})", provenance, body))
        if self.scheduler_config:
            (folder / "scheduler").mkdir()
            (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2) + "\n")


UNET_SAMPLING = """## Sampling

`unet/` (or `transformer/`) is a diffusers network and `scheduler/` the teacher's scheduler config,
which with `scoredistill_generator.json` says how the network's output becomes the clean estimate
`D(x, sigma)`. The generator is
`G(z) = D(sigma_max * z, sigma_max)` with `sigma_max = {sigma}` (`scoredistill_generator.json`). With
scoredistill installed:

```python
import torch
from scoredistill.images.loading import load_denoiser

D = load_denoiser("PATH/TO/THIS/FOLDER").denoiser.eval()
z = torch.randn(16, {shape})
with torch.no_grad():
    x = D({sigma} * z, torch.full((16,), {sigma}))   # images in [-1, 1]
```
"""


UNET_CLASS_LABELS = """
The UNet is class-conditional and was distilled as `G(z, c)`, with the class labels `c`
drawn uniformly (label {null} is the teacher's "no class"). Pass the labels as the third
argument:

```python
labels = torch.arange(16) % 10
with torch.no_grad():
    x = D({sigma} * z, torch.full((16,), {sigma}), labels)
```
"""


@component("unet_denoiser", role="fake_score", paper="Yin et al. 2024 (DMD), Sec. 3.2: the fake score, initialised from the teacher")
class UNetFakeScore(FakeScore):
    """The fake denoiser: a trainable copy of the teacher's UNet; features = mid-block output (pooled)."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, config: "UNetFakeScore.Config", ctx: BuildContext) -> None:
        super().__init__()
        self.denoiser = _trainable_denoiser(ctx, "fake_score")

    def forward(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None, *, x_clean: Optional[Tensor] = None) -> Tensor:
        return self.denoiser(x_noisy, sigma, cond)

    def compile_targets(self) -> list[nn.Module]:
        return _targets(self.denoiser)

    def features(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        if not hasattr(self.denoiser, "features"):
            return super().features(x_noisy, sigma, cond)
        return self.denoiser.features(x_noisy, sigma, cond)


UNET_PROMPTS = """
The UNet takes text and was distilled as `G(z, c)` on {prompts} prompt embeddings (`teacher.embeddings`
of the run's config), each of shape ({shape}), drawn uniformly. Pass a batch of embeddings
`(N, {shape})` from the same text encoder as the third argument:

```python
with torch.no_grad():
    x = D({sigma} * z, torch.full((16,), {sigma}), embeddings)   # embeddings: (16, {shape})
```
"""
