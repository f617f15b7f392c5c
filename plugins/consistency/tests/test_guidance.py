"""LCM's guidance-scale embedding (Luo et al. 2023, Sec. 4.2): the embedding against diffusers' formula written out,
the LCM loss with w drawn per sample written out, a tiny class-conditional LCM run whose student changes with w
(``sample --guidance-scale``), and a UNet2DConditionModel student that loads in diffusers with ``time_cond_proj_dim``
and runs in ``LatentConsistencyModelPipeline`` (LCMScheduler)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from scoredistill.cli import main
from scoredistill.config import resolve
from scoredistill.roles import GeneratorBatch
from scoredistill.trainer import build
from scoredistill_consistency.guidance import GuidanceEmbedding, guidance_scale_embedding

TOY = ["train.batch_size=64", "eval.num_samples=200", "runtime.progress=false", "train.sample_every=null",
       "generator.teacher_init_steps=0", "teacher.class_conditional=true"]


def test_embedding_is_diffusers_formula():
    """diffusers' get_guidance_scale_embedding (VDM's timestep embedding of 1000 w), written out element by element."""
    w = torch.tensor([0.0, 0.5, 3.0, 7.25])
    for dim in (256, 7):
        half = dim // 2
        expected = torch.zeros(len(w), dim)
        for i, wi in enumerate(w.tolist()):
            for k in range(half):
                f = math.exp(-k * math.log(10000.0) / (half - 1))
                expected[i, k] = math.sin(1000.0 * wi * f)
                expected[i, half + k] = math.cos(1000.0 * wi * f)
        # float32 arguments up to 7250: their rounding (ulp 5e-4) bounds the agreement with this float64 reference
        torch.testing.assert_close(guidance_scale_embedding(w, dim), expected, rtol=0, atol=1e-3)
    from diffusers import LatentConsistencyModelPipeline

    ours = guidance_scale_embedding(w, 64)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=64)
    torch.testing.assert_close(ours, theirs)


def test_lcm_loss_with_w_per_sample_written_out(hooks, tmp_path):
    """Algorithm 1 of LCM: w ~ U[w_min, w_max] per sample, the guided Euler step at that w, student and target both
    conditioned on it; (x_0, c) real pairs (each sample with its own component)."""
    run = build(resolve(hooks.registry, "lcm", "toy2d", [], TOY + ["generator.guidance_range=[1.5,5.0]"]), hooks, tmp_path)
    teacher, g, loss = run.models.teacher, run.models.generator, run.losses["consistency"]
    assert g.takes_guidance_scale
    with torch.no_grad():
        g.guidance.proj.weight.normal_()  # the embedding matters (it starts at zero) ...
    loss.target.network.load_state_dict(g.state_dict())  # ... in the target too: theta- = theta at the first step
    means, var = teacher.means, teacher.stds[0] ** 2
    z = torch.randn(64, 2)
    torch.manual_seed(4)
    value = loss(GeneratorBatch(z=z, x=z, cond=torch.zeros(64, dtype=torch.long)), run.models)
    torch.manual_seed(4)
    x0, c = teacher.real_labelled_samples(64)
    i = torch.randint(0, 1000 - 20, (64,))
    s_n, s_next = teacher.sigmas[i], teacher.sigmas[i + 20]
    x_next = x0 + s_next[:, None] * torch.randn_like(x0)
    w = 1.5 + 3.5 * torch.rand(64)
    xd, s2 = x_next.double(), s_next.double()[:, None] ** 2
    d_c = means[c] + var / (var + s2) * (xd - means[c])
    logits = -((xd[:, None] - means[None]) ** 2).sum(-1) / (2 * (var + s2))
    d_u = (torch.softmax(logits, 1)[..., None] * (means[None] + (var / (var + s2))[..., None] * (xd[:, None] - means[None]))).sum(1)
    d_w = (d_u + w.double()[:, None] * (d_c - d_u)).float()
    x_hat = x_next + (s_n - s_next)[:, None] * (x_next - d_w) / s_next[:, None]
    with torch.no_grad():
        target = copy.deepcopy(g).denoise(x_hat, s_n, c, guidance=w)
    pred = g.denoise(x_next, s_next, c, guidance=w)
    c_huber = 0.00054 * math.sqrt(2)
    expected = ((((pred - target) ** 2).sum(1) + c_huber**2).sqrt() - c_huber).mean()
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6)
    # the embedding conditions the network: another w, another output; the EMA copy follows its own w
    x, s = torch.randn(8, 2), teacher.sigmas[500].expand(8)
    with torch.no_grad():
        assert not torch.allclose(g.denoise(x, s, c[:8], guidance=2.0), g.denoise(x, s, c[:8], guidance=4.0))
        twin = copy.deepcopy(g)
        torch.testing.assert_close(twin.denoise(x, s, c[:8], guidance=3.0), g.denoise(x, s, c[:8], guidance=3.0))


def test_lcm_run_student_changes_with_w(tmp_path, capsys):
    base = ["--preset", "toy2d", "--quiet", "--set", "train.steps=150", "--set", "train.batch_size=128",
            "--set", "eval.num_samples=100", "--set", "train.sample_every=null", "--set", "generator.teacher_init_steps=100",
            "--set", "teacher.class_conditional=true", "--set", "generator.guidance_range=[1.0,4.0]"]
    run_dir = tmp_path / "lcm"
    assert main(["run", "lcm", "--out", str(run_dir), *base]) == 0
    out = {}
    for gs in ("1", "4"):
        assert main(["sample", str(run_dir), "--num", "200", "--out", str(tmp_path / f"g{gs}.npy"), "--steps", "2",
                     "--guidance-scale", gs]) == 0
        out[gs] = np.load(tmp_path / f"g{gs}.npy")
    assert np.abs(out["1"] - out["4"]).mean() > 0.05, np.abs(out["1"] - out["4"]).mean()
    assert main(["sample", str(run_dir), "--num", "10", "--out", str(tmp_path / "bad.npy"), "--guidance-scale", "nan"]) == 2
    capsys.readouterr()
    # a generator without the embedding (a fixed w): --guidance-scale is one line, exit code 2
    fixed = tmp_path / "fixed"
    assert main(["run", "lcm", "--out", str(fixed), *base, "--set", "train.steps=2", "--set", "generator.guidance_embedding=0",
                 "--set", "losses.consistency.guidance_scale=2"]) == 0
    capsys.readouterr()
    assert main(["sample", str(fixed), "--num", "10", "--out", str(tmp_path / "bad.npy"), "--guidance-scale", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not conditioned on a guidance scale" in err[0], err


def test_embedding_in_unet2dcondition_loads_in_diffusers(tmp_path):
    """The student's UNet2DConditionModel records time_cond_proj_dim: saved, it loads in diffusers, takes diffusers'
    timestep_cond for w = g - 1 with the same output, and LatentConsistencyModelPipeline (LCMScheduler) samples with it."""
    import diffusers

    from scoredistill.images.loading import load_denoiser
    from scoredistill.images.testing import tiny_sd_pipeline_folder

    folder = tiny_sd_pipeline_folder(tmp_path / "pipe")
    den = load_denoiser(str(folder)).denoiser.trainable_copy()
    embedding = GuidanceEmbedding(16)
    assert embedding.attach(den)
    assert den.unet.config.time_cond_proj_dim == 16
    with torch.no_grad():
        den.unet.time_embedding.cond_proj.weight.normal_(0, 0.5)
    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 3, 16)
    with torch.no_grad(), embedding.scale(torch.tensor([3.0, 3.0])):
        ours = den.unet(x, t, encoder_hidden_states=text).sample
    den.unet.save_pretrained(str(folder / "unet"))
    loaded = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    assert loaded.config.time_cond_proj_dim == 16
    cond = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([2.0, 2.0]), embedding_dim=16)
    with torch.no_grad():
        theirs = loaded(x, t, encoder_hidden_states=text, timestep_cond=cond).sample
        plain = loaded(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs, plain)
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        str(folder), unet=loaded, scheduler=diffusers.LCMScheduler.from_pretrained(str(folder / "scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = [pipe("a cat", num_inference_steps=2, guidance_scale=gs, output_type="pt", height=16, width=16,
                   generator=torch.Generator().manual_seed(0)).images for gs in (2.0, 6.0)]
    assert images[0].shape == (1, 3, 16, 16) and not torch.allclose(images[0], images[1])


def _fewstep(hooks, folder, capsys, **settings):
    from scoredistill.roles import BuildContext

    reg = hooks.registry
    tcls = reg.component("teacher", "diffusers_unet").cls
    teacher = tcls(tcls.Config(path=str(folder), null_class=0), None).eval().requires_grad_(False)
    cls = reg.component("generator", "fewstep_generator").cls
    capsys.readouterr()
    g = cls(cls.Config(**settings), BuildContext(hooks=hooks, teacher=teacher))
    return g, capsys.readouterr().err


def test_embedding_in_a_class_conditional_unet2dmodel_and_no_place_in_dit(hooks, tmp_path, capsys):
    """A UNet2DModel takes the embedding through its time embedding's cond_proj (diffusers' layer, fed by this plugin);
    a DiT has no place for it: one message, and the generator stays a fixed-w one."""
    import diffusers

    from scoredistill.images.testing import tiny_diffusers_teacher_folder

    g, err = _fewstep(hooks, tiny_diffusers_teacher_folder(tmp_path / "unet", num_class_embeds=4), capsys,
                      parameterization="consistency", guidance_embedding=8)
    assert g.takes_guidance_scale and err == ""
    x, s, c = torch.randn(2, 1, 8, 8), torch.full((2,), 2.0), torch.tensor([1, 2])
    with torch.no_grad():
        before = g.denoise(x, s, c, guidance=2.0)
        torch.testing.assert_close(before, g.denoise(x, s, c, guidance=6.0))  # zero at initialisation: the teacher's copy
        g.denoiser.unet.time_embedding.cond_proj.weight.normal_()
        assert not torch.allclose(g.denoise(x, s, c, guidance=2.0), g.denoise(x, s, c, guidance=6.0))
    torch.manual_seed(0)
    dit = tmp_path / "dit"
    diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=1, out_channels=2, num_layers=2,
                                    sample_size=4, patch_size=2, num_embeds_ada_norm=3).save_pretrained(dit / "transformer")
    diffusers.DDIMScheduler().save_pretrained(dit / "scheduler")
    g, err = _fewstep(hooks, dit, capsys, parameterization="consistency", guidance_embedding=8)
    assert not g.takes_guidance_scale
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "has no place for LCM's guidance-scale embedding" in lines[0], lines


def test_export_of_a_guided_fewstep_generator_reproduces_its_samples(hooks, tmp_path, capsys):
    """``export`` of an LCM-style generator on a class-conditional EDM UNet2DModel: from the folder alone (diffusers'
    UNet2DModel, the cond_proj weight, scoredistill_generator.json) the chain written out here gives the generator's
    own samples at a guidance scale; an MLP generator refuses in one line."""
    import json

    import diffusers
    from safetensors.torch import load_file

    from scoredistill.errors import UserError
    from scoredistill.images.testing import tiny_diffusers_teacher_folder

    g, _ = _fewstep(hooks, tiny_diffusers_teacher_folder(tmp_path / "teacher", num_class_embeds=4), capsys,
                    parameterization="consistency", guidance_embedding=8, steps=2)
    with torch.no_grad():
        g.denoiser.unet.time_embedding.cond_proj.weight.normal_()
    g.eval()
    folder = tmp_path / "export"
    folder.mkdir()
    g.export(folder, {"method": "lcm", "preset": "teacher"})
    info = json.loads((folder / "scoredistill_generator.json").read_text())
    assert info["guidance"]["embedding_dim"] == 8 and (folder / "scheduler" / "scheduler_config.json").is_file()
    unet = diffusers.UNet2DModel.from_pretrained(str(folder / info["network"])).eval()
    cond_proj = load_file(str(folder / "guidance_cond_proj.safetensors"))["weight"]
    sd, s_min, gs = info["sigma_data"], info["sigma_min"], 3.0
    w_emb = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.full((4,), gs - 1), embedding_dim=8)

    def G(x, s, c):  # the network by hand: EDM preconditioning, the embedding added to the time embedding's input
        t_emb = unet.time_proj(torch.full((4,), math.log(s) / 4)).to(x.dtype) + w_emb @ cond_proj.T
        emb = unet.time_embedding.linear_2(unet.time_embedding.act(unet.time_embedding.linear_1(t_emb))) + unet.class_embedding(c)
        h = unet.conv_in(x / math.sqrt(s**2 + sd**2))
        skips = [h]
        for block in unet.down_blocks:
            h, res = block(hidden_states=h, temb=emb)
            skips += res
        h = unet.mid_block(h, emb)
        for block in unet.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            h = block(h, res, emb)
        out = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
        d = sd**2 / (s**2 + sd**2) * x + s * sd / math.sqrt(s**2 + sd**2) * out
        raw = (d - sd**2 / (s**2 + sd**2) * x) / (s * sd / math.sqrt(s**2 + sd**2))
        return sd**2 / ((s - s_min) ** 2 + sd**2) * x + sd * (s - s_min) / math.sqrt(sd**2 + s**2) * raw

    z, eps, c = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 1])
    s0, s1 = info["chain_sigmas"]
    with torch.no_grad():
        expected = G(G(s0 * z, s0, c) + s1 * eps, s1, c)
        ours = g.sample(z, c, noise=lambda: eps, guidance=gs)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    mlp = build(resolve(hooks.registry, "lcm", "toy2d", [], TOY), hooks, tmp_path / "toy").models.generator
    with pytest.raises(UserError, match="MLP of flat data") as info:
        mlp.export(tmp_path / "none", {"method": "lcm", "preset": "toy2d"})
    assert "\n" not in str(info.value)
