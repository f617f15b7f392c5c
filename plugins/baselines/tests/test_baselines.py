"""The baselines plugin: each new gradient against an independent computation, DMD2's TTUR
schedule through the real trainer, and a short end-to-end run of every method on toy2d.

Closed forms on Gaussians: for ``p = N(m, s0^2 I)`` the exact denoiser is
``D(x_s) = m + c (x_s - m)`` with ``c = s0^2 / (s0^2 + s^2)``, and the noised
``p_s = N(m, (s0^2 + s^2) I)``, so KLs between noised Gaussians are analytic.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from scoredistill import trainer
from scoredistill.cli import main
from scoredistill.config import resolve
from scoredistill.errors import UserError
from scoredistill.testing import ExactFakeScore, central_differences, gaussian
from scoredistill.roles import GeneratorBatch, Models, Teacher
from scoredistill.distill import GANHead, discriminator_logits
from scoredistill_baselines.gan import FakeScoreDenoiseGAN, GANGenerator
from scoredistill_baselines.losses import IKLGradient, SDSGradient, ikl_direction, sds_direction
from scoredistill_dmd.losses import KLGradient

TINY = ["train.steps=20", "train.batch_size=128", "train.fake_score_warmup_steps=5", "eval.num_samples=500", "pairs.num_pairs=200"]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the isolated cache and one thread: the repository's conftest.py


def surrogate_grad(term, x: torch.Tensor, models: Models) -> torch.Tensor:
    """The per-element direction a term puts on ``x``: ``numel * dL/dx`` (DMD's surrogate divides by numel)."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(term(GeneratorBatch(z=x, x=x), models), x)
    return g * x.numel()


# --------------------------------------------------------------------------- SDS


@pytest.mark.parametrize("weighting", ["dreamfusion", "uniform"])
def test_sds_direction_is_dreamfusion_eq3_computed_in_vp_form(weighting):
    """w(t) (eps_hat - eps) computed the DreamFusion way: z_t = alpha_t x + sigma_t eps, eps_hat from the teacher."""
    teacher = gaussian([1.0, -2.0], 0.5)
    x, eps = torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    s = torch.exp(torch.linspace(-3, 3, 64, dtype=torch.float64))  # sigma-form noise levels
    abar = 1 / (1 + s**2)
    alpha, sig_t = abar.sqrt()[:, None], (1 - abar).sqrt()[:, None]
    z_t = alpha * x + sig_t * eps
    d_real = teacher(z_t / alpha, s)  # the VP model evaluated through its sigma-form adapter
    eps_hat = (z_t - alpha * d_real) / sig_t
    w = (1 - abar)[:, None] if weighting == "dreamfusion" else torch.ones_like(alpha)
    expected = w * (eps_hat - eps)
    got = sds_direction(x, teacher(x + s[:, None] * eps, s), s, weighting)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("t_ratio", [0.3, 0.6])
def test_sds_gradient_matches_closed_form_on_a_gaussian(t_ratio):
    """At a fixed t: grad = w/s [(1 - c)(x - m) - c s eps], i.e. the closed-form mean plus exact N(0, (w c)^2) noise."""
    mean, s0 = torch.tensor([1.0, -2.0]), 0.5
    teacher = gaussian(mean.tolist(), s0, sigma_min=0.05, sigma_max=5.0, num_timesteps=50)
    s = teacher.sigmas[int(t_ratio * teacher.num_timesteps)].item()
    term = SDSGradient(SDSGradient.Config(min_timestep_ratio=t_ratio, max_timestep_ratio=t_ratio))
    x = 3 * torch.randn(40000, 2)
    grad = surrogate_grad(term, x, Models(teacher=teacher, generator=None, fake_score=None))
    w, c = s**2 / (1 + s**2), s0**2 / (s0**2 + s**2)
    noise = (grad - w / s * (1 - c) * (x - mean)) / (-w * c)  # must be the injected eps ~ N(0, I)
    assert noise.mean(0).abs().max() < 0.03
    assert (noise.var(0) - 1).abs().max() < 0.05


def test_sds_method_uses_no_fake_score_and_trains_none(hooks):
    config = resolve(hooks.registry, "sds", "toy2d")
    assert config.fake_score_loss is None
    assert config.losses["distribution_matching"].component == "sds_gradient"
    assert resolve(hooks.registry, "sds", "toy2d", ["weighting"]).losses["distribution_matching"].config.weighting == "uniform"


# --------------------------------------------------------------------------- Diff-Instruct (IKL)


def gaussian_kl(m_q, v_q, m_p, v_p, d):
    """KL(N(m_q, v_q I) || N(m_p, v_p I)) in d dimensions (float64)."""
    return 0.5 * (d * v_q / v_p + ((m_q - m_p) ** 2).sum() / v_p - d + d * math.log(v_p / v_q))


@pytest.mark.parametrize("weighting", ["sigma2", "uniform"])
def test_ikl_gradient_is_the_gradient_of_the_integral_kl(weighting):
    """E[grad] = d/dm of  mean_t w(s_t) KL(q_{s_t} || p_{s_t})  for a generator x = m + s_q z (finite differences)."""
    m_real, s0, s_q = torch.tensor([1.0, -1.0], dtype=torch.float64), 0.5, 0.8
    teacher = gaussian(m_real.tolist(), s0, sigma_min=0.2, sigma_max=2.0, num_timesteps=16)
    m = torch.tensor([0.2, 0.6], dtype=torch.float64)
    fake = ExactFakeScore(gaussian(m.tolist(), s_q))
    term = IKLGradient(IKLGradient.Config(weighting=weighting))
    x = (m + s_q * torch.randn(200000, 2, dtype=torch.float64))
    estimate = surrogate_grad(term, x, Models(teacher=teacher, generator=None, fake_score=fake)).mean(0)

    sig = teacher.sigmas.double()
    w = sig**2 if weighting == "sigma2" else torch.ones_like(sig)

    def ikl(mm):
        return sum(float(wt) * gaussian_kl(mm, s_q**2 + float(s) ** 2, m_real, s0**2 + float(s) ** 2, 2) for wt, s in zip(w, sig)) / len(sig)

    h = 1e-5
    fd = torch.tensor([(ikl(m + h * e) - ikl(m - h * e)) / (2 * h) for e in torch.eye(2, dtype=torch.float64)])
    assert torch.allclose(estimate, fd, rtol=0.02, atol=0.005), (estimate, fd)


def test_ikl_sigma2_equals_dmd_kl_gradient_unnormalised_over_the_full_range():
    """The documented relation: with uniform training timesteps, ikl_gradient(sigma2) = kl_gradient(normalize=false, [0, 1])."""
    teacher = gaussian([1.0, -1.0], 0.5, num_timesteps=100)
    models = Models(teacher=teacher, generator=None, fake_score=ExactFakeScore(gaussian([0.0, 0.5], 0.7)))
    x = torch.randn(256, 2)
    torch.manual_seed(1)
    ikl = surrogate_grad(IKLGradient(IKLGradient.Config()), x, models)
    torch.manual_seed(1)
    kl = surrogate_grad(KLGradient(KLGradient.Config(min_timestep_ratio=0, max_timestep_ratio=1, normalize=False)), x, models)
    assert torch.allclose(ikl, kl)


def test_ikl_direction_is_score_difference_times_weight():
    real, fake = torch.randn(8, 3), torch.randn(8, 3)
    sigma = torch.rand(8) + 0.1
    s2 = sigma[:, None] ** 2
    assert torch.allclose(ikl_direction(real, fake, sigma, "sigma2"), fake - real)
    assert torch.allclose(ikl_direction(real, fake, sigma, "uniform"), (fake - real) / s2)
    # VSD as threestudio writes it: w(t) = 1 - abar_t on eps_real - eps_fake, with eps_hat = (x_s - D) / s (VP form)
    abar = 1 / (1 + s2)
    eps_real, eps_fake = (1.0 - real) / sigma[:, None], (1.0 - fake) / sigma[:, None]  # at the same x_s = 1
    assert torch.allclose(ikl_direction(real, fake, sigma, "vsd"), (1 - abar) * (eps_real - eps_fake), atol=1e-6)


# --------------------------------------------------------------------------- DMD2: GAN


def gan_run(hooks, tmp_path, ablations=(), extra=()):
    config = resolve(hooks.registry, "dmd2", "toy2d", list(ablations), [
        "train.steps=3", "train.batch_size=32", "train.fake_score_warmup_steps=2", "train.log_every=1",
        "runtime.progress=false", "fake_score.width=32", "generator.width=32", *extra,
    ])
    return trainer.build(config, hooks, tmp_path)


def test_gan_generator_gradient_matches_finite_differences(hooks, tmp_path):
    run = gan_run(hooks, tmp_path)
    models = run.models
    models.fake_score.double()
    term = GANGenerator(GANGenerator.Config())
    x0 = torch.randn(4, 2, dtype=torch.float64) * 3

    def loss(x):
        torch.manual_seed(7)  # the same noise levels and noise at every evaluation
        return term(GeneratorBatch(z=x, x=x), models)

    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(x), x)
    fd = central_differences(loss, x0)
    assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-8)
    assert grad.abs().sum() > 0


