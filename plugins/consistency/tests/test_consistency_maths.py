"""The consistency family's maths against independent computations on the exact Gaussian-mixture teacher.

* the exact consistency function is the probability-flow ODE's flow map to ``s_min`` (a fine Heun solve, here);
* CD's target is one hand-written Heun (or guided Euler) step of the teacher followed by the target network;
* sCM's TrigFlow velocity against the sigma-form ODE, its tangent by ``jvp`` against finite differences, and its
  direction ``g`` against ``cos t df/dt`` by finite differences along the ODE.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from scoredistill.config import resolve
from scoredistill.errors import UserError
from scoredistill.roles import BuildContext
from scoredistill.sampling import karras_sigmas
from scoredistill.trainer import build

TOY = ["train.batch_size=64", "eval.num_samples=200", "runtime.progress=false", "train.sample_every=null",
       "generator.teacher_init_steps=0"]


def toy(hooks, tmp_path, method, extra=()):
    return build(resolve(hooks.registry, method, "toy2d", [], TOY + list(extra)), hooks, tmp_path)


def flow_map(teacher, x, sigma: float, sigma_end: float, steps: int = 200) -> torch.Tensor:
    """The probability-flow ODE ``dx/ds = (x - D(x, s)) / s`` from ``sigma`` to ``sigma_end``: Heun on a fine EDM grid, float64."""
    grid = karras_sigmas(steps, sigma_end, sigma)[:-1]  # sigma ... sigma_end (without the final 0)
    x = x.double()
    for s, s_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        d = (x - teacher(x, torch.full((len(x),), s, dtype=torch.float64))) / s
        x_e = x + (s_next - s) * d
        d_next = (x_e - teacher(x_e, torch.full((len(x),), s_next, dtype=torch.float64))) / s_next
        x = x + (s_next - s) * 0.5 * (d + d_next)
    return x


def test_the_consistency_parameterisation_meets_its_boundary_condition(hooks, tmp_path):
    g = toy(hooks, tmp_path, "cd").models.generator
    x = torch.randn(32, 2) * 3
    s_min = g.chain.new_full((32,), g.sigma_min)
    with torch.no_grad():
        assert torch.allclose(g.denoise(x, s_min), x, atol=1e-6, rtol=0)  # f(x, s_min) = x (Song et al. 2023, eq. 3)
        big = g.chain.new_full((32,), 50.0)
        # far from s_min, f is the network's denoiser up to c_out^CM / c_out^EDM = 1 - s_min / s
        assert torch.allclose(g.denoise(x, big), g.denoiser(x, big), atol=1e-3)


def test_the_exact_flow_map_is_self_consistent_under_one_heun_step(hooks, tmp_path):
    """CD's objective vanishes at the exact consistency function: f*(x_{n+1}, s_{n+1}) = f*(Phi(x_{n+1}), s_n) up to
    the solver's local error (Song et al. 2023, eq. 7), with CD's own one-step solve Phi."""
    from scoredistill_consistency.maths import euler_step, heun_step

    run = toy(hooks, tmp_path, "cd")
    teacher, loss = run.models.teacher.double(), run.losses["consistency"]
    levels = loss.levels.double()
    torch.manual_seed(0)
    x0 = teacher.sample(256).double()
    full = lambda s: torch.full((256,), s, dtype=torch.float64)  # noqa: E731
    for n in (2, 6, 10, 14):
        s_n, s_next = float(levels[n]), float(levels[n + 1])
        x_next = x0 + s_next * torch.randn_like(x0)
        exact = flow_map(teacher, x_next, s_next, teacher.sigma_min)

        def error(x_n, at=s_n):
            return float((exact - flow_map(teacher, x_n, at, teacher.sigma_min)).norm(dim=1).mean())

        heun = error(heun_step(teacher, x_next, full(s_next), full(s_n)))
        assert heun < 0.02
        assert heun < error(euler_step(teacher, x_next, full(s_next), full(s_n)))  # second order beats first
        # a step to the wrong level is not consistent: the check can fail
        assert error(heun_step(teacher, x_next, full(s_next), full(float(levels[n - 1]))), at=s_n) > 5 * heun


def test_cd_loss_equals_its_hand_written_target(hooks, tmp_path):
    """The CD term = mean ||f_theta(x + s_{n+1} eps, s_{n+1}) - f_theta-(x_hat, s_n)||^2 / d, x_hat one Heun step."""
    run = toy(hooks, tmp_path, "cd", ["losses.consistency.curriculum.num_scales=10"])
    teacher, g, loss = run.models.teacher, run.models.generator, run.losses["consistency"]
    from scoredistill.roles import GeneratorBatch

    z = torch.randn(64, 2)
    torch.manual_seed(11)
    value = loss(GeneratorBatch(z=z, x=z), run.models)
    torch.manual_seed(11)  # the same draws, by hand: data, levels, noise
    x0 = teacher.real_samples(64)
    i = torch.randint(0, 9, (64,))
    grid = [(0.002 ** (1 / 7) + k / 9 * (80.0 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for k in range(10)]  # Song et al.'s t_i
    s_n = torch.tensor(grid)[i].float()
    s_next = torch.tensor(grid)[i + 1].float()
    x_next = x0 + s_next[:, None] * torch.randn_like(x0)
    with torch.no_grad():
        d1 = (x_next - teacher(x_next, s_next)) / s_next[:, None]
        x_euler = x_next + (s_n - s_next)[:, None] * d1
        d2 = (x_euler - teacher(x_euler, s_n)) / s_n[:, None]
        x_hat = x_next + (s_n - s_next)[:, None] * (d1 + d2) / 2
        target = copy.deepcopy(g).denoise(x_hat, s_n)  # theta- = theta at the first step
    expected = ((g.denoise(x_next, s_next) - target) ** 2).mean()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)


def test_lcm_guided_euler_target_on_a_conditional_mixture(hooks, tmp_path):
    """LCM's solver at a fixed w (no guidance embedding): one Euler step with D_u + w (D_c - D_u), D_c component c's
    posterior mean, written out here."""
    from scoredistill.roles import GeneratorBatch

    run = toy(hooks, tmp_path, "lcm", ["teacher.class_conditional=true", "losses.consistency.guidance_scale=3.0",
                                       "generator.guidance_embedding=0"])
    teacher, g, loss = run.models.teacher, run.models.generator, run.losses["consistency"]
    means, var = teacher.means, teacher.stds[0] ** 2
    z = torch.randn(64, 2)
    torch.manual_seed(4)
    value = loss(GeneratorBatch(z=z, x=z, cond=torch.zeros(64, dtype=torch.long)), run.models)
    torch.manual_seed(4)
    x0, c = teacher.real_labelled_samples(64)  # real (x_0, c) pairs: each sample with its own component
    i = torch.randint(0, 1000 - 20, (64,))
    s_n, s_next = teacher.sigmas[i], teacher.sigmas[i + 20]  # the teacher's grid, skipping step k = 20
    x_next = x0 + s_next[:, None] * torch.randn_like(x0)
    xd, s2 = x_next.double(), s_next.double()[:, None] ** 2
    d_c = means[c] + var / (var + s2) * (xd - means[c])
    logits = -((xd[:, None] - means[None]) ** 2).sum(-1) / (2 * (var + s2))  # equal weights and stds
    d_u = (torch.softmax(logits, 1)[..., None] * (means[None] + (var / (var + s2))[..., None] * (xd[:, None] - means[None]))).sum(1)
    d_w = (d_u + 3.0 * (d_c - d_u)).float()
    x_hat = x_next + (s_n - s_next)[:, None] * (x_next - d_w) / s_next[:, None]
    with torch.no_grad():
        target = copy.deepcopy(g).denoise(x_hat, s_n, c)
    pred = g.denoise(x_next, s_next, c)
    c_huber = 0.00054 * math.sqrt(2)
    expected = ((((pred - target) ** 2).sum(1) + c_huber**2).sqrt() - c_huber).mean()
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6)


def test_trigflow_velocity_is_the_sigma_form_ode(hooks, tmp_path):
    """x_t = cos t x_s with s = sd tan t: dx_t/dt = -sin t x_s + cos t (x_s - D) / s * sd / cos^2 t."""
    from scoredistill_consistency.maths import trigflow_velocity

    teacher = toy(hooks, tmp_path, "scm").models.teacher.double()
    sd = teacher.sigma_data
    t = torch.rand(100, dtype=torch.float64) * 1.4 + 0.05
    s = sd * t.tan()
    x_s = teacher.sample(100).double() + s[:, None] * torch.randn(100, 2, dtype=torch.float64)
    expected = -t.sin()[:, None] * x_s + t.cos()[:, None] * (x_s - teacher(x_s, s)) / s[:, None] * sd / t.cos()[:, None] ** 2
    torch.testing.assert_close(trigflow_velocity(teacher, t.cos()[:, None] * x_s, t, sd), expected)


@pytest.fixture
def scm_float64(hooks, tmp_path):
    run = toy(hooks, tmp_path, "scm")
    loss = run.losses["consistency"].double()
    teacher = run.models.teacher.double()
    sd = loss.sigma_data
    torch.manual_seed(0)
    t = torch.rand(64, dtype=torch.float64) * 1.3 + 0.1
    x_t = t.cos()[:, None] * teacher.sample(64).double() + t.sin()[:, None] * sd * torch.randn(64, 2, dtype=torch.float64)
    return loss, teacher, x_t, t


def test_scm_tangent_by_jvp_equals_finite_differences(scm_float64):
    from scoredistill_consistency.maths import trigflow_F, trigflow_velocity

    loss, teacher, x_t, t = scm_float64
    sd = loss.sigma_data
    dxdt = trigflow_velocity(teacher, x_t, t, sd)
    F, dF = loss.tangent(loss.target, x_t, t, dxdt, None)
    # by hand: the central difference of F(x_t / sd, t) along (cos t sin t dx_t/dt / sd, cos t sin t), float64
    cs, h = (t.cos() * t.sin()), 1e-6
    f = lambda x, tt: trigflow_F(loss.target, x, tt, sd)  # noqa: E731
    fd = (f(x_t / sd + h * cs[:, None] * dxdt / sd, t + h * cs) - f(x_t / sd - h * cs[:, None] * dxdt / sd, t - h * cs)) / (2 * h)
    torch.testing.assert_close(dF, fd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(F, f(x_t / sd, t))
    loss.config = loss.config.model_copy(update={"tangent": "finite_difference", "fd_eps": 1e-5})
    torch.testing.assert_close(loss.tangent(loss.target, x_t, t, dxdt, None)[1], fd, rtol=1e-4, atol=1e-5)


def test_scm_direction_is_cos_t_times_the_consistency_functions_derivative_along_the_ode(scm_float64):
    """At r = 1, g = cos t df-/dt with f-(x_t, t) = D-(x_t / cos t, sd tan t), here by finite differences along the ODE."""
    from scoredistill_consistency.maths import trigflow_velocity

    loss, teacher, x_t, t = scm_float64
    sd, h = loss.sigma_data, 1e-6
    _, g = loss.direction(teacher, x_t, t, None, 1.0)
    v = trigflow_velocity(teacher, x_t, t, sd)
    f = lambda x, tt: loss.target(x / tt.cos()[:, None], sd * tt.tan())  # noqa: E731
    dfdt = (f(x_t + h * v, t + h) - f(x_t - h * v, t - h)) / (2 * h)
    torch.testing.assert_close(g, t.cos()[:, None] * dfdt, rtol=1e-5, atol=1e-6)
    _, g0 = loss.direction(teacher, x_t, t, None, 0.0)  # the warm-up's start keeps only the first term
    assert not torch.allclose(g0, g)


def test_scm_refuses_a_discrete_time_vp_teacher(hooks, tmp_path):
    import diffusers

    folder = tmp_path / "vp"
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          norm_num_groups=4).save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    reg = hooks.registry
    tcls = reg.component("teacher", "diffusers_unet").cls
    teacher = tcls(tcls.Config(path=str(folder)), None)
    assert teacher.continuous_time is False
    gcls = reg.component("generator", "fewstep_generator").cls
    ctx = BuildContext(hooks=hooks, teacher=teacher)
    ctx.generator = gcls(gcls.Config(), ctx)
    lcls = reg.component("generator_loss", "scm").cls
    with pytest.raises(UserError, match="TrigFlow") as info:
        lcls(lcls.Config(), ctx)
    assert "\n" not in str(info.value)


def test_scm_jvp_through_a_diffusers_unet_with_attention(hooks, tmp_path):
    """The fused CPU attention kernel has no forward-mode rule: the jvp runs attention by its math backend."""
    from scoredistill.images.testing import tiny_diffusers_teacher_folder
    from scoredistill_consistency.maths import trigflow_F, trigflow_velocity

    folder = tiny_diffusers_teacher_folder(tmp_path / "edm")  # its mid block has attention
    reg = hooks.registry
    tcls = reg.component("teacher", "diffusers_unet").cls
    teacher = tcls(tcls.Config(path=str(folder)), None).eval().requires_grad_(False)
    gcls, lcls = reg.component("generator", "fewstep_generator").cls, reg.component("generator_loss", "scm").cls
    ctx = BuildContext(hooks=hooks, teacher=teacher)
    ctx.generator = gcls(gcls.Config(loss_weighting=True), ctx)
    loss = lcls(lcls.Config(), ctx)
    sd = loss.sigma_data
    t = torch.tensor([0.4, 1.0])
    x_t = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        dxdt = trigflow_velocity(teacher, x_t, t, sd)
        _, dF = loss.tangent(loss.target, x_t, t, dxdt, None)
        cs, h = t.cos() * t.sin(), 1e-3
        f = lambda x, tt: trigflow_F(loss.target, x, tt, sd)  # noqa: E731
        v = cs[:, None, None, None] * dxdt / sd
        fd = (f(x_t / sd + h * v, t + h * cs) - f(x_t / sd - h * v, t - h * cs)) / (2 * h)
    assert torch.isfinite(dF).all()
    torch.testing.assert_close(dF, fd, rtol=2e-2, atol=2e-2 * float(fd.abs().max()))


def _flow_map_error(g, teacher, levels=(1.0, 3.0, 10.0, 30.0), n=400) -> float:
    gen = torch.Generator().manual_seed(7)
    errors = []
    for s in levels:
        x = teacher.sample(n, generator=gen) + s * torch.randn(n, 2, generator=gen)
        exact = flow_map(teacher, x, s, teacher.sigma_min, 60).float()
        with torch.no_grad():
            errors.append(float((g.denoise(x, torch.full((n,), s)) - exact).norm(dim=1).mean()))
    return sum(errors) / len(errors)


@pytest.mark.slow
def test_trained_consistency_model_approaches_the_flow_map(hooks, tmp_path):
    """CD on the exact mixture teacher: G(x_s, s) moves from the teacher's denoiser towards the ODE's flow map."""
    from scoredistill.runner import execute

    config = resolve(hooks.registry, "cd", "toy2d", [], TOY + ["train.steps=300", "train.batch_size=128",
                                                                "generator.teacher_init_steps=300", "train.log_every=100"])
    before = _flow_map_error(build(config, hooks, tmp_path / "init").models.generator.eval(), build(config, hooks, tmp_path / "t").models.teacher)
    result = execute(config, hooks, tmp_path / "run")
    after = _flow_map_error(result.run.models.generator.eval(), result.run.models.teacher)
    assert after < 0.6 * before, (before, after)


def test_the_generator_is_fitted_to_the_analytic_teacher(hooks, tmp_path):
    from scoredistill_consistency.generator import fit_to_teacher

    run = toy(hooks, tmp_path, "cd", ["generator.teacher_init_steps=0"])
    g, teacher = run.models.generator, run.models.teacher

    def error() -> float:
        gen = torch.Generator().manual_seed(1)
        s = torch.tensor([0.5, 2.0, 8.0]).repeat_interleave(200)
        x = teacher.sample(600, generator=gen) + s[:, None] * torch.randn(600, 2, generator=gen)
        with torch.no_grad():
            return float((g.denoiser(x, s) - teacher(x, s)).norm(dim=1).mean())

    state = torch.get_rng_state()
    before = error()
    fit_to_teacher(g.denoiser, teacher, 200, seed=0)
    assert error() < 0.7 * before
    assert torch.equal(torch.get_rng_state(), state)  # a forked stream: the run's own draws are unchanged


@pytest.mark.parametrize("override, message", [
    ("losses.consistency.curriculum.component=nope", "curriculum component"),
    ("losses.consistency.curriculum.skip=18", "skip=18 needs more than 18 noise levels"),
    ("losses.consistency.target.decay=1.5", "losses.consistency.target.decay"),
    ("losses.consistency.target.speed=2", "unknown config key 'losses.consistency.target.speed'"),
])
def test_bad_parts_are_one_line_errors(hooks, tmp_path, override, message):
    with pytest.raises(UserError, match=message) as info:
        toy(hooks, tmp_path, "cd", [override])
    assert "\n" not in str(info.value)


def test_parts_are_registered_components_any_method_can_name(hooks):
    reg = hooks.registry
    assert {"ema_target"} <= set(reg.components["target"]) and {"karras_grid", "teacher_grid"} <= set(reg.components["curriculum"])


class _NoForwardMode(torch.autograd.Function):
    """An op with a backward rule and no forward-mode (jvp) rule, as some fused kernels are."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Wrapped(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, sigma, cond=None):
        return _NoForwardMode.apply(self.inner(x, sigma, cond))


