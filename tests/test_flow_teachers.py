"""Flow-matching (rectified-flow) teachers in the sigma form, against closed forms and diffusers' own scheduler.

Rectified flow: ``x_t = (1 - t) x + t eps``, velocity ``v = eps - x``. For Gaussian data
``x ~ N(mu, tau^2 I)`` the exact velocity is known: with ``den = (1 - t)^2 tau^2 + t^2``,
``E[x | x_t] = mu + (1 - t) tau^2 (x_t - (1 - t) mu) / den`` and
``E[eps | x_t] = t (x_t - (1 - t) mu) / den``. The sigma-form adapter must return the exact
sigma-form denoiser ``D(x_s, s) = mu + tau^2 / (tau^2 + s^2) (x_s - mu)`` from it, and its Euler
steps must be ``FlowMatchEulerDiscreteScheduler.step``'s on a real (tiny, random) network.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from scoredistill.images.denoisers import FlowDenoiser, flow_shift_mu

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 4, 4)
MU = torch.linspace(-0.8, 0.6, 16, dtype=torch.float64).reshape(1, *SHAPE)
TAU = 0.4


class OracleNet(nn.Module):
    """Looks like a diffusers UNet2DModel to the adapter; returns the exact velocity of N(MU, TAU^2) at timestep 1000 t."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(sample_size=SHAPE[1], in_channels=SHAPE[0], out_channels=SHAPE[0])
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    @property
    def dtype(self):
        return torch.float64

    def forward(self, x_t, timestep, return_dict=True):
        t = (timestep / 1000).reshape(-1, 1, 1, 1)
        den = (1 - t) ** 2 * TAU**2 + t**2
        x0 = MU + (1 - t) * TAU**2 * (x_t - (1 - t) * MU) / den
        eps = t * (x_t - (1 - t) * MU) / den
        return (eps - x0,)


def test_flow_adapter_recovers_the_exact_gaussian_denoiser():
    den = FlowDenoiser(OracleNet(), 1000).double()
    sigma = torch.tensor([0.002, 0.05, 0.7, 1.0, 3.0, 40.0, 900.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = MU + TAU * torch.randn((len(sigma), *SHAPE), generator=g, dtype=torch.float64)
    x_s = x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    want = MU + TAU**2 / (TAU**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x_s - MU)
    torch.testing.assert_close(den(x_s, sigma), want, rtol=1e-5, atol=1e-7)


def test_flow_loss_weight_is_the_velocity_mse():
    """lambda(s) |D - x|^2 = |v_hat - v|^2 for any prediction (D - x = -t (v_hat - v))."""
    den = FlowDenoiser(OracleNet(), 1000).double()
    sigma = torch.tensor([0.01, 0.5, 2.0, 30.0], dtype=torch.float64)
    x, eps, v_hat = (torch.randn((4, *SHAPE), dtype=torch.float64) for _ in range(3))
    t = (sigma / (1 + sigma)).reshape(-1, 1, 1, 1)
    x_t = (1 - t) * x + t * eps
    d = x_t - t * v_hat  # the adapter's D for a network that answered v_hat
    lhs = den.loss_weight(sigma).reshape(-1, 1, 1, 1) * (d - x) ** 2
    torch.testing.assert_close(lhs, (v_hat - (eps - x)) ** 2)


def _flow_unet_folder(folder, **sched):
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          norm_num_groups=4).save_pretrained(folder / "unet")
    diffusers.FlowMatchEulerDiscreteScheduler(**sched).save_pretrained(folder / "scheduler")
    return folder


@pytest.mark.parametrize("sched", [{"shift": 3.0}, {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                                                    "base_image_seq_len": 16, "max_image_seq_len": 256}])
def test_flow_teacher_steps_are_diffusers_flow_match_euler_steps(sched, tmp_path):
    """Euler in the sigma form on the teacher's grid = FlowMatchEulerDiscreteScheduler.step, step by step (1e-5 relative)."""
    from scoredistill.images.teachers import DiffusersTeacher

    folder = _flow_unet_folder(tmp_path / "flow", **sched)
    teacher = DiffusersTeacher(DiffusersTeacher.Config(path=str(folder)))
    assert teacher.parameterisation == "flow" and teacher.terminal
    unet = teacher.denoiser.unet
    steps = 6
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder / "scheduler"))
    mu = flow_shift_mu(dict(scheduler.config), 64)  # a UNet's token count: 8 x 8
    scheduler.set_timesteps(steps, mu=mu)
    grid = teacher.sampling_sigmas(steps)
    t_grid = scheduler.sigmas.double()
    torch.testing.assert_close((grid[1:] / (1 + grid[1:])).double(), t_grid[1:], rtol=1e-5, atol=1e-7)  # s = t / (1 - t)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x_t = z.clone()
    ours = teacher.solve(z, grid[:2])  # the exact first step from t = 1
    with torch.no_grad():
        for k, timestep in enumerate(scheduler.timesteps):
            v = unet(x_t, timestep.expand(3)).sample
            x_t = scheduler.step(v, timestep, x_t).prev_sample
            if k == 0:
                mine = ours
            else:  # Euler in the sigma form: x' = x + (s' - s) (x - D(x, s)) / s
                s, s_next = grid[k], grid[k + 1]
                mine = mine + (s_next - s) * (mine - teacher(mine, s.expand(3))) / s
            t_next = float(t_grid[k + 1])
            got = mine * (1 - t_next)  # back to x_t: x_t = (1 - t) x_s
            assert (got - x_t).norm() <= 1e-5 * x_t.norm() + 1e-6, (k, float((got - x_t).norm() / x_t.norm()))
    if mu is not None:  # the dynamic shift: mu linear in the token count between the base and max points
        assert mu == pytest.approx(0.5 + (1.15 - 0.5) * (64 - 16) / (256 - 16))


