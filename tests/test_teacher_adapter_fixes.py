"""Adapter details found by trying teachers as a new user would: integer timesteps for learned embeddings,
zero-terminal-SNR v-prediction, EDM's exponential schedule."""

from __future__ import annotations

import math

import pytest
import torch

from scoredistill.images.loading import load_denoiser

diffusers = pytest.importorskip("diffusers")


def _unet(**kw):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 norm_num_groups=4, **kw)


def test_a_learned_timestep_embedding_gets_the_nearest_integer_timestep(tmp_path):
    unet = _unet(time_embedding_type="learned", num_train_timesteps=1000)
    unet.save_pretrained(tmp_path / "unet")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    sched.save_pretrained(tmp_path / "scheduler")
    den = load_denoiser(str(tmp_path)).denoiser
    abar = sched.alphas_cumprod.double()
    t = torch.tensor([0, 17, 500, 999])
    sigma = ((1 - abar[t]) / abar[t]).sqrt().float()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        got = den(x, sigma)
        out = unet(x / (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1), t).sample  # diffusers' own call, integer timesteps
    torch.testing.assert_close(got, x - sigma.reshape(-1, 1, 1, 1) * out, rtol=1e-5, atol=1e-5)


def _ddim_sample(unet, sched_kw, z, steps):
    sched = diffusers.DDIMScheduler(**sched_kw, timestep_spacing="trailing", clip_sample=False)  # x0 unclipped, as the ODE
    sched.set_timesteps(steps)
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def test_a_zero_terminal_snr_v_teacher_samples_as_diffusers_ddim(tmp_path):
    """The terminal step as diffusers takes it: Heun from the teacher is within 1% of DDIM with many steps."""
    from scoredistill.images.teachers import DiffusersTeacher

    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
              rescale_betas_zero_snr=True)
    unet = _unet()
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(**kw).save_pretrained(tmp_path / "scheduler")
    teacher = DiffusersTeacher(DiffusersTeacher.Config(path=str(tmp_path)))
    assert teacher.terminal and teacher.sigma_max > 1e6
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    want = _ddim_sample(unet, kw, z, 250)
    got = teacher.sample(z, steps=120)
    rel = float((got - want).norm() / want.norm())
    assert rel < 0.01, rel
    assert abs(float(got.std() / want.std()) - 1) < 0.01
    with torch.no_grad():  # the generator's start: D at the top level is the network's x0 at T: -v(z, T)
        d = teacher(z * teacher.sigma_max, torch.full((4,), teacher.sigma_max))
        torch.testing.assert_close(d, -unet(z, torch.full((4,), 999)).sample, rtol=1e-4, atol=1e-4)


def test_an_edm_exponential_schedule_is_read_as_such(tmp_path):
    _unet().save_pretrained(tmp_path / "unet")
    sched = diffusers.EDMEulerScheduler(sigma_min=0.01, sigma_max=50.0, sigma_schedule="exponential", num_train_timesteps=20)
    sched.save_pretrained(tmp_path / "scheduler")
    sigmas = load_denoiser(str(tmp_path)).sigmas.double()
    want = torch.tensor(sorted(sched.sigmas[:-1].tolist()), dtype=torch.float64) if len(sched.sigmas) == 21 else None
    log = sigmas.log()
    torch.testing.assert_close(log.diff(), torch.full((19,), (math.log(50.0) - math.log(0.01)) / 19, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    if want is not None:
        torch.testing.assert_close(sigmas, want, rtol=1e-5, atol=1e-7)
