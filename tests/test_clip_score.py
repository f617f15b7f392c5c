"""CLIP score of decoded samples against their prompts (transformers' CLIPModel from a local folder), and the teacher's
multi-step sampler on the same prompts and noise beside the generator (sample grid, metrics.json).

Independent computations: CLIP's preprocessing and towers written out by hand (the CLIP paper's normalisation
constants, ``vision_model`` / ``text_model`` and their projections) with ``100 * max(cos, 0)``; the teacher's samples
recomputed from the evaluation seed and decoded by the pipeline's own VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scoredistill.cli import main

PROMPTS = ["a cat", "the red dog", "a dog", "the cat", "red"]
#: CLIP's image normalisation (Radford et al. 2021; the released preprocessing)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from scoredistill.images.testing import tiny_clip_model_folder

    return tiny_clip_model_folder(tmp_path_factory.mktemp("clip") / "clip")


def _by_hand(images: torch.Tensor, prompts: list[str], folder: Path) -> torch.Tensor:
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder)).eval()
    tok = CLIPTokenizer.from_pretrained(str(folder))
    pixels = ((images + 1) * 127.5).round().clamp(0, 255) / 255  # uint8, as evaluated
    pixels = (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = torch.cat([model.text_projection(model.text_model(input_ids=tok([p], return_tensors="pt").input_ids).pooler_output)
                         for p in prompts])
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    return 100 * torch.where(cos > 0, cos, torch.zeros_like(cos))


def test_clip_score_is_100_max_cos_0(clip):
    from scoredistill.images.clip_score import clip_score, clip_scores, load_clip

    torch.manual_seed(0)
    images = torch.rand(12, 3, 16, 16) * 2 - 1
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(12)]
    model, processor = load_clip(str(clip), torch.device("cpu"))
    ours, want = clip_scores(images, prompts, model, processor, batch_size=5), _by_hand(images, prompts, clip)
    assert torch.allclose(ours, want, atol=1e-4) and (want > 0).any()
    assert abs(clip_score(images, prompts, model, processor) - float(want.mean())) < 1e-4
    flipped = _by_hand(-images, prompts, clip)  # (0 wherever CLIP finds the pair dissimilar)
    assert torch.allclose(clip_scores(-images, prompts, model, processor), flipped, atol=1e-4)


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    from scoredistill.images.testing import tiny_sd_pipeline_folder

    root = tmp_path_factory.mktemp("sd")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return tiny_sd_pipeline_folder(root / "pipe")


def _run(sd: Path, out: Path, *sets: str) -> int:
    base = ["teacher.sampler_steps=2", "train.batch_size=2", "train.steps=1", "eval.num_samples=6", "teacher.guidance_scale=2",
            "pairs.num_pairs=4", "pairs.steps=2", "pairs.batch_size=4", "train.pair_batch_size=2"]
    return main(["run", "dmd", "--teacher", str(sd), "--prompts", str(sd.parent / "prompts.txt"), "--out", str(out), "--quiet",
                 *[a for s in [*base, *sets] for a in ("--set", s)]])


def test_the_teacher_beside_the_generator_with_clip_scores(hooks, sd, clip, tmp_path, monkeypatch):
    """metrics.json: the generator's and the teacher's CLIP score on the same prompts (recomputed by hand from the
    teacher's own samples on the evaluation noise, decoded by the pipeline's VAE); the grid's rows are 'teacher (N NFE)'
    and 'generator', captioned with those prompts; scoredistill eval gives the same scores."""
    import diffusers

    from scoredistill.images import plots
    from scoredistill.roles import seeded_conditions
    from scoredistill.trainer import load_run

    monkeypatch.setenv("SCOREDISTILL_CACHE", str(tmp_path / "cache"))
    grids = []
    real_grids = plots.captioned_grids
    monkeypatch.setattr(plots, "captioned_grids", lambda panels, captions, *a, **k: (grids.append((panels, captions)),
                                                                                       real_grids(panels, captions, *a, **k)))
    assert _run(sd, tmp_path / "run", f"eval.clip_model={clip}") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    run = load_run(tmp_path / "run", hooks)
    teacher = run.models.teacher
    cond = seeded_conditions(teacher, 6, run.config.eval.seed)
    prompts = [PROMPTS[int(c)] for c in cond]
    z = torch.randn((6, *teacher.data_shape), generator=torch.Generator().manual_seed(run.config.eval.seed))
    vae = diffusers.AutoencoderKL.from_pretrained(str(sd / "vae"))
    with torch.no_grad():
        t_images = vae.decode(teacher.sample(z, cond=cond) / vae.config.scaling_factor).sample.clamp(-1, 1)
    assert metrics["teacher"]["clip_score"] == pytest.approx(float(_by_hand(t_images, prompts, clip).mean()), abs=1e-3)
    assert main(["sample", str(tmp_path / "run"), "--num", "6", "--seed", str(run.config.eval.seed), "--out", str(tmp_path / "g.npy")]) == 0
    with torch.no_grad():  # the generator's samples on the same noise and prompts, decoded as they are (latents unclamped)
        g_images = vae.decode(torch.from_numpy(np.load(tmp_path / "g.npy")) / vae.config.scaling_factor).sample.clamp(-1, 1)
    assert metrics["clip_score"] == pytest.approx(float(_by_hand(g_images, prompts, clip).mean()), abs=1e-3)
    assert metrics["clip_score"] != metrics["teacher"]["clip_score"]
    (panels, captions), = grids
    assert panels[0][0].startswith(f"teacher (Heun, {teacher.sampler_nfe} NFE): CLIP") and panels[1][0].startswith("generator (1 NFE)")
    assert captions == prompts and torch.allclose(panels[0][1].clamp(-1, 1), t_images, atol=1e-4)
    assert (tmp_path / "run" / "samples.png").is_file()
    assert main(["eval", str(tmp_path / "run"), "--num", "6", "--clip", str(clip)]) == 0
    again = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert again["clip_score"] == metrics["clip_score"] and again["teacher"]["clip_score"] == metrics["teacher"]["clip_score"]


def test_without_clip_weights_the_score_is_skipped_with_one_message(sd, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCOREDISTILL_CACHE", str(tmp_path / "cache"))
    assert _run(sd, tmp_path / "run") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["clip_score"] is None and "eval.clip_model" in metrics["clip_score_note"]
    assert len([line for line in capsys.readouterr().err.splitlines() if "CLIP score" in line]) == 1
    assert _run(sd, tmp_path / "bad", f"eval.clip_model={tmp_path / 'nowhere'}") == 2
    err = capsys.readouterr().err.strip()
    assert "eval.clip_model" in err and len(err.splitlines()) == 1 and not (tmp_path / "bad" / "history.json").exists()
