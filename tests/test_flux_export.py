"""A run on a tiny random-weight Flux-shaped pipeline (CLIP + T5, guidance embedding, packed latents) exports as a
diffusers pipeline that FluxPipeline loads, and whose one step reproduces ``scoredistill sample`` with diffusers alone:
by the recipe its README gives (packed latents, the distilled guidance embedding), and by FluxPipeline's own packing."""

from __future__ import annotations

import json
import re

import numpy as np
import torch

from scoredistill.cli import main

PROMPTS = ["a cat", "the red dog", "a dog", "the cat", "red"]


def test_a_flux_run_exports_a_pipeline_that_reproduces_sample(tmp_path, monkeypatch):
    import diffusers

    from scoredistill.images.testing import tiny_flow_pipeline_folder

    monkeypatch.setenv("SCOREDISTILL_CACHE", str(tmp_path / "cache"))
    folder = tiny_flow_pipeline_folder(tmp_path / "flux", "flux")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    sets = ["teacher.sample_size=4", "teacher.max_sequence_length=8", "teacher.flux_guidance=2.5", "teacher.sampler_steps=2",
            "train.batch_size=2", "train.steps=2", "eval.num_samples=4"]
    assert main(["run", "dmd", "--ablate", "regression", "--teacher", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(tmp_path / "run"), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    assert main(["sample", str(tmp_path / "run"), "--num", "3", "--seed", "5", "--out", str(tmp_path / "s.npy")]) == 0
    x, labels = torch.from_numpy(np.load(tmp_path / "s.npy")), np.load(tmp_path / "s_labels.npy")
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "export"))
    assert isinstance(pipe, diffusers.FluxPipeline) and x.shape == (3, 2, 4, 4)
    prompts = [PROMPTS[i] for i in labels]

    readme = (tmp_path / "export" / "README.md").read_text()
    recipe = re.findall(r"```python\n(.*?)```", readme, re.S)[-1]  # the README's own code, run as a user would
    assert "guidance_scale=2.5" in recipe and "max_sequence_length=8" in recipe
    scope = {"torch": torch, "pipe": pipe, "prompts": prompts, "N": 3, "S": 5}
    with torch.no_grad():
        exec(recipe, scope)
    assert float((scope["latents"] - x).abs().max()) < 1e-3

    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    h, w = 4 * pipe.vae_scale_factor, 4 * pipe.vae_scale_factor
    with torch.no_grad():  # FluxPipeline's own packing and unpacking
        out = pipe(prompts, latents=pipe._pack_latents(z, 3, 2, 4, 4), height=h, width=w, num_inference_steps=1,
                   guidance_scale=2.5, max_sequence_length=8, output_type="latent").images
        images = pipe(prompts[:1], latents=pipe._pack_latents(z[:1], 1, 2, 4, 4), height=h, width=w, num_inference_steps=1,
                      guidance_scale=2.5, max_sequence_length=8, output_type="np").images
    assert float((pipe._unpack_latents(out, h, w, pipe.vae_scale_factor) - x).abs().max()) < 1e-3
    assert images.shape == (1, h, w, 3) and np.isfinite(images).all()