def test_scm_without_forward_mode_is_a_one_line_error_and_finite_differences_work(hooks, tmp_path):
    from scoredistill_consistency.maths import trigflow_velocity

    run = toy(hooks, tmp_path, "scm")
    loss, teacher = run.losses["consistency"], run.models.teacher
    loss.target.network.denoiser = _Wrapped(loss.target.network.denoiser)
    t = torch.tensor([0.3, 1.0])
    x_t = torch.randn(2, 2)
    dxdt = trigflow_velocity(teacher, x_t, t, loss.sigma_data)
    with pytest.raises(UserError, match="does not support forward-mode differentiation") as info:
        loss.tangent(loss.target, x_t, t, dxdt, None)
    assert "\n" not in str(info.value) and "tangent=finite_difference" in str(info.value)
    loss.config = loss.config.model_copy(update={"tangent": "finite_difference"})
    assert torch.isfinite(loss.tangent(loss.target, x_t, t, dxdt, None)[1]).all()


def test_the_teacher_fit_is_cached_and_the_cache_gives_the_same_weights(hooks, tmp_path):
    import os
    from pathlib import Path

    overrides = ["generator.teacher_init_steps=20"]
    first = toy(hooks, tmp_path / "a", "cd", overrides).models.generator.state_dict()
    cache = Path(os.environ["SCOREDISTILL_CACHE"]) / "fewstep_init"
    assert len(list(cache.glob("mlp-*.safetensors"))) >= 1
    again = toy(hooks, tmp_path / "b", "cd", overrides).models.generator.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = toy(hooks, tmp_path / "c", "cd", ["generator.teacher_init_steps=20", "seed=1"]).models.generator.state_dict()
    assert any(not torch.equal(first[k], other[k]) for k in first)  # the seed is part of the key


