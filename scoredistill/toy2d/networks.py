"""The toy generator and fake score: MLPs for low-dimensional data (the networks in :mod:`scoredistill.mlp`)."""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from scoredistill.errors import UserError
from scoredistill.registry import component
from scoredistill.mlp import FourierEmbedding, LabelEmbedding, MLPDenoiserNet, mlp
from scoredistill.roles import BuildContext, FakeScore, Generator


class MLPConfig(BaseModel):
    """Settings shared by the MLP generator and fake score."""

    model_config = ConfigDict(extra="forbid")
    width: int = Field(128, ge=1, description="hidden units per layer")
    depth: int = Field(3, ge=1, description="hidden layers")
    input_features: int = Field(0, ge=0, description="random Fourier features of the (preconditioned) input, 0 for none")
    input_scale: float = Field(1.0, gt=0, description="frequency scale of those features")


def flat_dim(teacher, what: str) -> int:
    """The data dimension of a teacher of flat data; a clear error for images."""
    if len(teacher.data_shape) != 1:
        raise UserError(f"{what} needs flat data; the teacher's data shape is {teacher.data_shape}")
    return teacher.data_shape[0]


@component("mlp_denoiser", role="fake_score", paper="Yin et al. 2024 (DMD), Sec. 3.2: the fake score, trained online")
class MLPFakeScore(FakeScore):
    """An EDM-preconditioned MLP denoiser of the generator's distribution, for flat (e.g. 2-D) data."""

    class Config(MLPConfig):
        pass

    def __init__(self, config: "MLPFakeScore.Config", ctx: BuildContext) -> None:
        super().__init__()
        teacher = ctx.teacher
        self.denoiser = MLPDenoiserNet(flat_dim(teacher, "fake_score 'mlp_denoiser'"), teacher.sigma_data, config.width, config.depth,
                                       input_features=config.input_features, input_scale=config.input_scale,
                                       num_classes=teacher.num_classes)

    def forward(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None, *, x_clean: Optional[Tensor] = None) -> Tensor:
        return self.denoiser(x_noisy, sigma, cond)

    def features(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return self.denoiser.features(x_noisy, sigma, cond)


@component("mlp_generator", role="generator", paper="a one-step generator G(z) -> x (Yin et al. 2024, Sec. 3)")
class MLPGenerator(Generator):
    """An MLP generator ``x = G(z)`` for flat data, with ``z ~ N(0, I)`` of the data's dimension."""

    class Config(MLPConfig):
        pass

    def __init__(self, config: "MLPGenerator.Config", ctx: BuildContext) -> None:
        super().__init__()
        d = flat_dim(ctx.teacher, "generator 'mlp_generator'")
        self.latent_shape = (d,)
        self.features = FourierEmbedding(config.input_features, config.input_scale, in_dim=d, seed=2) if config.input_features else None
        self.labels = LabelEmbedding(ctx.teacher.num_classes)
        self.net = mlp(d + config.input_features + self.labels.dim, d, config.width, config.depth)

    def forward(self, z: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        parts = [z] + ([self.features(z)] if self.features is not None else []) + self.labels.parts(cond)
        return self.net(torch.cat(parts, dim=1) if len(parts) > 1 else z)

    def export(self, folder, provenance) -> None:
        """A diffusers ``OneStepMLPGenerator`` (:mod:`scoredistill.export_models`) with these exact weights."""
        from scoredistill.export import README, mlp_sampling_readme, save_diffusers_model
        from scoredistill.export_models import OneStepMLPGenerator

        if self.labels.table is not None:
            raise UserError("a class-conditional MLP generator cannot be exported yet (OneStepMLPGenerator takes no labels); "
                            "sample it with 'scoredistill sample', which writes the labels beside the samples")

        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        features = 0 if self.features is None else 2 * self.features.freqs.shape[1]
        model = OneStepMLPGenerator(dim=self.latent_shape[0], width=linears[0].out_features, depth=len(linears) - 1,
                                    input_features=features)
        model.load_state_dict(self.state_dict())
        save_diffusers_model(model, folder)
        (folder / README).write_text(mlp_sampling_readme(provenance, type(model).__name__))
