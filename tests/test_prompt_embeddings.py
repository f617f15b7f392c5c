"""Text-conditional teachers: a ``UNet2DConditionModel`` conditioned on a table of precomputed prompt embeddings.

``teacher.embeddings`` names a .safetensors file of a text encoder's outputs (``embeddings``: one per prompt;
``null``: the empty prompt's, for guidance). Conditions are then prompt indices: drawn uniformly for each batch,
looked up as the UNet's ``encoder_hidden_states``, and the unconditional branch of guidance uses ``null``.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from scoredistill.cli import main
from scoredistill.config import resolve
from scoredistill.errors import UserError
from scoredistill.images.denoisers import EDMDenoiser
from scoredistill.roles import BuildContext, seeded_conditions

DIM, TOKENS, PROMPTS = 8, 4, 3


def _unet() -> diffusers.UNet2DConditionModel:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=DIM, attention_head_dim=2).eval()


def _embeddings(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(PROMPTS, TOKENS, DIM, generator=g), torch.randn(TOKENS, DIM, generator=g)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    _unet().save_pretrained(root / "teacher" / "unet")
    diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5).save_pretrained(root / "teacher" / "scheduler")
    e, null = _embeddings()
    save_file({"embeddings": e, "null": null}, str(root / "prompts.safetensors"))
    save_file({"embeddings": _embeddings(seed=2)[0]}, str(root / "other.safetensors"))
    return root


def test_prompt_indices_are_looked_up_and_guidance_uses_the_null_prompt():
    """Against the UNet's own embedding input: index k gives what embedding E[k] gives; the guided denoiser is
    D(null) + g (D(E[k]) - D(null)) with the file's null prompt (zeros when it has none)."""
    e, null = _embeddings()
    den = EDMDenoiser(_unet(), 0.5, "epsilon", guidance_scale=3.0)
    den.set_prompts(e, null)
    x, sigma, idx = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 4.0]), torch.tensor([2, 0])
    with torch.no_grad():
        d_c = den.denoise(x, sigma, e[idx])  # the float path: embeddings straight to encoder_hidden_states
        d_null = den.denoise(x, sigma, null.expand(2, TOKENS, DIM))
        assert torch.equal(den.denoise(x, sigma, idx), d_c)
        assert torch.allclose(den(x, sigma, idx), d_null + 3.0 * (d_c - d_null), atol=1e-5)
        assert not torch.allclose(d_c, d_null, atol=1e-3)  # the prompts reach the UNet: there is something to check
        zero = EDMDenoiser(_unet(), 0.5, "epsilon", guidance_scale=3.0)
        zero.set_prompts(e)
        d_zero = zero.denoise(x, sigma, torch.zeros(2, TOKENS, DIM))
        assert torch.allclose(zero(x, sigma, idx), d_zero + 3.0 * (d_c - d_zero), atol=1e-5)


def test_the_teacher_draws_prompts_uniformly_and_its_fingerprint_covers_them(hooks, folder, tmp_path):
    def teacher(file: str):
        config = resolve(hooks.registry, "dmd", "digits", [], [
            "teacher.component=diffusers_unet", f"teacher.path={folder / 'teacher'}", f"teacher.embeddings={folder / file}"])
        return hooks.make_teacher(spec=config.teacher, ctx=BuildContext(hooks=hooks, cache_dir=tmp_path))

    t = teacher("prompts.safetensors")
    c = t.sample_conditions(6000)
    assert c.dtype == torch.long and set(c.tolist()) == set(range(PROMPTS))  # never the null prompt's index
    assert (torch.bincount(c, minlength=PROMPTS).float() / len(c) - 1 / PROMPTS).abs().max() < 0.03
    assert torch.equal(seeded_conditions(t, 10, 4), seeded_conditions(t, 10, 4))
    assert t.num_classes is None and t.fingerprint() != teacher("other.safetensors").fingerprint()


@pytest.mark.parametrize("case, message", [
    ("missing", "no file"), ("no_key", "no tensor 'embeddings'"), ("wrong_dim", "cross_attention_dim 8"),
    ("bad_null", "'null' must have shape (4, 8)"), ("no_cross_attention", "no cross-attention")])
def test_bad_embeddings_are_one_line_errors(hooks, folder, tmp_path, case, message):
    teacher_dir = folder / "teacher"
    file = tmp_path / "e.safetensors"
    if case == "no_key":
        save_file({"prompts": torch.zeros(2, TOKENS, DIM)}, str(file))
    elif case == "wrong_dim":
        save_file({"embeddings": torch.zeros(2, TOKENS, DIM + 1)}, str(file))
    elif case == "bad_null":
        save_file({"embeddings": torch.zeros(2, TOKENS, DIM), "null": torch.zeros(TOKENS + 1, DIM)}, str(file))
    elif case == "no_cross_attention":
        from scoredistill.images.testing import tiny_diffusers_teacher_folder

        teacher_dir = tiny_diffusers_teacher_folder(tmp_path / "plain")
        save_file({"embeddings": torch.zeros(2, TOKENS, DIM)}, str(file))
    config = resolve(hooks.registry, "dmd", "digits", [], [
        "teacher.component=diffusers_unet", f"teacher.path={teacher_dir}", f"teacher.embeddings={file}"])
    with pytest.raises(UserError) as err:
        hooks.make_teacher(spec=config.teacher, ctx=BuildContext(hooks=hooks, cache_dir=tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_text_conditional_run_samples_with_prompt_indices_and_exports(folder, tmp_path):
    """A whole run: pairs solved with their prompts, G(z, c), sampling writes each sample's prompt index, export."""
    out = tmp_path / "run"
    sets = ["teacher.component=diffusers_unet", f"teacher.path={folder / 'teacher'}", f"teacher.embeddings={folder / 'prompts.safetensors'}",
            "teacher.guidance_scale=2.0", "teacher.sampler_steps=3", "pairs.num_pairs=16", "pairs.steps=3", "pairs.batch_size=8",
            "train.batch_size=6", "train.pair_batch_size=4", "train.steps=2", "train.fake_score_warmup_steps=0",
            "eval.num_samples=20", "runtime.progress=false"]
    assert main(["run", "dmd", "--preset", "digits", "--out", str(out), "--quiet", *[a for o in sets for a in ("--set", o)]]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_samples"] == 20 and m["non_finite"] == 0 and "label_accuracy" not in m
    assert main(["sample", str(out), "--num", "12", "--seed", "5", "--out", str(tmp_path / "s.npy")]) == 0
    import numpy as np

    prompts = np.load(tmp_path / "s_labels.npy")
    assert prompts.shape == (12,) and set(prompts.tolist()) <= set(range(PROMPTS))
    assert main(["export", str(out), str(tmp_path / "export")]) == 0
    assert f"on {PROMPTS} prompt embeddings" in (tmp_path / "export" / "README.md").read_text()
    # the README's recipe: the exported UNet, given the embeddings themselves, is the run's G(z, c) for prompt indices c
    from scoredistill.images.loading import load_denoiser
    from scoredistill.plugins import Hooks
    from scoredistill.trainer import load_run

    run = load_run(out, Hooks())
    g, exported = run.sampling_generator.eval(), load_denoiser(str(tmp_path / "export")).denoiser.eval()
    z, idx = torch.randn(4, 1, 8, 8), torch.tensor([0, 2, 1, 2])
    e = _embeddings()[0]
    with torch.no_grad():
        assert torch.allclose(exported(g.sigma * z, torch.full((4,), g.sigma), e[idx]), g(z, idx), atol=1e-5)
