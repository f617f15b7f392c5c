"""DMD's gradient and fake-score loss against closed forms on Gaussians.

For ``p = N(m, s0^2 I)`` the exact denoiser is ``D(x_s) = m + s0^2/(s0^2+s^2) (x_s - m)``,
so for a real ``N(m_r, s0^2 I)`` and a fake ``N(m_g, s0^2 I)`` with the same
spread, ``D_fake - D_real = (m_g - m_r) s^2 / (s0^2 + s^2)`` whatever ``x_s``:
``sigma^2 (s_fake - s_real)``, the KL gradient of eq. 7 at that noise level.
"""

from __future__ import annotations

import pytest
import torch

from scoredistill.testing import ExactFakeScore, central_differences
from scoredistill.roles import GeneratorBatch, Models
from scoredistill.testing import mixture
from scoredistill.fake_scores import SampleItself
from scoredistill.distill import distribution_matching_loss, dmd_gradient, timestep_sigmas
from scoredistill_dmd.losses import FakeScoreDenoise, KLGradient, L2Regression, PseudoHuberRegression

S0 = 0.5
M_REAL = [1.0, -1.0]
M_FAKE = [0.2, 0.4]


def models(fake=None):
    real = mixture([M_REAL], [S0], [1.0], num_timesteps=100)
    fake = fake if fake is not None else ExactFakeScore(mixture([M_FAKE], [S0], [1.0]))
    return Models(teacher=real, generator=None, fake_score=fake)


def fixed_sigma_loss(t_ratio: float, normalize: bool) -> KLGradient:
    return KLGradient(KLGradient.Config(min_timestep_ratio=t_ratio, max_timestep_ratio=t_ratio, normalize=normalize))


@pytest.mark.parametrize("t_ratio", [0.1, 0.5, 0.9])
def test_kl_gradient_equals_closed_form_score_difference(t_ratio):
    ms = models()
    sigma = ms.teacher.sigmas[int(t_ratio * ms.teacher.num_timesteps)].item()
    x = torch.randn(32, 2).requires_grad_(True)
    loss = fixed_sigma_loss(t_ratio, normalize=False)(GeneratorBatch(z=x, x=x), ms)
    (grad,) = torch.autograd.grad(loss, x)
    expected = (torch.tensor(M_FAKE) - torch.tensor(M_REAL)) * sigma**2 / (S0**2 + sigma**2)
    # L = 0.5 mean((x - sg(x - g))^2)  =>  dL/dx = g / numel
    assert torch.allclose(grad * x.numel(), expected.expand_as(x), rtol=1e-4, atol=1e-6)


def test_kl_gradient_descends_towards_the_real_distribution():
    """A few plain gradient steps on samples of N(m_g) move their mean towards m_r."""
    torch.manual_seed(0)
    ms = models()
    x = (torch.tensor(M_FAKE) + S0 * torch.randn(4000, 2)).requires_grad_(True)
    loss = KLGradient(KLGradient.Config())(GeneratorBatch(z=x, x=x), ms)
    (grad,) = torch.autograd.grad(loss, x)
    step = -grad.mean(0)
    direction = torch.tensor(M_REAL) - torch.tensor(M_FAKE)
    cos = torch.dot(step, direction) / (step.norm() * direction.norm())
    assert cos > 0.99


def test_normalisation_is_per_sample_mean_abs_error():
    x = torch.randn(5, 3, 4, 4)
    real = torch.randn(5, 3, 4, 4)
    fake = torch.randn(5, 3, 4, 4)
    got = dmd_gradient(x, real, fake)
    for i in range(5):
        w = 1.0 / (x[i] - real[i]).abs().mean()
        assert torch.allclose(got[i], (fake[i] - real[i]) * w, rtol=1e-5)
    real[0] = x[0]  # zero error: w = inf, non-finite entries are zeroed
    assert torch.isfinite(dmd_gradient(x, real, fake)).all()


