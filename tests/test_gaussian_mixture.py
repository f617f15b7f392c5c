"""The analytic teacher against Monte Carlo, Bayes' rule and Tweedie's formula."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher
from scoredistill.roles import score_from_denoiser

from scoredistill.testing import mixture

MEANS = [[-2.0, 0.5], [1.5, 1.0], [0.0, -2.5]]
STDS = [0.4, 0.8, 0.3]
WEIGHTS = [0.5, 0.3, 0.2]


@pytest.mark.parametrize("sigma", [0.05, 0.7, 3.0])
def test_denoiser_matches_monte_carlo_posterior_mean(sigma):
    """E[x | x_s] by self-normalised importance sampling from the clean mixture."""
    teacher = mixture(MEANS, STDS, WEIGHTS)
    g = torch.Generator().manual_seed(0)
    x = teacher.sample(400_000, generator=g).double()
    queries = torch.tensor([[0.0, 0.0], [-1.8, 0.7], [1.0, -1.0]], dtype=torch.float64)
    for q in queries:
        logw = -((x - q) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * x).sum(0)
        ess = 1.0 / (w**2).sum()
        got = teacher(q[None].float(), torch.tensor([sigma]))[0].double()
        tol = 6 * math.sqrt(float((w[:, None] * (x - mc) ** 2).sum(0).max()) / ess) + 1e-3
        assert torch.allclose(got, mc, atol=tol), (q, got, mc, tol)


def test_denoiser_is_tweedie_of_noised_density():
    """(D(x_s) - x_s) / s^2 equals grad_x log p_s(x_s) computed by autograd."""
    teacher = mixture(MEANS, STDS, WEIGHTS)
    x = torch.randn(64, 2, dtype=torch.float64) * 3
    for sigma in (0.01, 0.5, 10.0):
        s = torch.full((64,), sigma, dtype=torch.float64)
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(teacher.log_prob(xr, sigma).sum(), xr)
        score = score_from_denoiser(teacher(x, s), x, s)
        assert torch.allclose(score, grad, rtol=1e-6, atol=1e-8)


def test_single_gaussian_closed_form():
    teacher = mixture([[1.0, -2.0]], [0.5], [1.0])
    x = torch.randn(10, 2)
    s = torch.full((10,), 2.0)
    expected = torch.tensor([1.0, -2.0]) + 0.25 / (0.25 + 4.0) * (x - torch.tensor([1.0, -2.0]))
    assert torch.allclose(teacher(x, s), expected, atol=1e-6)


def test_samples_follow_weights_and_stds():
    teacher = mixture(MEANS, STDS, WEIGHTS)
    x = teacher.sample(200_000, generator=torch.Generator().manual_seed(1))
    k = teacher.responsibilities(x).argmax(1)
    share = torch.bincount(k, minlength=3).double() / len(x)
    assert torch.allclose(share, torch.tensor(WEIGHTS, dtype=torch.float64), atol=0.01)


def test_schedule_is_ascending_and_spans_the_range():
    teacher = mixture(MEANS, STDS, WEIGHTS, sigma_min=0.01, sigma_max=50.0, num_timesteps=100)
    s = teacher.sigmas
    assert len(s) == 100 and torch.all(s[1:] > s[:-1])
    assert s[0].item() == pytest.approx(0.01) and s[-1].item() == pytest.approx(50.0)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(means=[[0, 0], [1, 1]], stds=[1, 1], weights=[0.5, 0.4]), "sum to 1"),
        (dict(means=[[0, 0], [1, 1]], stds=[1], weights=[0.5, 0.5]), "same length"),
        (dict(means=[[0, 0], [1]], stds=[1, 1], weights=[0.5, 0.5]), "same, non-zero dimension"),
        (dict(means=[[0, 0]], stds=[-1], weights=[1.0]), "stds must be > 0"),
    ],
)
def test_invalid_mixtures_are_refused(kw, message):
    with pytest.raises(ValidationError, match=message):
        GaussianMixtureTeacher.Config(**kw)
