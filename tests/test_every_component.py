"""Every registered component, driven by the registry (as timm tests every registered model): it builds from its
default config and runs a forward and a backward on a small batch of its role, with finite results.

Components of the 2-D problem run on the toy2d preset's mixture teacher and MLPs; image components on a tiny
random-weight diffusers UNet teacher (and its UNet generator and fake score). A new component is covered as soon as a
plugin registers it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from scoredistill.config import resolve
from scoredistill.distill import attach_gan_head
from scoredistill.plugins import Hooks, make_plugin_manager
from scoredistill.roles import BuildContext, GeneratorBatch, Models

REGISTRY = Hooks(make_plugin_manager()).registry
CASES = [(role, name) for role, table in REGISTRY.components.items() for name in sorted(table)]
#: components that need images: built on the tiny image teacher
IMAGE_COMPONENTS = {"diffusers_unet", "digits_unet", "unet_generator", "unet_denoiser", "lpips_regression"}
N = 4


def settings(name: str, image_teacher: str) -> dict:
    """Where a default config cannot be built offline and in seconds, the smallest change that can (and why)."""
    return {
        "gaussian_mixture": dict(resolve(REGISTRY, "dmd", "toy2d").teacher.config),  # no default: the toy2d preset's mixture
        "diffusers_unet": {"path": image_teacher},  # no default: a folder
        "digits_unet": {"block_out_channels": [8, 16], "norm_num_groups": 4, "attention": False, "train_steps": 4,
                        "train_batch_size": 16, "sampler_steps": 3},  # trains its teacher: a tiny one, for 4 steps
        "lpips_regression": {"backbone": "random", "net": "alex", "resize": 64},  # ImageNet weights are a download; small
    }.get(name, {})


def make(role: str, name: str, ctx: BuildContext, image_teacher: str = ""):
    info = REGISTRY.component(role, name)
    return info.cls(info.config_model(**settings(name, image_teacher)), ctx)


def context(teacher, generator: str, fake_score: str) -> SimpleNamespace:
    ctx = BuildContext(hooks=Hooks(make_plugin_manager()), teacher=teacher, extra={"progress": False})
    g, f = make("generator", generator, ctx), make("fake_score", fake_score, ctx)
    ctx.fake_score = f
    return SimpleNamespace(ctx=ctx, models=Models(teacher=teacher, generator=g, fake_score=f))


@pytest.fixture(scope="module")
def image_teacher(tmp_path_factory) -> str:
    from scoredistill.images.testing import tiny_diffusers_teacher_folder

    return str(tiny_diffusers_teacher_folder(tmp_path_factory.mktemp("tiny-unet")))


@pytest.fixture
def toy():  # fresh networks for each test: a component may change them (a GAN head on the fake score)
    ctx = BuildContext(hooks=Hooks(make_plugin_manager()), extra={"progress": False})
    return context(make("teacher", "gaussian_mixture", ctx).eval().requires_grad_(False), "mlp_generator", "mlp_denoiser")


@pytest.fixture
def image(image_teacher):
    ctx = BuildContext(hooks=Hooks(make_plugin_manager()), extra={"progress": False})
    teacher = make("teacher", "diffusers_unet", ctx, image_teacher).eval().requires_grad_(False)
    return context(teacher, "unet_generator", "unet_denoiser")


def finite_gradients(module: torch.nn.Module) -> None:
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), "a parameter got no or a non-finite gradient"


def noised_batch(teacher, n: int = N):
    x = torch.randn((n, *teacher.data_shape))
    sigma = teacher.sigmas[torch.linspace(0, teacher.num_timesteps - 1, n).long()]
    return x, sigma, x + sigma.reshape(-1, *(1,) * (x.ndim - 1)) * torch.randn_like(x)


@pytest.mark.parametrize("role, name", CASES, ids=[f"{r}-{n}" for r, n in CASES])
def test_every_component_builds_and_runs_forward_and_backward(role, name, request):
    torch.manual_seed(0)
    problem = request.getfixturevalue("image" if name in IMAGE_COMPONENTS else "toy")
    ctx, models = problem.ctx, problem.models
    teacher, cond = models.teacher, models.teacher.sample_conditions(N)
    image_teacher = request.getfixturevalue("image_teacher") if name in IMAGE_COMPONENTS else ""
    made = make(role, name, ctx, image_teacher)

    if role == "teacher":
        x, sigma, x_noisy = noised_batch(made)
        x_noisy.requires_grad_(True)
        out = made(x_noisy, sigma, made.sample_conditions(N))
        out.square().sum().backward()  # frozen or not, the gradient reaches the input
        assert out.shape == x_noisy.shape and torch.isfinite(out).all() and torch.isfinite(x_noisy.grad).all()
    elif role == "generator":
        x = made(torch.randn((N, *made.latent_shape)), cond)
        x.square().mean().backward()
        assert x.shape == (N, *teacher.data_shape) and torch.isfinite(x).all()
        finite_gradients(made)
    elif role == "fake_score":
        x, sigma, x_noisy = noised_batch(teacher)
        x.requires_grad_(True)
        out = made(x_noisy, sigma, cond, x_clean=x)
        out.square().mean().backward()
        assert out.shape == x.shape and torch.isfinite(out).all()
        if any(p.requires_grad for p in made.parameters()):
            finite_gradients(made)
        else:  # nothing to train (an ablation's stand-in): the gradient goes to its inputs
            assert torch.isfinite(x.grad).all()
    elif role == "generator_loss":
        if made.differentiates_fake_score:  # it scores G's samples through a head on the fake score
            attach_gan_head(models.fake_score, teacher, 8, 1.0)
        g = models.generator
        g.zero_grad(set_to_none=True)
        z = torch.randn((N, *g.latent_shape))
        batch = GeneratorBatch(z=z, x=g(z, cond), cond=cond)
        if made.needs_pairs:
            batch.z_ref, batch.y_ref = torch.randn((N, *g.latent_shape)), torch.randn((N, *teacher.data_shape))
            batch.x_ref, batch.cond_ref = g(batch.z_ref, cond), cond
        loss = made(batch, models)
        loss.backward()
        assert loss.dim() == 0 and torch.isfinite(loss)
        finite_gradients(g)
    elif role == "fake_score_loss":
        f = models.fake_score
        f.zero_grad(set_to_none=True)
        with torch.no_grad():
            x = models.generator(torch.randn((N, *models.generator.latent_shape)), cond)
        loss = made(x, cond, models)
        loss.backward()
        assert loss.dim() == 0 and torch.isfinite(loss)
        finite_gradients(f)
    elif role == "pair_source":
        z, y, c = made.sample(N)
        assert z.shape == (N, *models.generator.latent_shape) and y.shape == (N, *teacher.data_shape)
        assert torch.isfinite(z).all() and torch.isfinite(y).all()  # data, not a network: nothing to differentiate
    else:  # pragma: no cover
        pytest.fail(f"role {role} has no case here: add one")
