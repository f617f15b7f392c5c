"""The SiD plugin: SiD's loss against the paper's equation written out here and against a closed-form
gradient on Gaussians; SiDA's two GAN losses written out and by finite differences; bad inputs; CLI runs.

Closed forms: for ``p = N(m, s0^2 I)`` the exact denoiser is ``D(x_s) = m + c (x_s - m)``, with
``c = s0^2 / (s0^2 + s^2)``; it is linear in ``x_s``, so ``dD/dx = c I`` when ``x_s = x + s eps``.
"""

from __future__ import annotations


import pytest
import torch

from scoredistill import trainer
from scoredistill.cli import main
from scoredistill.config import resolve
from scoredistill.errors import UserError
from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher
from scoredistill.images.testing import run_on_tiny_digits
from scoredistill.testing import ExactFakeScore, central_differences, gaussian, run_toy2d
from scoredistill.roles import GeneratorBatch, Models
from scoredistill_sid.sid import ScoreIdentity
from scoredistill_sid.sida import HEAD_NAME, SiDAAdversarial, SiDAFakeScore

TINY = ["train.steps=8", "train.batch_size=64", "train.fake_score_warmup_steps=2", "eval.num_samples=300",
        "train.log_every=4", "fake_score.width=32", "generator.width=32"]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the isolated cache and one thread: the repository's conftest.py


def seeded(term, x, models, seed=3):
    torch.manual_seed(seed)
    return term(GeneratorBatch(z=x, x=x), models)


def draws(teacher, n, d, lo, hi, seed=3):
    """The noise levels and noise a term draws after ``torch.manual_seed(seed)``: ``t`` uniform on
    ``{lo T, ..., hi T}``, then ``eps`` (the same calls, in the same order)."""
    torch.manual_seed(seed)
    T = teacher.num_timesteps
    t = torch.randint(int(lo * T), min(int(hi * T), T - 1) + 1, (n,))
    return teacher.sigmas[t], torch.randn(n, d, dtype=torch.float64)


# --------------------------------------------------------------------------- SiD


@pytest.mark.parametrize("alpha", [1.2, 0.0, 1.0])
def test_sid_loss_is_the_papers_equation_written_out(alpha):
    """L = mean_i sum_j (r - f)_ij ((r - x)_ij - alpha (r - f)_ij) / mean_j |x - r|_ij, elementwise loops."""
    teacher, fake = gaussian([1.0, -0.5, 0.3], 0.7), ExactFakeScore(gaussian([0.2, 0.4, -1.0], 1.3))
    x = torch.randn(6, 3, dtype=torch.float64) * 2
    loss = seeded(ScoreIdentity(ScoreIdentity.Config(alpha=alpha)), x, Models(teacher, None, fake))
    sigma, eps = draws(teacher, 6, 3, 0.0, 0.8)
    x_s = x + sigma[:, None].double() * eps
    r, f = teacher(x_s, sigma), fake(x_s, sigma, x_clean=x)
    total = 0.0
    for i in range(6):
        num = sum(float((r[i, j] - f[i, j]) * ((r[i, j] - x[i, j]) - alpha * (r[i, j] - f[i, j]))) for j in range(3))
        den = sum(abs(float(x[i, j] - r[i, j])) for j in range(3)) / 3
        total += num / den
    assert loss.item() == pytest.approx(total / 6, rel=1e-6)  # the weight is computed in float32, as the released code does


def test_sid_gradient_flows_through_both_denoisers_closed_form_on_gaussians():
    """Unnormalised, per sample L = u^T v with u = r - f, v = (r - x) - alpha u; both denoisers are linear in x_s
    (slopes c_r, c_f), so dL/dx = (c_r - c_f) v + (c_r - 1 - alpha (c_r - c_f)) u. Holding r and f fixed would
    give -u instead: the test fails unless the gradient goes through both inputs."""
    s_r, s_f, alpha = 0.6, 1.4, 1.2
    teacher, fake = gaussian([1.0, -2.0], s_r), ExactFakeScore(gaussian([-0.5, 0.5], s_f))
    x = (torch.randn(5, 2, dtype=torch.float64) * 2).requires_grad_(True)
    term = ScoreIdentity(ScoreIdentity.Config(alpha=alpha, normalize=False))
    (grad,) = torch.autograd.grad(seeded(term, x, Models(teacher, None, fake)), x)
    sigma, eps = draws(teacher, 5, 2, 0.0, 0.8)
    s2 = sigma[:, None].double() ** 2
    c_r, c_f = s_r**2 / (s_r**2 + s2), s_f**2 / (s_f**2 + s2)
    x_s = x.detach() + sigma[:, None].double() * eps
    r = torch.tensor([1.0, -2.0], dtype=torch.float64) + c_r * (x_s - torch.tensor([1.0, -2.0], dtype=torch.float64))
    f = torch.tensor([-0.5, 0.5], dtype=torch.float64) + c_f * (x_s - torch.tensor([-0.5, 0.5], dtype=torch.float64))
    u = r - f
    v = (r - x.detach()) - alpha * u
    expected = ((c_r - c_f) * v + (c_r - 1 - alpha * (c_r - c_f)) * u) / 5  # the batch mean
    assert torch.allclose(grad, expected, rtol=1e-9, atol=1e-12)


