"""LPIPS regression: runs through the lpips package; fails early and clearly without weights."""

from __future__ import annotations

import pytest
import torch

from scoredistill.errors import UserError
from scoredistill.roles import GeneratorBatch, Models
from scoredistill.testing import build_context, mixture
from scoredistill_dmd.lpips_regression import BACKBONE_FILES, LPIPSRegression


class _ImageTeacherStub:
    """Only the data shape is read when an LPIPS term is built."""

    data_shape = (1, 8, 8)


class _Identity(torch.nn.Module):
    def forward(self, z, cond=None):
        return z


def test_lpips_random_backbone_is_zero_on_equal_images_and_positive_otherwise():
    term = LPIPSRegression(LPIPSRegression.Config(net="alex", backbone="random", resize=64), build_context(_ImageTeacherStub()))
    z = torch.rand(4, 1, 8, 8) * 2 - 1
    ms = Models(teacher=None, generator=_Identity(), fake_score=None)
    same = term(GeneratorBatch(z=z, x=z, z_ref=z, y_ref=z.clone()), ms)
    other = term(GeneratorBatch(z=z, x=z, z_ref=z, y_ref=torch.flip(z, dims=[-1])), ms)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert other.item() > 0


def test_lpips_on_points_is_a_clear_error():
    with pytest.raises(UserError, match="l2_regression"):
        LPIPSRegression(LPIPSRegression.Config(backbone="random"), build_context(mixture([[0, 0]], [1.0], [1.0])))


def test_missing_imagenet_backbone_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    with pytest.raises(UserError) as info:
        LPIPSRegression(LPIPSRegression.Config(net="vgg"), build_context(_ImageTeacherStub()))
    message = str(info.value)
    assert BACKBONE_FILES["vgg"] in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "\n" not in message
