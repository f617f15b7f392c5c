"""The f-distill plugin: each h(r) against f''(r) r^2 computed by autograd from f written out here;
the gradient on Gaussians against the closed form with the exact density ratio; the two-stage
normalisation; reverse KL = DMD's gradient; bad inputs; CLI runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scoredistill.cli import main
from scoredistill.config import resolve
from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher
from scoredistill.images.testing import run_on_tiny_digits
from scoredistill.testing import run_toy2d, gaussian
from scoredistill.roles import FakeScore, GeneratorBatch, Models
from scoredistill_fdistill.divergences import WEIGHTINGS, weighting
from scoredistill_fdistill.losses import FDivergenceGradient

TINY = ["train.steps=6", "train.batch_size=64", "train.fake_score_warmup_steps=2", "eval.num_samples=300",
        "train.log_every=3", "fake_score.width=32", "generator.width=32"]

#: f(r) of each divergence, written independently of the plugin (f-distill's table)
F_OF_R = {
    "reverse_kl": lambda r: -torch.log(r),
    "softened_reverse_kl": lambda r: (r + 1) * torch.log((r + 1) / (2 * r)),
    "jensen_shannon": lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2),
    "squared_hellinger": lambda r: (torch.sqrt(r) - 1) ** 2,
    "forward_kl": lambda r: r * torch.log(r),
    "jeffreys": lambda r: (r - 1) * torch.log(r),
}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the isolated cache and one thread: the repository's conftest.py


@pytest.mark.parametrize("divergence", sorted(F_OF_R))
def test_weighting_is_f_second_derivative_times_r_squared(divergence):
    assert set(WEIGHTINGS) == set(F_OF_R)
    r = torch.tensor([0.05, 0.3, 1.0, 2.5, 9.0], dtype=torch.float64, requires_grad=True)
    f = F_OF_R[divergence]
    assert f(torch.ones(1, dtype=torch.float64)).abs().item() < 1e-12  # f(1) = 0: a divergence
    (d1,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    assert torch.allclose(weighting(divergence, r.detach().log()), d2 * r.detach() ** 2, rtol=1e-10)


class RatioHead(nn.Module):
    """A head that returns its single feature: the features below are already the log density ratio."""

    def forward(self, features):
        return features[:, 0]


class GaussianGenerator(FakeScore):
    """The exact denoiser of a Gaussian generator q = N(a, s1^2 I), and as 'features' the exact ln p_s / q_s."""

    def __init__(self, p: GaussianMixtureTeacher, q: GaussianMixtureTeacher) -> None:
        super().__init__()
        self.p, self.q = p, q
        self.gan_head = RatioHead()

    def forward(self, x_noisy, sigma, cond=None, *, x_clean):
        return self.q(x_noisy, sigma)

    def features(self, x_noisy, sigma, cond=None):
        return (self.p.log_prob(x_noisy, sigma) - self.q.log_prob(x_noisy, sigma))[:, None].to(x_noisy.dtype)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jensen_shannon", "forward_kl", "squared_hellinger"])
def test_gradient_is_the_normalised_h_times_dmds_direction_closed_form_on_gaussians(divergence):
    """With the exact ratio r = p_s / q_s (closed-form Gaussians), the per-sample direction on x is
    h(r) / mean h(r) * (D_fake - D_real) / mean|x - D_real|, D the Gaussians' linear denoisers."""
    p, q = gaussian([1.0, -1.0], 0.6), gaussian([-0.5, 0.5], 1.2)
    fake = GaussianGenerator(p, q)
    term = FDivergenceGradient(FDivergenceGradient.Config(divergence=divergence, max_log_ratio=50.0))
    x = (torch.randn(6, 2, dtype=torch.float64) * 2).requires_grad_(True)
    torch.manual_seed(4)
    (grad,) = torch.autograd.grad(term(GeneratorBatch(z=x, x=x), Models(p, None, fake)), x)
    torch.manual_seed(4)
    T = p.num_timesteps
    sigma = p.sigmas[torch.randint(int(0.02 * T), int(0.98 * T) + 1, (6,))].double()[:, None]
    x_s = x.detach() + sigma * torch.randn(6, 2, dtype=torch.float64)
    var_p, var_q = 0.36 + sigma**2, 1.44 + sigma**2
    mp, mq = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([-0.5, 0.5], dtype=torch.float64)
    d_real = mp + 0.36 / var_p * (x_s - mp)
    d_fake = mq + 1.44 / var_q * (x_s - mq)
    log_p = -((x_s - mp) ** 2).sum(1, keepdim=True) / (2 * var_p) - torch.log(2 * math.pi * var_p)
    log_q = -((x_s - mq) ** 2).sum(1, keepdim=True) / (2 * var_q) - torch.log(2 * math.pi * var_q)
    r = torch.exp(log_p - log_q)
    h = {"reverse_kl": torch.ones_like(r), "jensen_shannon": r / (1 + r), "forward_kl": r, "squared_hellinger": r.sqrt() / 2}[divergence]
    direction = h / h.mean() * (d_fake - d_real) / (x.detach() - d_real).abs().mean(1, keepdim=True)
    assert torch.allclose(grad * x.numel(), direction, rtol=1e-6, atol=1e-9)


