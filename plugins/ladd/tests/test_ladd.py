"""The LADD plugin: the teacher's features and their gradient, the heads' losses written out and by
finite differences through the frozen teacher, the logit-normal noise levels, ADD's distillation
gradient in closed form on a Gaussian, a discriminator that learns, bad inputs and CLI runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scoredistill import trainer
from scoredistill.cli import main
from scoredistill.config import resolve
from scoredistill.errors import UserError
from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher
from scoredistill.images.testing import run_on_tiny_digits
from scoredistill.testing import central_differences, run_toy2d
from scoredistill.roles import GeneratorBatch, Models, Teacher
from scoredistill_ladd.discriminator import HEAD_NAME, NoiseLevels, discriminator_loss, generator_loss, logits
from scoredistill_ladd.losses import ADDDistillation, LADDAdversarial

TINY = ["train.steps=8", "train.batch_size=64", "train.fake_score_warmup_steps=2", "eval.num_samples=300",
        "train.log_every=4", "generator.width=32", "fake_score_loss.teacher_samples=256"]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the isolated cache and one thread: the repository's conftest.py


def ladd_run(hooks, tmp_path, ablations=(), extra=()):
    config = resolve(hooks.registry, "ladd", "toy2d", list(ablations), TINY + ["runtime.progress=false", *extra])
    return trainer.build(config, hooks, tmp_path)


def mixture2() -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher(GaussianMixtureTeacher.Config(means=[[2.0, 0.0], [-1.0, 1.0]], stds=[0.5, 0.8], weights=[0.3, 0.7]))


# --------------------------------------------------------------------------- the teacher's features


def test_mixture_features_are_its_denoiser_quantities_with_gradient():
    teacher = mixture2()
    x = torch.randn(6, 2, dtype=torch.float64) * 2
    sigma = torch.tensor([0.05, 0.3, 1.0, 2.0, 5.0, 20.0], dtype=torch.float64)
    feats = teacher.features(x, sigma)
    scale = (sigma**2 + teacher.sigma_data**2).rsqrt()[:, None]
    assert torch.allclose(feats[:, :2], x * scale)
    assert torch.allclose(feats[:, 2:4], (x - teacher(x, sigma)) * scale)
    # responsibilities by Bayes' rule, written out: pi_k N(x; mu_k, (s_k^2 + s^2) I)
    var = torch.tensor([0.25, 0.64], dtype=torch.float64)[None] + sigma[:, None] ** 2
    mu = torch.tensor([[2.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    dens = torch.tensor([0.3, 0.7], dtype=torch.float64) * torch.exp(-((x[:, None] - mu) ** 2).sum(-1) / (2 * var)) / (2 * math.pi * var)
    assert torch.allclose(feats[:, 4:], dens / dens.sum(1, keepdim=True))
    # with gradient to x_s: autograd against central differences
    w = torch.randn(6, 6, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((teacher.features(xg, sigma) * w).sum(), xg)
    fd = central_differences(lambda v: (teacher.features(v, sigma) * w).sum(), x)
    assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-7)


def test_a_teacher_without_features_is_a_one_line_error():
    class Bare(Teacher):
        pass

    with pytest.raises(UserError, match="exposes no features"):
        Bare().features(torch.zeros(1, 2), torch.ones(1))


# --------------------------------------------------------------------------- losses


def test_heads_losses_are_the_hinge_and_non_saturating_games_written_out():
    d_real, d_fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.2, 1.5])
    assert discriminator_loss(d_real, d_fake, "hinge").item() == pytest.approx(
        (0 + 0.5 + 2.0) / 3 + (0 + 1.2 + 2.5) / 3)
    assert generator_loss(d_fake, "hinge").item() == pytest.approx(-(-3.0 + 0.2 + 1.5) / 3)
    bce = (F.binary_cross_entropy_with_logits(d_real, torch.ones(3)) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros(3)))
    assert discriminator_loss(d_real, d_fake, "non_saturating").item() == pytest.approx(bce.item())
    assert generator_loss(d_fake, "non_saturating").item() == pytest.approx(
        F.binary_cross_entropy_with_logits(d_fake, torch.ones(3)).item())


@pytest.mark.parametrize("loss", ["hinge", "non_saturating"])
def test_adversarial_gradient_reaches_x_through_the_frozen_teacher_features(hooks, tmp_path, loss):
    run = ladd_run(hooks, tmp_path, extra=[f"losses.adversarial.loss={loss}", f"fake_score_loss.loss={loss}"])
    models = run.models
    models.fake_score.double()
    term = LADDAdversarial(LADDAdversarial.Config(loss=loss))
    x0 = torch.randn(4, 2, dtype=torch.float64) * 3

    def value(x):
        torch.manual_seed(5)
        return term(GeneratorBatch(z=x, x=x), models)

    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(value(x), x)
    fd = central_differences(value, x0)
    assert grad.abs().sum() > 0
    assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-8)
    assert LADDAdversarial.differentiates_fake_score  # the trainer freezes the head during the generator step


def test_noise_levels_are_ladds_logit_normal_in_rectified_flow_time():
    """t = s / (1 + s) is the rectified-flow time of x_s (x_t = x_s / (1 + s)); logit(t) = ln s ~ N(m, std^2)."""
    teacher = GaussianMixtureTeacher(GaussianMixtureTeacher.Config(means=[[0.0]], stds=[1.0], weights=[1.0], sigma_min=1e-4, sigma_max=1e4))
    s = NoiseLevels(log_sigma_mean=0.5, log_sigma_std=0.8).sigmas(teacher, 200_000).double()
    t = s / (1 + s)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)


def test_add_distillation_gradient_is_its_closed_form_on_a_gaussian():
    """D(x_s) = m + c (x_s - m), c = s0^2 / (s0^2 + s^2), target held fixed: dL/dx = 2 alpha(s) (x - D) / (N d)."""
    m, s0 = torch.tensor([1.0, -1.0], dtype=torch.float64), 0.7
    teacher = GaussianMixtureTeacher(GaussianMixtureTeacher.Config(means=[[1.0, -1.0]], stds=[s0], weights=[1.0]))
    x = (torch.randn(5, 2, dtype=torch.float64) * 2).requires_grad_(True)
    torch.manual_seed(9)
    loss = ADDDistillation(ADDDistillation.Config())(GeneratorBatch(z=x, x=x), Models(teacher, None, None))
    (grad,) = torch.autograd.grad(loss, x)
    torch.manual_seed(9)
    sigma = teacher.sigmas[torch.randint(0, teacher.num_timesteps, (5,))].double()[:, None]
    eps = torch.randn(5, 2, dtype=torch.float64)
    d = m + s0**2 / (s0**2 + sigma**2) * (x.detach() + sigma * eps - m)
    expected = 2 * (1 + sigma**2).rsqrt() * (x.detach() - d) / 10
    assert torch.allclose(grad, expected, rtol=1e-5)


def test_discriminator_learns_teacher_samples_from_shifted_ones_and_the_gradient_points_back(hooks, tmp_path):
    run = ladd_run(hooks, tmp_path, ["distillation"], ["fake_score_loss.log_sigma_mean=-1.0", "losses.adversarial.log_sigma_mean=-1.0"])
    models, loss_fn = run.models, run.fake_score_loss
    head = getattr(models.fake_score, HEAD_NAME)
    assert [p for p in models.fake_score.parameters()] == list(head.parameters())  # the head is all that trains
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    shift = torch.tensor([1.5, 0.0])
    for _ in range(300):
        opt.zero_grad()
        loss_fn(models.teacher.real_samples(256) + shift, None, models).backward()
        opt.step()
    sigma = torch.full((4000,), 0.3)
    with torch.no_grad():
        real = logits(models, models.teacher.real_samples(4000), sigma, None).mean()
        fake = logits(models, models.teacher.real_samples(4000) + shift, sigma, None).mean()
    assert real > fake + 1.0
    x = (models.teacher.real_samples(4000) + shift).requires_grad_(True)
    (grad,) = torch.autograd.grad(run.losses["adversarial"](GeneratorBatch(z=x, x=x), models), x)
    step = -grad.mean(0)
    assert torch.dot(step, -shift) / (step.norm() * shift.norm()) > 0.9


# --------------------------------------------------------------------------- bad inputs and the CLI


def test_real_data_on_a_conditional_teacher_is_refused(hooks, tmp_path):
    with pytest.raises(UserError, match="class-conditional"):
        ladd_run(hooks, tmp_path, ["synthetic_data"], ["teacher.class_conditional=true"])
    ladd_run(hooks, tmp_path / "ok", extra=["teacher.class_conditional=true"])  # teacher samples carry their labels


def test_mismatched_games_and_a_missing_discriminator_are_one_line_errors(capsys, tmp_path):
    base = ["run", "ladd", "--preset", "toy2d", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "a"), "--set", "losses.adversarial.loss=non_saturating"]) == 2
    assert main(base + ["--out", str(tmp_path / "b"), "--set", "fake_score_loss.component=fake_score_denoise"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "same game" in lines[0] and "ladd_discriminator" in lines[1]


@pytest.mark.parametrize("ablations", [(), ("distillation",), ("synthetic_data",)])
def test_ladd_runs_end_to_end_on_toy2d_from_the_cli(tmp_path, ablations):
    run_toy2d("ladd", tmp_path / "run", TINY, ablations)


# --------------------------------------------------------------------------- image teachers


def test_the_head_scores_each_token_of_an_image_teachers_middle_block(digits_teacher):
    """On a UNet teacher the head sees every position of the mid block: one logit per token, each the head's MLP on that
    token and the noise level alone, with gradient to the input; ``tokens=False`` scores the tokens' mean once."""
    from scoredistill.images.teachers import DiffusersTeacher
    from scoredistill_ladd.discriminator import attach_head

    teacher = DiffusersTeacher(DiffusersTeacher.Config(path=str(digits_teacher), data="digits")).eval().requires_grad_(False)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    for tokens in (True, False):
        holder = torch.nn.Module()
        head = attach_head(holder, teacher, 16, tokens)
        models = Models(teacher=teacher, generator=None, fake_score=holder)
        torch.manual_seed(1)  # the same noise for the features written out and for logits()
        feats = teacher.feature_tokens(x + torch.randn_like(x) * sigma.reshape(-1, 1, 1, 1), sigma)
        torch.manual_seed(1)
        d = logits(models, x, sigma, None)
        want = feats if tokens else feats.mean(dim=1, keepdim=True)
        for i in range(3):
            for k in range(want.shape[1]):
                inp = torch.cat([want[i, k], (sigma[i].log() / 4).reshape(1)])
                assert torch.allclose(d[i, k], head.net(inp).squeeze(), atol=1e-5)
        assert d.shape == (3, feats.shape[1] if tokens else 1) and feats.shape[1] > 1
    (grad,) = torch.autograd.grad(generator_loss(d, "hinge"), x)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("method, extra", [("ladd", ["fake_score_loss.teacher_samples=16", "fake_score_loss.teacher_steps=3"])])
def test_runs_on_a_tiny_digits_unet_teacher(digits_teacher, tmp_path, monkeypatch, method, extra):
    """The same components on an image teacher: UNet denoisers, their features, real digits."""
    run_on_tiny_digits(method, digits_teacher, tmp_path / method, monkeypatch, extra)