def test_surrogate_loss_gradient_by_finite_differences():
    x = torch.randn(3, 2, dtype=torch.float64)
    g = torch.randn(3, 2, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(distribution_matching_loss(xr, g), xr)
    # g is held fixed (stop-gradient), so L(x) = 0.5 mean((x - (x0 - g))^2) around x0 = x
    target = x - g
    fd = central_differences(lambda v: 0.5 * ((v - target) ** 2).mean(), x)
    assert torch.allclose(auto, fd, atol=1e-8)
    assert torch.allclose(auto, g / x.numel())


def test_timesteps_span_two_to_ninety_eight_percent_of_the_schedule():
    teacher = mixture([M_REAL], [S0], [1.0], num_timesteps=1000)
    torch.manual_seed(0)
    s = timestep_sigmas(teacher, 200_000, 0.02, 0.98)
    assert s.min().item() == pytest.approx(teacher.sigmas[20].item())
    assert s.max().item() == pytest.approx(teacher.sigmas[980].item())
    inside = (s >= teacher.sigmas[20]) & (s <= teacher.sigmas[980])
    assert inside.all()
    # uniform over the 961 timesteps
    t = torch.searchsorted(teacher.sigmas, s)
    counts = torch.bincount(t - 20, minlength=961).double()
    assert counts.std() / counts.mean() < 0.15


def test_sample_itself_turns_dmd_into_sds():
    """With f = x: E_eps[x - D_real(x + s eps)] = (x - m_r) s^2 / (s0^2 + s^2) (SDS's eps_hat - eps, times s)."""
    torch.manual_seed(0)
    ms = models(fake=SampleItself(SampleItself.Config()))
    sigma = ms.teacher.sigmas[50].item()
    x0 = torch.tensor([2.0, 0.5])
    x = x0.expand(20000, 2).clone().requires_grad_(True)
    loss = fixed_sigma_loss(0.5, normalize=False)(GeneratorBatch(z=x, x=x), ms)
    (grad,) = torch.autograd.grad(loss, x)
    expected = (x0 - torch.tensor(M_REAL)) * sigma**2 / (S0**2 + sigma**2)
    se = sigma * S0**2 / (S0**2 + sigma**2) / 20000**0.5
    assert torch.allclose((grad * x.numel()).mean(0), expected, atol=5 * se)


def test_fake_score_loss_at_the_exact_denoiser_is_the_posterior_variance():
    """E|D(x_s) - x|^2 per element = s0^2 s^2 / (s0^2 + s^2) for a Gaussian; weighted by lambda(s)."""
    torch.manual_seed(0)
    ms = models()
    sigma = 0.8
    ms.teacher.training_sigmas = lambda n: torch.full((n,), sigma)
    x = torch.tensor(M_FAKE) + S0 * torch.randn(200_000, 2)
    teacher_levels = FakeScoreDenoise.Config(noise_levels="teacher")
    loss = FakeScoreDenoise(teacher_levels)(x, None, ms)
    lam = ms.teacher.loss_weight(torch.tensor(sigma)).item()
    expected = lam * S0**2 * sigma**2 / (S0**2 + sigma**2)
    assert loss.item() == pytest.approx(expected, rel=0.01)
    # a wrong denoiser (the real one) scores worse: the loss can tell them apart
    ms.fake_score = ExactFakeScore(ms.teacher)
    assert FakeScoreDenoise(teacher_levels)(x, None, ms).item() > 1.2 * expected


def test_fake_score_loss_on_timesteps_averages_over_the_teachers_schedule():
    """``noise_levels: timesteps``: s uniform over the T discrete levels, so the loss at the exact
    denoiser is the schedule's mean of lambda(s) s0^2 s^2 / (s0^2 + s^2); ``training_sigmas`` is not used."""
    torch.manual_seed(0)
    ms = models()
    ms.teacher.training_sigmas = lambda n: torch.full((n,), 0.8)  # would give another value
    # unit weights: EDM's lambda(s) with sigma_data = s0 makes every level's term 1, which would hide the levels
    ms.teacher.loss_weight = lambda sigma: torch.ones_like(sigma)
    x = torch.tensor(M_FAKE) + S0 * torch.randn(400_000, 2)
    loss = FakeScoreDenoise(FakeScoreDenoise.Config(noise_levels="timesteps"))(x, None, ms)
    s = ms.teacher.sigmas.double()
    expected = (S0**2 * s**2 / (S0**2 + s**2)).mean().item()
    at_08 = S0**2 * 0.64 / (S0**2 + 0.64)
    assert abs(expected - at_08) > 0.05 * expected  # the two distributions are told apart
    assert loss.item() == pytest.approx(expected, rel=0.01)


def test_teacher_loss_weight_is_edm():
    teacher = mixture([M_REAL], [S0], [1.0])
    s = torch.tensor([0.1, 1.0, 10.0])
    sd = teacher.sigma_data
    assert torch.allclose(teacher.loss_weight(s), 1 / s**2 + 1 / sd**2)


class _Identity(torch.nn.Module):
    latent_shape = (2,)

    def forward(self, z, cond=None):
        return z


def test_regression_distances():
    z = torch.randn(8, 2)
    y = torch.randn(8, 2)
    ms = Models(teacher=None, generator=_Identity(), fake_score=None)
    batch = GeneratorBatch(z=z, x=z, z_ref=z, y_ref=y)
    l2 = L2Regression(L2Regression.Config())(batch, ms)
    assert l2.item() == pytest.approx(((z - y) ** 2).mean().item(), rel=1e-6)
    ph = PseudoHuberRegression(PseudoHuberRegression.Config(c=0.3))(batch, ms)
    expected = (((z - y) ** 2).sum(1) + 0.09).sqrt() - 0.3
    assert ph.item() == pytest.approx(expected.mean().item(), rel=1e-6)
    assert L2Regression.needs_pairs and PseudoHuberRegression.needs_pairs