def test_score_identity_estimate_equals_the_direct_fisher_estimate_on_gaussians():
    """With D_fake the generator's exact denoiser, E (r - f)^T (r - x) = E |r - f|^2 (the score identity):
    alpha = 1 then gives a loss whose expectation is 0."""
    teacher, gen = gaussian([2.0, 0.0], 0.5), ExactFakeScore(gaussian([-1.0, 1.0], 1.0))
    x = gen.distribution.sample(400_000).double()
    one = ScoreIdentity(ScoreIdentity.Config(alpha=1.0, normalize=False, min_timestep_ratio=0.5, max_timestep_ratio=0.5))
    zero = ScoreIdentity(ScoreIdentity.Config(alpha=0.0, normalize=False, min_timestep_ratio=0.5, max_timestep_ratio=0.5))
    direct = seeded(zero, x, Models(teacher, None, gen)) - seeded(one, x, Models(teacher, None, gen))  # E |r - f|^2
    assert seeded(one, x, Models(teacher, None, gen)).abs() < 0.01 * direct


def test_generator_step_leaves_the_fake_score_untouched(hooks, tmp_path):
    config = resolve(hooks.registry, "sid", "toy2d", [], TINY + ["runtime.progress=false"])
    run = trainer.build(config, hooks, tmp_path)
    trainer.setup(run)
    before = {k: v.clone() for k, v in run.models.fake_score.state_dict().items()}
    g_before = [p.clone() for p in run.models.generator.parameters()]
    trainer.generator_step(run)
    assert all(torch.equal(before[k], v) for k, v in run.models.fake_score.state_dict().items())
    assert all(p.grad is None for p in run.models.fake_score.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(g_before, run.models.generator.parameters()))


# --------------------------------------------------------------------------- SiDA


def sida_run(hooks, tmp_path, extra=()):
    config = resolve(hooks.registry, "sida", "toy2d", [], TINY + ["runtime.progress=false", *extra])
    return trainer.build(config, hooks, tmp_path)


def test_sida_adversarial_is_its_equation_and_its_gradient_matches_finite_differences(hooks, tmp_path):
    models = sida_run(hooks, tmp_path).models
    models.fake_score.double()
    term = SiDAAdversarial(SiDAAdversarial.Config())
    x0 = torch.randn(4, 2, dtype=torch.float64) * 3
    # the equation: numel * mean softplus(-clamp(D(x_s))) * mean 1 / mean|x - r|
    sigma, eps = draws(models.teacher, 4, 2, 0.0, 0.8)
    x_s = x0 + sigma[:, None].double() * eps
    with torch.no_grad():
        d = getattr(models.fake_score, HEAD_NAME)(models.fake_score.features(x_s, sigma)).clamp(-10, 10)
        w = 1 / (x0 - models.teacher(x_s, sigma)).abs().mean(1)
    expected = 2 * torch.log1p(torch.exp(-d)).mean() * w.mean()
    assert seeded(term, x0, models).item() == pytest.approx(expected.item(), rel=1e-6)  # the weight in float32

    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(seeded(term, x, models), x)
    assert grad.abs().sum() > 0
    # the weight 1 / mean|x - r| carries no gradient: finite differences see it, so compare with it frozen
    frozen = SiDAAdversarial(SiDAAdversarial.Config(normalize=False))
    x = x0.clone().requires_grad_(True)
    (g_plain,) = torch.autograd.grad(seeded(frozen, x, models), x)
    assert torch.allclose(grad, g_plain * w.mean(), rtol=1e-6)
    h_fd = central_differences(lambda v: seeded(frozen, v, models), x0)
    assert torch.allclose(g_plain, h_fd, rtol=1e-5, atol=1e-8)