def test_discriminator_learns_real_from_fake_and_gan_gradient_points_to_real(hooks, tmp_path):
    """Train only the fake-score loss on a shifted copy of the data: D separates them, and the generator's
    GAN gradient then moves the shifted samples back towards the data."""
    run = gan_run(hooks, tmp_path, extra=["fake_score_loss.max_timestep_ratio=0.3"])
    models, loss_fn = run.models, run.fake_score_loss
    assert isinstance(loss_fn, FakeScoreDenoiseGAN) and isinstance(models.fake_score.gan_head, GANHead)
    opt = torch.optim.Adam(models.fake_score.parameters(), lr=3e-3)
    shift = torch.tensor([1.5, 0.0])
    for _ in range(300):
        fake_x = models.teacher.real_samples(256) + shift
        opt.zero_grad()
        loss_fn.discriminator_loss(fake_x, None, models).backward()
        opt.step()
    with torch.no_grad():
        real_logit = discriminator_logits(models, models.teacher.real_samples(4000)).mean()
        fake_logit = discriminator_logits(models, models.teacher.real_samples(4000) + shift).mean()
    assert real_logit > fake_logit + 1.0
    x = (models.teacher.real_samples(4000) + shift).requires_grad_(True)
    (grad,) = torch.autograd.grad(GANGenerator(GANGenerator.Config())(GeneratorBatch(z=x, x=x), models), x)
    step = -grad.mean(0)
    assert torch.dot(step, -shift) / (step.norm() * shift.norm()) > 0.9


