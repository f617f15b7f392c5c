"""``train.lora``: the generator and fake score as LoRA adapters on ONE frozen base shared with the teacher.

Checked against computations written out here: a LoRA layer is ``W0 x + (alpha / r) B A x`` (Hu et al.
2022, eq. 3) with the adapter of the role that calls it, and ``W0 x`` for the teacher; the base weights
live once in memory (counted among every tensor alive); gradients reach only the updated role's adapter;
gradient checkpointing gives the gradients of the plain backward; resume after SIGKILL is bitwise; an
exported LoRA loads with diffusers' own loader and gives the run's samples.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from scoredistill.cli import main
from scoredistill.config import resolve
from scoredistill.errors import UserError
from scoredistill.images.testing import tiny_diffusers_teacher_folder
from scoredistill.lora import AdapterView, LoraSettings, SharedBase, adapter_copy
from scoredistill.plugins import Hooks, make_plugin_manager
from scoredistill.roles import seeded_conditions
from scoredistill.run_dir import load_run
from scoredistill.trainer import build, setup, train_iteration

PROMPTS = "prompts.safetensors"


def sd_like_teacher_folder(folder: Path) -> Path:
    """A tiny random 1x8x8 ``UNet2DConditionModel`` (SD's blocks: cross-attention, resnets, time embedding), EDM config."""
    import diffusers

    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4).save_pretrained(folder / "unet")
    diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5).save_pretrained(folder / "scheduler")
    # precomputed prompt embeddings (3 prompts, 4 tokens, dim 8): a text-conditional teacher needs its conditions
    save_file({"embeddings": torch.randn(3, 4, 8), "null": torch.zeros(4, 8)}, str(folder / PROMPTS))
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return sd_like_teacher_folder(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_diffusers_teacher_folder(tmp_path_factory.mktemp("teacher"))


def overrides(folder: Path) -> list[str]:
    prompts = [f"teacher.embeddings={folder / PROMPTS}"] if (folder / PROMPTS).exists() else []
    return [*prompts, "teacher.component=diffusers_unet", f"teacher.path={folder}", "generator.component=unet_generator",
            "fake_score.component=unet_denoiser", "train.batch_size=4", "runtime.progress=false",
            "train.fake_score_warmup_steps=0", "train.sample_every=null", "eval.num_samples=8", "teacher.sampler_steps=2"]


def make_run(hooks, tmp_path, folder, *extra, name="run"):
    config = resolve(hooks.registry, "dmd", "digits", ["regression"], [*overrides(folder), *extra])
    run = build(config, hooks, tmp_path / name)
    setup(run)
    return run


def randomise(view: AdapterView, seed: int) -> None:
    """Non-zero adapters (B starts at zero), so that every role computes something of its own."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in view.adapter.values():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def test_a_lora_layer_is_w0_x_plus_scaled_b_a_x_for_its_role_and_w0_x_for_the_teacher(hooks, tmp_path, sd_folder):
    run = make_run(hooks, tmp_path, sd_folder, "train.lora.rank=2", "train.lora.alpha=3")
    gen_view, fake_view = run.models.generator.denoiser.unet, run.models.fake_score.denoiser.unet
    randomise(gen_view, 1)
    randomise(fake_view, 2)
    base = run.models.teacher.denoiser.unet
    shared = SharedBase.of(base)
    assert gen_view.base is base and fake_view.base is base
    x = torch.randn(5, 8)
    img = torch.randn(2, 8, 4, 4)
    for path, inputs in (("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", x),
                         ("down_blocks.0.resnets.0.conv1", img), ("time_embedding.linear_1", x)):
        layer = base.get_submodule(path)
        w0, b0 = layer.base_layer.weight, layer.base_layer.bias
        for role in ("generator", "fake_score"):
            a, b = layer.lora_A[role].weight, layer.lora_B[role].weight
            if inputs.ndim == 2:
                plain = F.linear(inputs, w0, b0)
                want = plain + 1.5 * (inputs @ a.T) @ b.T  # alpha / r = 3 / 2
            else:
                plain = F.conv2d(inputs, w0, b0, padding=1)
                want = plain + 1.5 * F.conv2d(F.conv2d(inputs, a, padding=1), b)
            with shared.using(role):
                torch.testing.assert_close(layer(inputs), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer(inputs), plain, rtol=1e-6, atol=1e-6)  # outside a view: the teacher's W0
    # the three roles give three different denoisers of the same input
    z = torch.randn(3, 1, 8, 8)
    sigma = torch.full((3,), 2.0)
    with torch.no_grad():
        outs = [run.models.teacher(z, sigma), run.models.generator.denoiser(z, sigma), run.models.fake_score(z, sigma, x_clean=z)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    assert shared.active is None


def _copies_in_memory(weights: list[torch.Tensor]) -> list[int]:
    """For each weight: how many distinct storages among all tensors alive hold exactly its values."""
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on torch's deprecated module attributes among gc's objects
        alive = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.numel() > 0]
    counts = []
    for w in weights:
        ptrs = {t.untyped_storage().data_ptr() for t in alive
                if t.shape == w.shape and t.dtype == w.dtype and torch.equal(t.detach(), w.detach())}
        counts.append(len(ptrs))
    return counts


def test_the_base_weights_are_in_memory_once_with_lora_and_four_times_without(hooks, tmp_path, folder):
    run = make_run(hooks, tmp_path, folder, "train.lora.rank=2", name="lora")
    base = run.models.teacher.denoiser.unet
    weights = [p for n, p in base.named_parameters() if "lora_" not in n and p.ndim > 1]
    assert len(weights) > 10 and _copies_in_memory(weights) == [1] * len(weights)
    gen, fake = (set(map(id, m.parameters())) for m in (run.models.generator, run.models.fake_score))
    adapters = {id(p) for n, p in base.named_parameters() if "lora_" in n}
    ema = set(map(id, run.ema.module.parameters()))  # the digits preset's EMA: a third adapter
    assert gen and fake and not gen & fake and not ema & (gen | fake) and gen | fake | ema == adapters
    del run, base, weights
    full = make_run(hooks, tmp_path, folder, name="full")
    weights = [p for p in full.models.teacher.denoiser.unet.parameters() if p.ndim > 1]
    assert _copies_in_memory(weights) == [4] * len(weights)  # the check counts: teacher, generator, fake score, EMA


def test_an_update_changes_only_its_roles_adapter_and_never_the_base(hooks, tmp_path, folder):
    run = make_run(hooks, tmp_path, folder, "train.lora.rank=2", "train.fake_score_warmup_steps=0")
    base = run.models.teacher.denoiser.unet
    frozen = {n: p.clone() for n, p in base.named_parameters() if "lora_" not in n}
    before = {role: [p.clone() for p in getattr(run.models, role).parameters()] for role in ("generator", "fake_score")}
    z, sigma = torch.randn(2, 1, 8, 8), torch.full((2,), 3.0)
    with torch.no_grad():
        teacher_out = run.models.teacher(z, sigma)
    # a generator-only backward: gradients on the generator's adapter alone
    loss = run.models.generator(torch.randn(2, 1, 8, 8)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in run.models.generator.parameters())
    assert all(p.grad is None for p in run.models.fake_score.parameters())
    assert all(p.grad is None for n, p in base.named_parameters() if "lora_" not in n)
    run.models.generator.zero_grad(set_to_none=True)
    for _ in range(2):
        train_iteration(run)
    for role in ("generator", "fake_score"):
        after = list(getattr(run.models, role).parameters())
        assert any(not torch.equal(a, b) for a, b in zip(after, before[role])), role
    assert all(torch.equal(p, frozen[n]) for n, p in base.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        assert torch.equal(run.models.teacher(z, sigma), teacher_out)


def _adapter_grads(run) -> list[torch.Tensor]:
    gen = run.models.generator
    gen.zero_grad(set_to_none=True)
    out = gen(torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    fake = run.models.fake_score(out, torch.full((3,), 1.5), x_clean=out)  # two roles in one graph
    (out.square().mean() + fake.square().mean()).backward()
    return [p.grad.clone() for p in gen.parameters()] + [p.grad.clone() for p in run.models.fake_score.parameters()]


@pytest.mark.parametrize("lora", [["train.lora.rank=2"], []], ids=["lora", "full"])
def test_gradient_checkpointing_recomputes_and_gives_the_plain_gradients(hooks, tmp_path, sd_folder, lora):
    plain = make_run(hooks, tmp_path, sd_folder, *lora, name="plain")
    if lora:
        randomise(plain.models.generator.denoiser.unet, 1)
        randomise(plain.models.fake_score.denoiser.unet, 2)
    want = _adapter_grads(plain)
    ckpt = make_run(hooks, tmp_path, sd_folder, *lora, "runtime.gradient_checkpointing=true", name="ckpt")
    with torch.no_grad():
        for mine, theirs in zip([*ckpt.models.generator.parameters(), *ckpt.models.fake_score.parameters()],
                                [*plain.models.generator.parameters(), *plain.models.fake_score.parameters()]):
            mine.copy_(theirs)
    calls = []
    blocks = {id(b): b for b in (role.denoiser.unet.down_blocks[0].resnets[0] for role in (ckpt.models.generator, ckpt.models.fake_score))}
    for block in blocks.values():  # one shared block with LoRA, two copies without
        block.register_forward_pre_hook(lambda *a: calls.append(1))  # (pre: a recomputation stops early)
    got = _adapter_grads(ckpt)
    assert len(calls) == 4  # generator + fake score, each run again in the backward
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_a_bf16_base_with_float32_adapters_trains(hooks, tmp_path, folder):
    run = make_run(hooks, tmp_path, folder, "train.lora.rank=2", "teacher.dtype=bf16")
    base = run.models.teacher.denoiser.unet
    assert {p.dtype for n, p in base.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in run.models.generator.parameters()} == {torch.float32}
    before = [p.clone() for p in run.models.generator.parameters()]
    for _ in range(2):
        losses = train_iteration(run)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(run.models.generator.parameters(), before))


def test_a_network_without_linear_or_convolution_layers_is_a_one_line_error():
    holder = nn.Module()
    holder.unet = nn.Sequential(nn.ReLU(), nn.Tanh())
    with pytest.raises(UserError, match="no linear or convolution layer"):
        adapter_copy(holder, "unet", "generator", LoraSettings(rank=2))


def _cli_args(folder: Path, out: Path, *extra: str) -> list[str]:
    sets = [a for o in [*overrides(folder), "train.steps=4", "train.checkpoint_every=2", "train.log_every=2",
                        "runtime.num_threads=1", *extra] for a in ("--set", o)]
    return ["run", "dmd", "--preset", "digits", "--ablate", "regression", "--out", str(out), "--quiet", *sets]


@pytest.mark.parametrize("setting,message", [
    ("train.lora.target_modules=[to_nothing]", "train.lora.target_modules: to_nothing match(es) no linear or convolution layer"),
    ("train.lora.rank=9", "train.lora.rank=9 is larger than layer"),
    ("train.lora.export=lora", "diffusers has no LoRA loader for UNet2DModel"),
    ("runtime.compile=true", "train.lora cannot be used when runtime.compile is on"),
])
def test_bad_lora_settings_are_one_line_errors_with_exit_code_2(folder, tmp_path, capsys, setting, message):
    lora = [] if setting.startswith("train.lora") else ["train.lora.rank=2"]
    assert main(_cli_args(folder, tmp_path / "run", setting, *lora)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_lora_on_networks_that_make_no_adapters_is_a_one_line_error(tmp_path, capsys):
    args = ["run", "dmd", "--preset", "toy2d", "--out", str(tmp_path / "run"), "--quiet", "--set", "train.lora.rank=2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "train.lora is set but generator 'mlp" in err and len(err.splitlines()) == 1


def test_sigkill_then_resume_with_lora_and_ema_is_bitwise_and_checkpoints_hold_adapters_only(folder, tmp_path):
    extra = ("train.lora.rank=2", "train.ema_decay=0.9", "train.steps=5", "train.log_every=1")
    reference = tmp_path / "reference"
    assert main(_cli_args(folder, reference, *extra)) == 0
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-m", "scoredistill.cli", "-p", "scoredistill.faults", *_cli_args(folder, killed, *extra)],
                          capture_output=True, text=True, env={**os.environ, "SCOREDISTILL_FAULT_SIGNAL": "3:SIGKILL"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (checkpoint,) = killed.glob("checkpoint-*")  # step 2's
    assert not (killed / "generator.safetensors").exists()
    tensors = load_file(str(checkpoint))
    trained = [k for k in tensors if not k.startswith("rng::") and k != "ema.n_averaged"]
    assert trained and all("lora_" in k for k in trained)  # adapters and their Adam states; no base weight
    assert main(["run", "--resume", str(killed), "--quiet"]) == 0
    for name in ("generator.safetensors", "generator_online.safetensors", "fake_score.safetensors"):
        a, b = load_file(str(killed / name)), load_file(str(reference / name))
        assert a.keys() == b.keys() and all("lora_" in k for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("form", ["lora", "merged"])
def test_an_export_reproduces_scoredistill_sample(sd_folder, tmp_path, form):
    run_dir, out = tmp_path / "run", tmp_path / "export"
    assert main(_cli_args(sd_folder, run_dir, "train.lora.rank=2", "train.generator_lr=0.05", f"train.lora.export={form}")) == 0
    assert main(["sample", str(run_dir), "--num", "4", "--seed", "3", "--out", str(tmp_path / "s.npy")]) == 0
    samples = torch.from_numpy(np.load(tmp_path / "s.npy"))
    assert main(["export", str(run_dir), str(out)]) == 0
    import diffusers

    from scoredistill.images.loading import load_denoiser

    if form == "lora":
        assert not (out / "unet").exists()
        den = load_denoiser(str(sd_folder)).denoiser  # the teacher, then the LoRA through diffusers' own loader
        den.unet.load_lora_adapter(str(out / "lora"), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
        assert isinstance(den.unet, diffusers.UNet2DConditionModel)
    else:
        den = load_denoiser(str(out)).denoiser
        assert not any("lora" in n for n, _ in den.unet.named_parameters())
    teacher = load_denoiser(str(sd_folder)).denoiser
    prompts = load_file(str(sd_folder / PROMPTS))
    for d in (den, teacher):  # the run's prompt table, and the conditions `sample --seed 3` drew (from seed + 1)
        d.set_prompts(prompts["embeddings"], prompts["null"])
    cond = seeded_conditions(load_run(run_dir, Hooks(make_plugin_manager())).models.teacher, 4, 3)
    z = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = den.eval()(80.0 * z, torch.full((4,), 80.0), cond)
        plain = teacher.eval()(80.0 * z, torch.full((4,), 80.0), cond)
    torch.testing.assert_close(x, samples, rtol=1e-4, atol=1e-5)
    assert (x - plain).abs().max() > 1e-3  # the adapter did change the teacher
