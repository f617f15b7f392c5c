"""diffusers UNets as sigma-form denoisers: the conversion maths against closed forms and against diffusers itself.

The exact checks use Gaussian data ``x ~ N(mu, tau^2 I)``, for which every predictor is
known in closed form: in VP form ``x_vp = a x + b eps`` (``a = sqrt(abar)``,
``b = sqrt(1 - abar)``) the posterior means are
``E[x | x_vp] = mu + a tau^2 (x_vp - a mu) / (a^2 tau^2 + b^2)`` and
``E[eps | x_vp] = b (x_vp - a mu) / (a^2 tau^2 + b^2)``, ``v = a eps - b x``; in sigma form
the exact denoiser is ``D(x_s, s) = mu + tau^2 / (tau^2 + s^2) (x_s - mu)``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from scoredistill.errors import UserError
from scoredistill.images.denoisers import EDMDenoiser, VPDenoiser
from scoredistill.images.loading import load_denoiser
from scoredistill.roles import score_from_denoiser

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 4, 4)
MU = torch.linspace(-0.8, 0.6, 16, dtype=torch.float64).reshape(1, *SHAPE)
TAU = 0.4


def sigma_form_exact(x_s: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor = MU) -> torch.Tensor:
    s2 = sigma.reshape(-1, 1, 1, 1) ** 2
    return mu + TAU**2 / (TAU**2 + s2) * (x_s - mu)


class FakeUNet(nn.Module):
    """Looks like a diffusers UNet2DModel to the adapter: config, dtype, forward(sample, timestep, ...)."""

    def __init__(self, predict, shape=SHAPE, num_class_embeds=None):
        super().__init__()
        self.predict = predict
        self.config = SimpleNamespace(sample_size=shape[1], in_channels=shape[0], out_channels=shape[0])
        self.class_embedding = nn.Embedding(num_class_embeds, 1) if num_class_embeds else None
        self.calls = []

    @property
    def dtype(self):
        return torch.float64

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        self.calls.append((sample, timestep, class_labels))
        return (self.predict(sample, timestep, class_labels),)


def exact_vp_model(abar: torch.Tensor, prediction_type: str) -> FakeUNet:
    """The exact epsilon / v / x predictor of N(MU, TAU^2) at integer training timesteps."""

    def predict(x_vp, t, labels):
        assert torch.allclose(t, t.round(), atol=1e-4), "grid sigmas must map to integer timesteps"
        ab = abar[t.round().long()].reshape(-1, 1, 1, 1)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        denom = a**2 * TAU**2 + b**2
        x0 = MU + a * TAU**2 * (x_vp - a * MU) / denom
        eps = b * (x_vp - a * MU) / denom
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - b * x0}[prediction_type]

    return FakeUNet(predict)


SCHEDULERS = [
    ("DDPMScheduler", {"beta_schedule": "linear"}),
    ("DDIMScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    ("EulerDiscreteScheduler", {"beta_schedule": "squaredcos_cap_v2"}),
]


@pytest.mark.parametrize("scheduler,kw", SCHEDULERS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_adapter_recovers_exact_gaussian_denoiser(scheduler, kw, prediction_type):
    abar = getattr(diffusers, scheduler)(num_train_timesteps=1000, **kw).alphas_cumprod.double()
    den = VPDenoiser(exact_vp_model(abar, prediction_type), abar, prediction_type).double()
    t = torch.tensor([0, 1, 37, 250, 500, 777, 999])
    sigma = ((1 - abar[t]) / abar[t]).sqrt()
    g = torch.Generator().manual_seed(0)
    x = MU + TAU * torch.randn((len(t), *SHAPE), generator=g, dtype=torch.float64)
    x_s = x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    got = den(x_s, sigma)
    want = sigma_form_exact(x_s, sigma)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_adapter_with_an_oracle_matches_diffusers_add_noise_and_velocity(prediction_type):
    """An oracle that knows (x, eps) returns diffusers' own target; the adapter must give back x exactly."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    abar = sched.alphas_cumprod.double()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((6, *SHAPE), generator=g, dtype=torch.float64)
    eps = torch.randn((6, *SHAPE), generator=g, dtype=torch.float64)
    t = torch.tensor([3, 100, 400, 650, 900, 999])
    x_vp_diffusers = sched.add_noise(x0, eps, t)
    target = {"epsilon": eps, "sample": x0, "v_prediction": sched.get_velocity(x0, eps, t)}[prediction_type]

    def oracle(x_vp, tt, labels):
        assert torch.allclose(x_vp, x_vp_diffusers, atol=1e-9), "adapter input differs from diffusers' add_noise"
        assert torch.allclose(tt, t.to(tt.dtype), atol=1e-4)
        return target

    den = VPDenoiser(FakeUNet(oracle), abar, prediction_type).double()
    sigma = ((1 - abar[t]) / abar[t]).sqrt()
    x_s = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    assert torch.allclose(den(x_s, sigma), x0, atol=1e-8)