def test_gan_generator_without_its_discriminator_is_a_one_line_error(hooks):
    config = resolve(hooks.registry, "dmd2", "toy2d", ["gan"], ["losses.gan.component=gan_generator", "losses.gan.weight=0.003"])
    with pytest.raises(UserError, match="fake_score_denoise_gan"):
        hooks.configure(config=config)


def test_teacher_without_real_data_is_refused():
    class NoData(Teacher):
        pass

    with pytest.raises(UserError, match="real data"):
        NoData().real_samples(4)


# --------------------------------------------------------------------------- DMD2: TTUR through the trainer


@pytest.mark.parametrize("ablations, per_step", [((), 5), (("ttur",), 1)])
def test_dmd2_updates_the_fake_score_five_times_per_generator_step(hooks, tmp_path, ablations, per_step):
    run = gan_run(hooks, tmp_path, ablations)
    gen_params = {id(p) for p in run.models.generator.parameters()}
    fake_params = {id(p) for p in run.models.fake_score.parameters()}
    head_params = {id(p) for p in run.models.fake_score.gan_head.parameters()}
    before = {k: v.clone() for k, v in run.models.fake_score.state_dict().items()}
    order: list[str] = []

    def record(optimizer, args, kwargs):
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert ids in (gen_params, fake_params)
        order.append("G" if ids == gen_params else "F")

    handle = register_optimizer_step_post_hook(record)
    try:
        trainer.train(run)
    finally:
        handle.remove()
    assert "".join(order) == "FF" + ("G" + "F" * per_step) * 3
    assert head_params <= fake_params  # the discriminator head is trained with the fake score
    after = run.models.fake_score.state_dict()
    assert not torch.equal(before["gan_head.net.0.weight"], after["gan_head.net.0.weight"])


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["sds", "diff_instruct", "regression", "dmd2"])
def test_method_runs_end_to_end_on_toy2d(method, tmp_path):
    out = tmp_path / method
    args = ["run", method, "--preset", "toy2d", "--out", str(out), "--quiet"]
    assert main(args + [a for kv in TINY for a in ("--set", kv)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mode_coverage", "max_mass_error", "within_3std", "energy_distance", "train_seconds"):
        assert math.isfinite(metrics[key]), key
    assert metrics["non_finite"] == 0
    assert (out / "fake_score.safetensors").exists() == (method in ("diff_instruct", "dmd2"))
