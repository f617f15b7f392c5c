"""Fake scores that several methods share: ``sample_itself``, the "no fake score" of DMD's ablation and of SDS."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from scoredistill.registry import component
from scoredistill.roles import BuildContext, FakeScore


@component("sample_itself", role="fake_score", paper="Yin et al. 2024 (DMD), Sec. 4 ablation; Poole et al. 2022 (SDS)")
class SampleItself(FakeScore):
    """The 'no fake score' ablation: the fake prediction is the clean sample x itself.

    DMD's gradient ``(f - r) * w`` then becomes ``(x - D_real(x_s)) * w``, which is
    SDS's ``w(t) (eps_hat - eps)`` (since ``eps_hat - eps = (x - D_real) / s``).
    Nothing is trained.
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, config: "SampleItself.Config", ctx: Optional[BuildContext] = None) -> None:
        super().__init__()

    def forward(self, x_noisy: Tensor, sigma: Tensor, cond: Optional[Tensor] = None, *, x_clean: Tensor) -> Tensor:
        return x_clean