@pytest.mark.slow
@pytest.mark.parametrize("time_scale, stable", [(1.0, True), (4.0, False)])
def test_scm_is_stable_with_low_frequency_time_features(hooks, tmp_path, time_scale, stable):
    """sCM on the exact mixture teacher at a large learning rate (Lu & Song 2024, Sec. 4.1): with the scm method's
    low-frequency noise-level features (time_scale 1) G(x_s, s) moves towards the ODE's flow map; with the MLP's
    default high-frequency ones (time_scale 4, what sCM had before) the same run moves away from it."""
    from scoredistill.runner import execute

    config = resolve(hooks.registry, "scm", "toy2d", [], TOY + [
        "train.steps=300", "train.batch_size=256", "train.generator_lr=1.0e-3", "generator.teacher_init_steps=1000",
        "losses.consistency.p_mean=0.94", "losses.consistency.warmup_steps=50", "train.log_every=100",
        f"generator.time_scale={time_scale}"])
    before = _flow_map_error(build(config, hooks, tmp_path / "init").models.generator.eval(), build(config, hooks, tmp_path / "t").models.teacher)
    result = execute(config, hooks, tmp_path / "run")
    after = _flow_map_error(result.run.models.generator.eval(), result.run.models.teacher)
    assert (after < 0.8 * before) == stable, (before, after)