def test_flow_fake_score_trains_with_the_flow_weighting_and_the_teacher_table(tmp_path):
    from scoredistill.images.teachers import DiffusersTeacher

    teacher = DiffusersTeacher(DiffusersTeacher.Config(path=str(_flow_unet_folder(tmp_path / "f", shift=3.0))))
    sigma = torch.tensor([0.1, 1.0, 10.0])
    torch.testing.assert_close(teacher.loss_weight(sigma), ((1 + sigma) / sigma) ** 2)
    t = teacher.sigmas / (1 + teacher.sigmas)  # the table: diffusers' shifted training sigmas
    want = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.flip(0)
    torch.testing.assert_close(t[:-1], want[:-1], rtol=1e-5, atol=1e-6)
    assert float(teacher.sigmas[-1]) > 1e6  # t = 1: the terminal level
    drawn = teacher.training_sigmas(2000)
    assert set(drawn.tolist()) <= set(teacher.sigmas.tolist())


def test_digits_flow_preset_trains_a_flow_teacher_and_distils_it(tmp_path, monkeypatch):
    """The embedded flow default, tiny: a few teacher steps with the rectified-flow objective, then a few DMD steps.

    (The preset's full training and its FID are not part of the tests: minutes of CPU.)"""
    from scoredistill.images import metrics
    from scoredistill.images.testing import TINY_TEACHER_OVERRIDES, tiny_classifier_settings

    monkeypatch.setattr(metrics, "CLASSIFIER_SETTINGS", tiny_classifier_settings())
    monkeypatch.setenv("SCOREDISTILL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    sets = [*TINY_TEACHER_OVERRIDES, "pairs.num_pairs=8", "pairs.steps=3", "pairs.batch_size=8", "train.batch_size=4",
            "train.pair_batch_size=4", "train.steps=2", "eval.num_samples=20", "train.checkpoint_every=null"]
    from scoredistill.cli import main

    assert main(["run", "dmd", "--preset", "digits_flow", "--out", str(out), "--quiet", *[a for o in sets for a in ("--set", o)]]) == 0
    import json

    teacher_dirs = list((tmp_path / "cache" / "teachers").iterdir())
    assert len(teacher_dirs) == 1
    sched = json.loads((teacher_dirs[0] / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    m = json.loads((out / "metrics.json").read_text())
    assert m["non_finite"] == 0 and "fid" in m and m["teacher"]["sampler"] == "heun-3"
    assert m["teacher"]["nfe"] == 4  # the exact first step from t = 1 (one evaluation), then Heun: 1 + 3
    from scoredistill.images.training import DigitsTeacherSettings, settings_key

    # an EDM teacher keeps the cache key it had before flow teachers existed
    assert settings_key(DigitsTeacherSettings()) != settings_key(DigitsTeacherSettings(objective="flow"))
