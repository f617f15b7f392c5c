"""The consistency losses on an image teacher (a tiny diffusers UNet with attention, digits as real data):
CD with LPIPS (random backbone: offline) and sCM (jvp and finite differences) give finite losses and gradients."""

from __future__ import annotations

import pytest
import torch

from scoredistill.roles import BuildContext, GeneratorBatch, Models


@pytest.fixture(scope="module")
def image_models(tmp_path_factory):
    from scoredistill.images.testing import tiny_diffusers_teacher_folder
    from scoredistill.plugins import Hooks, make_plugin_manager

    hooks = Hooks(make_plugin_manager())
    folder = tiny_diffusers_teacher_folder(tmp_path_factory.mktemp("edm"))
    reg = hooks.registry
    tcls = reg.component("teacher", "diffusers_unet").cls
    teacher = tcls(tcls.Config(path=str(folder), data="digits"), None).eval().requires_grad_(False)
    ctx = BuildContext(hooks=hooks, teacher=teacher)
    return hooks, ctx


def _generator(ctx, **settings):
    cls = ctx.hooks.registry.component("generator", "fewstep_generator").cls
    ctx.generator = cls(cls.Config(**settings), ctx)
    return ctx.generator


def _loss_and_grads(ctx, name: str, **settings):
    cls = ctx.hooks.registry.component("generator_loss", name).cls
    loss = cls(cls.Config(**settings), ctx)
    models = Models(teacher=ctx.teacher, generator=ctx.generator, fake_score=None)
    z = torch.randn(4, 1, 8, 8)
    value = loss(GeneratorBatch(z=z, x=z), models)
    value.backward()
    grads = [p.grad for p in ctx.generator.parameters() if p.requires_grad]
    return value, grads


@pytest.mark.slow
def test_cd_with_lpips_on_images(image_models):
    _, ctx = image_models
    g = _generator(ctx, parameterization="consistency", steps=2)
    value, grads = _loss_and_grads(ctx, "consistency_distillation", distance="lpips", lpips_backbone="random")
    assert torch.isfinite(value) and value > 0
    cls = ctx.hooks.registry.component("generator_loss", "consistency_distillation").cls
    state = cls(cls.Config(distance="lpips", lpips_backbone="random"), ctx).state_dict()
    assert state and all(k.startswith("target.") for k in state)  # checkpoints keep the target network, not LPIPS
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
    assert g.sample(torch.randn(3, 1, 8, 8)).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("tangent", ["jvp", "finite_difference"])
def test_scm_on_images(image_models, tangent):
    _, ctx = image_models
    _generator(ctx, loss_weighting=True)
    value, grads = _loss_and_grads(ctx, "scm", tangent=tangent)
    assert torch.isfinite(value)
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
