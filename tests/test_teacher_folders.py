"""``--teacher FOLDER``: tiny random-weight diffusers folders (saved with ``save_pretrained``) distilled end to end.

Each folder is what a user brings: a UNet2DModel with DDPM epsilon / v / zero-terminal-SNR v and a
learned timestep embedding; a class-conditional DiT pipeline; SD3- and Flux-shaped flow transformers
with precomputed prompt embeddings; a UNet with a FlowMatchEuler scheduler. Every adapter agrees with
the network called as diffusers' pipelines call it; ``dmd``, ``regression`` and ``dmd2`` run from the
command line; bad input is one line and exit code 2, before any training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from scoredistill.cli import main

diffusers = pytest.importorskip("diffusers")

TOKENS, TEXT_DIM, POOLED_DIM, PROMPTS = 3, 8, 8, 2


def _unet(**kw):
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 norm_num_groups=4, **kw)


def _pipeline(folder: Path, net, scheduler, net_dir: str) -> Path:
    net.save_pretrained(folder / net_dir)
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline", net_dir: ["diffusers", type(net).__name__],
                                                         "scheduler": ["diffusers", type(scheduler).__name__]}))
    return folder


def _embeddings(folder: Path, pooled: bool) -> Path:
    g = torch.Generator().manual_seed(3)
    tensors = {"embeddings": torch.randn(PROMPTS, TOKENS, TEXT_DIM, generator=g)}
    if pooled:
        tensors["pooled"] = torch.randn(PROMPTS, POOLED_DIM, generator=g)
    save_file(tensors, str(folder / "prompts.safetensors"))
    return folder / "prompts.safetensors"


def build(kind: str, folder: Path) -> tuple[Path, list[str]]:
    """A tiny teacher folder of ``kind`` and the ``--set`` overrides it needs (embeddings, size)."""
    torch.manual_seed(0)
    scaled = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if kind == "unet_eps":
        return _pipeline(folder, _unet(), diffusers.DDPMScheduler(prediction_type="epsilon"), "unet"), []
    if kind == "unet_v":
        return _pipeline(folder, _unet(), diffusers.DDIMScheduler(prediction_type="v_prediction", **scaled), "unet"), []
    if kind == "unet_zero_snr_v":
        sched = diffusers.DDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, **scaled)
        return _pipeline(folder, _unet(), sched, "unet"), []
    if kind == "unet_learned":
        return _pipeline(folder, _unet(time_embedding_type="learned", num_train_timesteps=1000), diffusers.DDPMScheduler(), "unet"), []
    if kind == "unet_flow":
        return _pipeline(folder, _unet(), diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), "unet"), []
    if kind == "dit":
        net = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=1, out_channels=2,
                                              num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=3)
        return _pipeline(folder, net, diffusers.DDIMScheduler(), "transformer"), []
    if kind == "sd3":
        net = diffusers.SD3Transformer2DModel(sample_size=4, patch_size=2, in_channels=2, num_layers=2, attention_head_dim=4,
                                              num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=8,
                                              pooled_projection_dim=POOLED_DIM, out_channels=2, pos_embed_max_size=4)
        _pipeline(folder, net, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), "transformer")
        return folder, [f"teacher.embeddings={_embeddings(folder, True)}"]
    if kind == "flux":
        net = diffusers.FluxTransformer2DModel(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                               num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
                                               guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64)
        _pipeline(folder, net, sched, "transformer")
        return folder, [f"teacher.embeddings={_embeddings(folder, True)}", "teacher.sample_size=4"]
    raise ValueError(kind)


KINDS = ["unet_eps", "unet_v", "unet_zero_snr_v", "unet_learned", "unet_flow", "dit", "sd3", "flux"]
TINY = ["pairs.num_pairs=8", "pairs.steps=3", "pairs.batch_size=8", "train.batch_size=4", "train.pair_batch_size=4",
        "train.steps=2", "eval.num_samples=8", "teacher.sampler_steps=3", "train.checkpoint_every=null"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    base = tmp_path_factory.mktemp("teachers")
    return {kind: build(kind, base / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of 8x8 grey images: the real data of dmd2's GAN for the 1x8x8 teachers."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(folder / f"{i:02d}.png")
    return folder


def _teacher(folder: Path, sets: list[str]):
    from scoredistill.images.teachers import DiffusersTeacher

    kw = {s.split("=", 1)[0].split(".", 1)[1]: s.split("=", 1)[1] for s in sets}
    return DiffusersTeacher(DiffusersTeacher.Config(path=str(folder), **kw))


# --------------------------------------------------------------------------- the adapters against the networks' own calls


def test_the_teachers_say_their_family(folders):
    said = {k: (t.parameterisation, t.conditioning, t.data_shape, t.terminal)
            for k, t in ((k, _teacher(*folders[k])) for k in KINDS)}
    assert said["unet_eps"] == ("vp", "none", (1, 8, 8), False)
    assert said["unet_zero_snr_v"] == ("vp", "none", (1, 8, 8), True)
    assert said["unet_flow"] == ("flow", "none", (1, 8, 8), True)
    assert said["dit"] == ("vp", "class", (1, 4, 4), False)
    assert said["sd3"] == ("flow", "text", (2, 4, 4), True)
    assert said["flux"] == ("flow", "text", (2, 4, 4), True)


def test_dit_is_the_ddim_x0_of_its_first_half_with_its_null_class(folders):
    teacher = _teacher(*folders["dit"])
    assert teacher.denoiser.null_class == 3 and teacher.sample_conditions(500).unique().tolist() == [0, 1, 2]
    config = diffusers.DDIMScheduler.load_config(str(folders["dit"][0] / "scheduler"))
    sched = diffusers.DDPMScheduler.from_config(config, clip_sample=False)  # its step's x0, unclipped
    net, x, t, labels = teacher.denoiser.unet, torch.randn(3, 1, 4, 4), torch.tensor([10, 400, 990]), torch.tensor([0, 2, 1])
    abar = sched.alphas_cumprod[t]
    sigma = ((1 - abar) / abar).sqrt()
    with torch.no_grad():
        eps = net(x, t, class_labels=labels).sample[:, :1]  # learned sigma: the first half of the channels
        want = torch.stack([sched.step(eps[i : i + 1], int(t[i]), x[i : i + 1]).pred_original_sample[0] for i in range(3)])
        got = teacher(x / abar.sqrt().reshape(-1, 1, 1, 1), sigma, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _flow_x0(net_call, x_t, t):
    v = net_call(x_t, t)
    return x_t - t.reshape(-1, 1, 1, 1) * v


def test_sd3_is_the_flow_x0_of_tokens_and_pooled_embeddings(folders):
    teacher = _teacher(*folders["sd3"])
    e = teacher.denoiser.prompt_embeddings
    p = teacher.denoiser.prompt_pooled
    idx, x_t, t = torch.tensor([0, 1, 1]), torch.randn(3, 2, 4, 4), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        want = _flow_x0(lambda x, tt: teacher.denoiser.unet(x, encoder_hidden_states=e[idx], pooled_projections=p[idx],
                                                              timestep=1000 * tt).sample, x_t, t)
        sigma = t / (1 - t)
        got = teacher(x_t / (1 - t).reshape(-1, 1, 1, 1), sigma, idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_flux_packs_latents_and_passes_ids_timestep_fraction_and_guidance(folders):
    teacher = _teacher(*folders["flux"])
    den = teacher.denoiser
    idx, x_t, t = torch.tensor([1, 0]), torch.randn(2, 2, 4, 4), torch.tensor([0.3, 0.8])

    def pipeline_call(x, tt):  # as FluxPipeline calls the transformer (written out here, independently of the adapter)
        n, c, h, w = x.shape
        packed = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        out = den.unet(packed, encoder_hidden_states=den.prompt_embeddings[idx], pooled_projections=den.prompt_pooled[idx],
                       timestep=tt, img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TOKENS, 3),
                       guidance=torch.full((n,), 3.5)).sample
        return out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)

    with torch.no_grad():
        want = _flow_x0(pipeline_call, x_t, t)
        got = teacher(x_t / (1 - t).reshape(-1, 1, 1, 1), t / (1 - t), idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert teacher.flow_mu == pytest.approx(0.5 + (1.15 - 0.5) * (4 - 4) / (64 - 4))  # 2x2 tokens: the base shift


# --------------------------------------------------------------------------- end to end from the command line

# dmd2's GAN needs real images: the 1x8x8 teachers take a folder of them (teacher.data=FOLDER)
RUNS = [("unet_eps", "dmd"), ("unet_v", "regression"), ("unet_zero_snr_v", "dmd"), ("unet_learned", "dmd2"),
        ("unet_flow", "dmd"), ("unet_flow", "dmd2"), ("dit", "dmd"), ("dit", "regression"), ("sd3", "dmd"),
        ("flux", "dmd"), ("flux", "regression")]


@pytest.mark.parametrize("kind,method", RUNS)
def test_teacher_folder_runs_end_to_end(folders, images, kind, method, tmp_path, capsys):
    folder, extra = folders[kind]
    out = tmp_path / "run"
    data = [f"teacher.data={images}", "train.fake_updates_per_step=2"] if method == "dmd2" else []
    sets = [a for o in TINY + extra + data for a in ("--set", o)]
    assert main(["run", method, "--teacher", str(folder), "--out", str(out), "--quiet", *sets]) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["non_finite"] == 0 and m["num_samples"] == 8
    config = (out / "config.yaml").read_text()
    assert "preset: teacher" in config and "component: diffusers" in config


def test_a_flow_transformer_run_exports_what_the_teacher_says(folders, tmp_path):
    folder, extra = folders["sd3"]
    out = tmp_path / "run"
    assert main(["run", "regression", "--teacher", str(folder), "--out", str(out), "--quiet",
                 *[a for o in TINY + extra for a in ("--set", o)]]) == 0
    assert main(["export", str(out), str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "scoredistill_generator.json").read_text())
    assert info["network"] == "transformer" and info["preconditioning"]["type"] == "flow"
    assert info["preconditioning"]["model_class"] == "SD3Transformer2DModel"
    assert (tmp_path / "export" / "transformer" / "config.json").is_file()


# --------------------------------------------------------------------------- bad input: one line, exit 2, before training


def _fails(args: list[str], capsys, *needles: str) -> None:
    _fails.calls = getattr(_fails, "calls", 0) + 1
    out = Path(args[args.index("--out") + 1]) / str(_fails.calls) if "--out" in args else None
    if out is not None:
        args = [*args[: args.index("--out") + 1], str(out), *args[args.index("--out") + 2 :]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_teacher_folders_are_one_line_errors(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = ["run", "dmd", "--out", str(tmp_path / "never"), "--teacher"]
    _fails(run + [str(folders["sd3"][0])], capsys, "text-conditional", "teacher.embeddings")
    _fails(["run", "dmd", "--preset", "teacher", "--out", str(tmp_path / "never")], capsys, "no teacher given", "--teacher")
    _fails(run + [str(folders["flux"][0]), "--set", f"teacher.embeddings={folders['flux'][0] / 'prompts.safetensors'}"],
           capsys, "teacher.sample_size")
    vae = tmp_path / "vae"
    (vae / "transformer").mkdir(parents=True)
    (vae / "transformer" / "config.json").write_text(json.dumps({"_class_name": "HunyuanDiT2DModel"}))
    _fails(run + [str(vae)], capsys, "'HunyuanDiT2DModel'", "not supported", "FluxTransformer2DModel")
    nosched = tmp_path / "nosched"
    _unet().save_pretrained(nosched / "unet")
    _fails(run + [str(nosched)], capsys, "no scheduler config")
    empty = tmp_path / "pipe"
    (empty / "text_encoder").mkdir(parents=True)
    (empty / "model_index.json").write_text("{}")
    _fails(run + [str(empty)], capsys, "found model_index.json, text_encoder/", "transformer/")
    _fails(run + ["nobody-here/no-such-model"], capsys, "huggingface-cli download nobody-here/no-such-model")
    cc = tmp_path / "cc"
    _pipeline(cc, _unet(num_class_embeds=4), diffusers.DDPMScheduler(), "unet")
    _fails(run + [str(cc)], capsys, "class-conditional", "teacher.null_class")
    assert not list((tmp_path / "never").rglob("checkpoints"))  # nothing trained


def test_an_sd_style_unet_without_embeddings_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                          cross_attention_dim=8, norm_num_groups=4, layers_per_block=1, attention_head_dim=2)
    _pipeline(tmp_path / "sd", unet, diffusers.DDIMScheduler(), "unet")
    _fails(["run", "dmd", "--teacher", str(tmp_path / "sd")], capsys, "text-conditional", "teacher.embeddings")


def test_compare_takes_a_teacher_folder(folders, tmp_path, capsys):
    folder, extra = folders["unet_eps"]
    out = tmp_path / "cmp"
    assert main(["compare", "dmd", "regression", "--teacher", str(folder), "--out", str(out), "--quiet",
                 *[a for o in TINY + extra for a in ("--set", o)]]) == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "dmd" in table and "regression" in table