def test_the_logit_is_clipped_before_the_weighting():
    p, q = gaussian([3.0, 0.0], 0.3), gaussian([-3.0, 0.0], 0.3)
    fake = GaussianGenerator(p, q)
    x = torch.randn(8, 2, dtype=torch.float64)
    for clip in (0.5, 2.0):
        term = FDivergenceGradient(FDivergenceGradient.Config(divergence="forward_kl", max_log_ratio=clip))
        x_ = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        (grad,) = torch.autograd.grad(term(GeneratorBatch(z=x_, x=x_), Models(p, None, fake)), x_)
        torch.manual_seed(1)
        T = p.num_timesteps
        sigma = p.sigmas[torch.randint(int(0.02 * T), int(0.98 * T) + 1, (8,))].double()
        x_s = x + sigma[:, None] * torch.randn(8, 2, dtype=torch.float64)
        h = (p.log_prob(x_s, sigma) - q.log_prob(x_s, sigma)).clamp(-clip, clip).exp()
        base = (q(x_s, sigma) - p(x_s, sigma)) / (x - p(x_s, sigma)).abs().mean(1, keepdim=True)
        assert torch.allclose(grad * x.numel(), (h / h.mean())[:, None] * base, rtol=1e-6, atol=1e-9)


def test_fdistill_resolves_to_dmd2_with_the_weighted_gradient(hooks):
    config = resolve(hooks.registry, "fdistill", "toy2d")
    dmd2 = resolve(hooks.registry, "dmd2", "toy2d")
    assert config.fake_score_loss == dmd2.fake_score_loss and config.losses["gan"] == dmd2.losses["gan"]
    assert config.train == dmd2.train
    assert resolve(hooks.registry, "fdistill", "toy2d", ["weighting"]).losses["distribution_matching"].config.divergence == "reverse_kl"


# --------------------------------------------------------------------------- bad inputs and the CLI


def test_unknown_divergence_and_missing_discriminator_are_one_line_errors(capsys, tmp_path):
    base = ["run", "fdistill", "--preset", "toy2d", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "a"), "--set", "losses.distribution_matching.divergence=wasserstein"]) == 2
    assert main(base + ["--out", str(tmp_path / "b"), "--set", "fake_score_loss.component=fake_score_denoise"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert "divergence" in lines[0] and "jensen_shannon" in lines[0]
    assert "fake_score_denoise_gan" in lines[1]


def test_a_conditional_teacher_is_refused_before_training(hooks, tmp_path, capsys):
    args = ["run", "fdistill", "--preset", "toy2d", "--out", str(tmp_path / "c"), "--quiet", "--set", "teacher.class_conditional=true"]
    args += [a for kv in TINY for a in ("--set", kv)]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "class-conditional" in err[0], err
    assert not (tmp_path / "c" / "history.json").exists()  # nothing trained


def test_fdistill_runs_end_to_end_on_toy2d_from_the_cli(tmp_path):
    run_toy2d("fdistill", tmp_path / "run", TINY)


# --------------------------------------------------------------------------- image teachers


@pytest.mark.parametrize("method, extra", [("fdistill", [])])
def test_runs_on_a_tiny_digits_unet_teacher(digits_teacher, tmp_path, monkeypatch, method, extra):
    """The same components on an image teacher: UNet denoisers, their features, real digits."""
    run_on_tiny_digits(method, digits_teacher, tmp_path / method, monkeypatch, extra)