class FixedTeacher(GaussianMixtureTeacher):
    """A Gaussian teacher whose training noise levels and real samples are fixed (no random draws)."""

    def __init__(self, sigma, real) -> None:
        super().__init__(GaussianMixtureTeacher.Config(means=[[0.0, 0.0]], stds=[1.0], weights=[1.0]))
        self.fixed_sigma, self.fixed_real = sigma, real

    def training_sigmas(self, n):
        return self.fixed_sigma

    def real_samples(self, n):
        return self.fixed_real


def test_sida_fake_score_loss_is_its_equation_written_out(hooks):
    from scoredistill.toy2d.networks import MLPFakeScore
    from scoredistill.testing import build_context

    n = 5
    sigma, real = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0]), torch.randn(n, 2) * 2
    teacher = FixedTeacher(sigma, real)
    ctx = build_context(teacher)
    fake = MLPFakeScore(MLPFakeScore.Config(width=16, depth=2), ctx)
    ctx.fake_score = fake
    loss_fn = SiDAFakeScore(SiDAFakeScore.Config(discriminator_weight=0.7), ctx)
    x = torch.randn(n, 2) * 3
    torch.manual_seed(11)
    loss = loss_fn(x, None, Models(teacher, None, fake))
    torch.manual_seed(11)
    eps = torch.randn(n, 2)
    lam = 1 / sigma**2 + 1 / teacher.sigma_data**2  # EDM's lambda(s)
    x_s, y_s = x + sigma[:, None] * eps, real + sigma[:, None] * eps
    with torch.no_grad():
        denoise = (lam * ((fake(x_s, sigma) - x) ** 2).sum(1)).mean()
        head = getattr(fake, HEAD_NAME)
        d_fake, d_real = head(fake.features(x_s, sigma)), head(fake.features(y_s, sigma))
        bce = (torch.nn.functional.binary_cross_entropy_with_logits(d_fake, torch.zeros(n))
               + torch.nn.functional.binary_cross_entropy_with_logits(d_real, torch.ones(n))) / 2
    assert loss.item() == pytest.approx((denoise + 0.7 * lam.mean() * bce).item(), rel=1e-5)


# --------------------------------------------------------------------------- bad inputs and the CLI


def test_sida_refuses_a_conditional_teacher_and_a_teacher_without_real_data(hooks, tmp_path):
    with pytest.raises(UserError, match="class-conditional"):
        sida_run(hooks, tmp_path, ["teacher.class_conditional=true"])

    class NoData(GaussianMixtureTeacher):
        def real_samples(self, n):
            return super(GaussianMixtureTeacher, self).real_samples(n)  # the Teacher default: no real data

    from scoredistill.toy2d.networks import MLPFakeScore
    from scoredistill.testing import build_context

    teacher = NoData(GaussianMixtureTeacher.Config(means=[[0.0, 0.0]], stds=[1.0], weights=[1.0]))
    ctx = build_context(teacher)
    ctx.fake_score = MLPFakeScore(MLPFakeScore.Config(width=8, depth=1), ctx)
    with pytest.raises(UserError, match="no real data"):
        SiDAFakeScore(SiDAFakeScore.Config(), ctx)


def test_sida_adversarial_without_its_discriminator_is_refused_before_training(capsys, tmp_path):
    args = ["run", "sida", "--preset", "toy2d", "--out", str(tmp_path / "r"), "--quiet",
            "--set", "fake_score_loss.component=fake_score_denoise"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sida_fake_score" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("method", ["sid", "sida"])
def test_method_runs_end_to_end_on_toy2d_from_the_cli(method, tmp_path):
    run_toy2d(method, tmp_path / method, TINY)


# --------------------------------------------------------------------------- image teachers


@pytest.mark.parametrize("method, extra", [("sid", []), ("sida", [])])
def test_runs_on_a_tiny_digits_unet_teacher(digits_teacher, tmp_path, monkeypatch, method, extra):
    """The same components on an image teacher: UNet denoisers, their features, real digits."""
    run_on_tiny_digits(method, digits_teacher, tmp_path / method, monkeypatch, extra)
