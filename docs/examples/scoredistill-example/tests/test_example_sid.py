"""Tests of the example plugin: registration, config, and the maths of its loss.

Run with ``python -m pytest tests`` from the package folder, once the package is
installed (``pip install -e .``).
"""

from __future__ import annotations

import torch

from scoredistill.config import resolve
from scoredistill.plugins import Hooks, make_plugin_manager
from scoredistill.roles import GeneratorBatch, Models
from scoredistill.testing import mixture

from scoredistill_example.losses import ScoreIdentityFisher


def hooks() -> Hooks:
    # Names the plugin module explicitly, so the test also works without the entry point.
    return Hooks(make_plugin_manager(plugins=["scoredistill_example.plugin"]))


def gmm(means, std=0.3):
    """An exact Gaussian-mixture teacher with equal weights (its denoiser is known in closed form)."""
    k = len(means)
    return mixture(means, [std] * k, [1.0 / k] * k)


# --8<-- [start:registration]
def test_component_and_method_are_registered():
    reg = hooks().registry
    assert reg.component("generator_loss", "example_sid_fisher").cls is ScoreIdentityFisher
    method = reg.method("example_sid")
    assert method.config["losses"]["fisher"]["component"] == "example_sid_fisher"
    assert "regression" in method.ablations


def test_resolves_on_toy2d_with_the_presets_regression():
    config = resolve(hooks().registry, "example_sid", "toy2d", ablations=[], overrides=["losses.fisher.alpha=1.0"])
    assert config.losses["fisher"].config.alpha == 1.0
    assert config.losses["regression"].component == "l2_regression"  # the preset's retuning of DMD's term
    assert config.fake_score_loss.component == "fake_score_denoise"
# --8<-- [end:registration]


# --8<-- [start:maths]
def test_no_gradient_when_the_generator_matches_the_teacher():
    """If D_fake equals D_real everywhere, r - f = 0 and the generator must not move."""
    teacher = gmm([[2.0, 0.0], [-2.0, 0.0]])

    class FakeIsTeacher(torch.nn.Module):
        def forward(self, x_noisy, sigma, cond=None, *, x_clean):
            return teacher(x_noisy, sigma, cond)

    x = torch.randn(64, 2, requires_grad=True)
    loss = ScoreIdentityFisher(ScoreIdentityFisher.Config())(GeneratorBatch(z=x, x=x), Models(teacher, None, FakeIsTeacher()))
    loss.backward()
    assert abs(loss.item()) < 1e-10
    assert x.grad.abs().max() < 1e-8


def test_score_identity_estimate_equals_the_direct_one():
    """E (r - f)^T (r - x) = E |r - f|^2 when f is the exact denoiser of the generator's distribution."""
    torch.manual_seed(0)
    real, generated = gmm([[2.0, 0.0], [-2.0, 0.0]]), gmm([[0.0, 1.5], [0.0, -1.5]])
    x = generated.sample(200_000).double()
    sigma = torch.full((len(x),), 1.0, dtype=torch.float64)
    x_noisy = x + torch.randn_like(x)
    r, f = real(x_noisy, sigma), generated(x_noisy, sigma)  # generated's own exact denoiser plays D_fake
    direct = ((r - f) ** 2).sum(1).mean()
    identity = ((r - f) * (r - x)).sum(1).mean()
    assert torch.isclose(identity, direct, rtol=0.03)


def test_fake_score_parameters_get_no_gradient():
    teacher = gmm([[2.0, 0.0], [-2.0, 0.0]])

    class TinyFake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x_noisy, sigma, cond=None, *, x_clean):
            return self.lin(x_noisy)

    fake = TinyFake()
    x = torch.randn(32, 2, requires_grad=True)
    ScoreIdentityFisher(ScoreIdentityFisher.Config())(GeneratorBatch(z=x, x=x), Models(teacher, None, fake)).backward()
    assert x.grad is not None and fake.lin.weight.grad is None
    assert fake.lin.weight.requires_grad  # restored after the loss
# --8<-- [end:maths]