def test_fractional_timesteps_interpolate_log_sigma():
    abar = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    den = VPDenoiser(FakeUNet(lambda *a: None), abar)
    sig = ((1 - abar) / abar).sqrt().numpy()
    query = np.array([sig[0], 0.05, 0.3, 1.0, 7.5, 80.0, sig[-1]])
    want = np.interp(np.log(query), np.log(sig), np.arange(1000))
    got = den.sigma_to_t(torch.tensor(query, dtype=torch.float32)).numpy()
    assert np.allclose(got, want, atol=2e-3)
    assert np.allclose(got[[0, -1]], [0, 999])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_adapter_matches_diffusers_preconditioning(prediction_type):
    """The EDM adapter against diffusers' EDMEulerScheduler precondition_inputs / noise / outputs."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 norm_num_groups=4).eval()
    sched = diffusers.EDMEulerScheduler(sigma_data=0.7, prediction_type=prediction_type)
    den = EDMDenoiser(unet, 0.7, prediction_type)
    x = torch.randn(4, 1, 8, 8)
    for s in (0.002, 0.3, 2.0, 80.0):
        sigma = torch.tensor(s)
        with torch.no_grad():
            out = unet(sched.precondition_inputs(x, sigma), sched.precondition_noise(sigma)).sample
            want = sched.precondition_outputs(x, out, sigma)
            got = den(x, sigma.expand(4))
        assert torch.allclose(got, want, atol=1e-5), s


def test_edm_adapter_recovers_exact_gaussian_denoiser():
    sd = 0.5

    def exact_f(x_in, c_noise, labels):
        sigma = (4 * c_noise).exp().reshape(-1, 1, 1, 1)
        x = x_in * (sigma**2 + sd**2).sqrt()
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        return (sigma_form_exact(x, sigma) - c_skip * x) / c_out

    den = EDMDenoiser(FakeUNet(exact_f), sd).double()
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    x_s = MU + torch.randn((5, *SHAPE), dtype=torch.float64) * (TAU**2 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()
    assert torch.allclose(den(x_s, sigma), sigma_form_exact(x_s, sigma), atol=1e-9)


# --------------------------------------------------------------------------- classifier-free guidance


def class_gaussian_model(abar, means: dict[int, torch.Tensor]) -> FakeUNet:
    """Exact epsilon predictor of N(means[c], TAU^2) for class label c (the null class has its own mean)."""

    def predict(x_vp, t, labels):
        ab = abar[t.round().long()].reshape(-1, 1, 1, 1)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        mu = torch.stack([means[int(c)][0] for c in labels])
        return b * (x_vp - a * mu) / (a**2 * TAU**2 + b**2)

    return FakeUNet(predict, num_class_embeds=11)


@pytest.mark.parametrize("g", [0.0, 1.0, 2.5, 7.0])
def test_guidance_is_unconditional_plus_g_times_difference(g):
    abar = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    means = {c: MU + 0.1 * c for c in range(11)}
    den = VPDenoiser(class_gaussian_model(abar, means), abar, "epsilon", guidance_scale=g, null_class=10).double()
    t = torch.tensor([10, 300, 700])
    sigma = ((1 - abar[t]) / abar[t]).sqrt()
    labels = torch.tensor([2, 5, 7])
    x_s = torch.randn((3, *SHAPE), dtype=torch.float64) * 2
    d_c = torch.cat([sigma_form_exact(x_s[i : i + 1], sigma[i : i + 1], means[int(c)]) for i, c in enumerate(labels)])
    d_u = sigma_form_exact(x_s, sigma, means[10])
    got = den(x_s, sigma, labels)
    assert torch.allclose(got, d_u + g * (d_c - d_u), atol=1e-8)
    if g == 1.0:
        assert torch.allclose(got, d_c, atol=1e-8)
    if g == 0.0:
        assert torch.allclose(got, d_u, atol=1e-8)
    # the same guidance written on epsilon (diffusers pipelines: eps_u + g (eps_c - eps_u)) gives the same D,
    # and the guided score is s_u + g (s_c - s_u)
    s4 = sigma.reshape(-1, 1, 1, 1)
    eps_c, eps_u = (x_s - d_c) / s4, (x_s - d_u) / s4
    assert torch.allclose(got, x_s - s4 * (eps_u + g * (eps_c - eps_u)), atol=1e-8)
    s_c, s_u = score_from_denoiser(d_c, x_s, sigma), score_from_denoiser(d_u, x_s, sigma)
    assert torch.allclose(score_from_denoiser(got, x_s, sigma), s_u + g * (s_c - s_u), atol=1e-6)


def test_guidance_batches_both_branches_in_one_call_and_needs_a_null_class():
    abar = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    model = class_gaussian_model(abar, {c: MU for c in range(11)})
    den = VPDenoiser(model, abar, "epsilon", guidance_scale=3.0, null_class=10).double()
    sigma = torch.full((2,), float(((1 - abar[50]) / abar[50]).sqrt()), dtype=torch.float64)
    den(torch.zeros((2, *SHAPE), dtype=torch.float64), sigma, torch.tensor([1, 2]))
    assert len(model.calls) == 1 and model.calls[0][2].tolist() == [10, 10, 1, 2]
    no_null = VPDenoiser(model, abar, "epsilon", guidance_scale=3.0).double()
    with pytest.raises(UserError, match="null_class"):
        no_null(torch.zeros((2, *SHAPE), dtype=torch.float64), sigma, torch.tensor([1, 2]))


def test_guidance_on_a_real_conditional_unet_and_copies_drop_it(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), cross_attention_dim=8, norm_num_groups=4, layers_per_block=1,
        num_class_embeds=11, attention_head_dim=2).eval()
    abar = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    den = VPDenoiser(unet, abar, "v_prediction", guidance_scale=2.0, null_class=10)
    x, sigma, labels = torch.randn(3, 1, 8, 8), torch.tensor([0.5, 2.0, 9.0]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        d_c, d_u = den.denoise(x, sigma, labels), den.denoise(x, sigma, torch.full((3,), 10))
        assert torch.allclose(den(x, sigma, labels), d_u + 2.0 * (d_c - d_u), atol=1e-5)
        copy = den.trainable_copy()
        assert copy.guidance_scale == 1.0 and all(p.requires_grad for p in copy.parameters())
        assert torch.allclose(copy(x, sigma, labels), d_c, atol=1e-6)


# --------------------------------------------------------------------------- loading from folders


def tiny_unet(**kw):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 norm_num_groups=4, **kw)


def test_load_pipeline_and_flat_folders(tmp_path):
    unet = tiny_unet().eval()
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    diffusers.DDIMScheduler(prediction_type="epsilon").save_pretrained(tmp_path / "pipe" / "scheduler")
    unet.save_pretrained(tmp_path / "flat")
    diffusers.EulerDiscreteScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "flat")
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.7, 3.0])
    pipe = load_denoiser(str(tmp_path / "pipe"))
    flat = load_denoiser(str(tmp_path / "flat"))
    assert pipe.kind == flat.kind == "vp" and len(pipe.sigmas) == 1000 and bool((pipe.sigmas.diff() > 0).all())
    assert pipe.denoiser.prediction_type == "epsilon" and flat.denoiser.prediction_type == "v_prediction"
    t = pipe.denoiser.sigma_to_t(sigma)
    with torch.no_grad():
        out = unet(x / (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1), t).sample
        s4 = sigma.reshape(-1, 1, 1, 1)
        assert torch.allclose(pipe.denoiser(x, sigma), x - s4 * out, atol=1e-5)
        assert torch.allclose(flat.denoiser(x, sigma), x / (1 + s4**2) - s4 / (1 + s4**2).sqrt() * out, atol=1e-5)


def test_load_edm_folder(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "edm" / "unet")
    diffusers.EDMEulerScheduler(sigma_min=0.01, sigma_max=40.0, sigma_data=0.6).save_pretrained(tmp_path / "edm" / "scheduler")
    loaded = load_denoiser(str(tmp_path / "edm"))
    assert loaded.kind == "edm" and loaded.denoiser.sigma_data == pytest.approx(0.6)
    assert float(loaded.sigmas[0]) == pytest.approx(0.01) and float(loaded.sigmas[-1]) == pytest.approx(40.0)


def test_bad_teacher_folders_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="does not exist"):
        load_denoiser(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no diffusers model: found nothing"):
        load_denoiser(str(tmp_path / "empty"))
    tiny_unet().save_pretrained(tmp_path / "nosched")
    with pytest.raises(UserError, match="scheduler_config.json"):
        load_denoiser(str(tmp_path / "nosched"))
    tiny_unet().save_pretrained(tmp_path / "corrupt")
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="missing or corrupt"):
        load_denoiser(str(tmp_path / "corrupt"))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{ nope")
    (tmp_path / "badjson" / "scheduler_config.json").write_text("{}")
    with pytest.raises(UserError, match="cannot read"):
        load_denoiser(str(tmp_path / "badjson"))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "vae" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    with pytest.raises(UserError, match="not supported"):
        load_denoiser(str(tmp_path / "vae"))
    with pytest.raises(UserError, match="nor in the Hugging Face cache.*huggingface-cli download nobody-here/no-such-model"):
        load_denoiser("nobody-here/no-such-model")
