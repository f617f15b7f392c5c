"""Prompt sets: reading prompts files, the sharded prompt-embedding cache (lazy, resumable, reused), and a text-to-image
pipeline folder (SD1.5-shaped, tiny random weights) conditioned through it with its own CLIP encoder.

The pipeline's own ``encode_prompt`` and classifier-free guidance (``uncond + g * (cond - uncond)`` on its noise
prediction, turned into ``x_0`` by its scheduler's ``step``) are the independent computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scoredistill.cli import main
from scoredistill.errors import UserError
from scoredistill.images.prompts import PromptTable, prompt_tables, read_prompts

PROMPTS = ["a cat", "the red dog", "a dog", "the cat", "red", "a red cat", "dog"]


# --------------------------------------------------------------------------- prompts files


def test_prompts_files_of_each_type(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\nthe red dog\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "n": 1}\n\n{"prompt": "the red dog"}\n')
    (tmp_path / "p.csv").write_text('id,caption\n1,a cat\n2,"the red dog"\n')
    assert read_prompts(str(tmp_path / "p.txt")) == ["a cat", "the red dog"]  # blank lines are no prompts
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["a cat", "the red dog"]
    assert read_prompts(str(tmp_path / "p.csv"), "caption") == ["a cat", "the red dog"]


@pytest.mark.parametrize("name, content, column, message", [
    ("empty.txt", "\n \n", "prompt", "holds no prompt"),
    ("missing.txt", None, "prompt", "does not exist"),
    ("bad.txt", b"\xff\xfe\xfa", "prompt", "cannot read the prompts file"),
    ("p.csv", "id,text\n1,a cat\n", "prompt", "has no column 'prompt' (columns: id, text)"),
    ("p.jsonl", '{"text": "a cat"}\n', "prompt", "line 1: no text field 'prompt'"),
    ("p.json", "[]", "prompt", "unknown type '.json'"),
])
def test_bad_prompts_files_are_one_line_errors(tmp_path, name, content, column, message):
    file = tmp_path / name
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        file.write_text(content)
    with pytest.raises(UserError) as err:
        read_prompts(str(file), column)
    assert message in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- the cache


def _toy_encoder(calls: list, fail_after: int = -1):
    """A deterministic text encoder (a function of each prompt's bytes); records its batches; raises (an
    interruption) once ``fail_after`` prompts are done."""

    def load():
        calls.append("load")

        def encode(batch: list[str]) -> dict[str, torch.Tensor]:
            if 0 <= fail_after <= sum(len(c) for c in calls if isinstance(c, list)):
                raise KeyboardInterrupt
            calls.append(list(batch))
            rows = [torch.tensor([float(b) for b in (p.encode() + bytes(6))[:6]]).reshape(3, 2) + len(p) for p in batch]
            return {"embeddings": torch.stack(rows), "pooled": torch.stack([r.sum(0) for r in rows])}

        return encode

    return load


def test_the_cache_is_lazy_resumable_and_reused(tmp_path):
    expected = _toy_encoder([])()(PROMPTS)
    null = _toy_encoder([])()(["none"])
    calls: list = []
    with pytest.raises(KeyboardInterrupt):  # stopped during the second shard: the first is kept
        prompt_tables(tmp_path, PROMPTS, "none", "enc", _toy_encoder(calls, fail_after=4), batch_size=2, shard_size=3, progress=False)
    calls.clear()
    tables = prompt_tables(tmp_path, PROMPTS, "none", "enc", _toy_encoder(calls), batch_size=2, shard_size=3, progress=False)
    encoded = [p for c in calls if isinstance(c, list) for p in c]
    assert encoded == ["none", *PROMPTS[3:]]  # the null prompt, then only what the interrupted run had not written
    emb, pooled = tables["embeddings"], tables["pooled"]
    assert isinstance(emb, PromptTable) and emb.shape == (len(PROMPTS) + 1, 3, 2) and len(pooled) == len(PROMPTS) + 1
    idx = torch.tensor([[6, 0], [7, 3]])  # 7 = P: the negative prompt
    want = torch.cat([expected["embeddings"], null["embeddings"]])[idx]
    assert torch.equal(emb[idx], want) and emb[idx].shape == (2, 2, 3, 2)
    assert torch.equal(pooled[torch.tensor([2, 7])], torch.stack([expected["pooled"][2], null["pooled"][0]]))
    calls.clear()
    again = prompt_tables(tmp_path, PROMPTS, "none", "enc", _toy_encoder(calls), batch_size=2, shard_size=3, progress=False)
    assert calls == [] and again["embeddings"].fingerprint == emb.fingerprint  # complete: the encoders are not even loaded
    other = prompt_tables(tmp_path, PROMPTS[:-1], "none", "enc", _toy_encoder(calls), progress=False)
    assert other["embeddings"].fingerprint != emb.fingerprint and calls[0] == "load"  # other prompts: another cache


def test_callers_filling_the_same_cache_at_once_encode_it_once(tmp_path):
    # as the ranks of one run do: the first fills the cache, the other waits on its lock, then reads it
    import threading
    import time

    calls: list = []
    logs: list = []
    load = _toy_encoder(calls)

    def slow_load():
        encode = load()
        time.sleep(0.5)  # the other caller arrives meanwhile
        return encode

    tables: list = [None, None]

    def fill(i: int) -> None:
        tables[i] = prompt_tables(tmp_path, PROMPTS, "none", "enc", slow_load, progress=False, log=logs.append)

    threads = [threading.Thread(target=fill, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls.count("load") == 1 and sum(len(c) for c in calls if isinstance(c, list)) == len(PROMPTS) + 1
    assert any(m.startswith("waiting for another process to fill") for m in logs)
    idx = torch.arange(len(PROMPTS) + 1)
    assert torch.equal(tables[0]["embeddings"][idx], tables[1]["embeddings"][idx])
    assert not list(tmp_path.glob("*.lock"))  # the lock file goes with the lock


# --------------------------------------------------------------------------- an SD1.5-shaped pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    from scoredistill.images.testing import tiny_sd_pipeline_folder

    root = tmp_path_factory.mktemp("sd")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return tiny_sd_pipeline_folder(root / "pipe")


def _teacher(hooks, pipeline: Path, cache: Path, *sets: str, prompts: Path = None):
    from scoredistill.config import resolve
    from scoredistill.roles import BuildContext

    prompts = prompts or pipeline.parent / "prompts.txt"
    config = resolve(hooks.registry, "dmd", "teacher", [], [
        "teacher.component=diffusers", f"teacher.path={pipeline}", f"teacher.prompts={prompts}", *sets])
    return hooks.make_teacher(spec=config.teacher, ctx=BuildContext(hooks=hooks, cache_dir=cache, extra={"progress": False}))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Path:
    from scoredistill.images.testing import tiny_sdxl_pipeline_folder

    root = tmp_path_factory.mktemp("sdxl")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return tiny_sdxl_pipeline_folder(root / "pipe")


def _pipeline_eps(pipe, kind: str, x_vp, t, idx, negative: str):
    """The pipeline's own guidance inputs and noise predictions ``(cond embeddings, eps_uncond, eps_cond)``, written
    as its ``__call__`` computes them (``encode_prompt``; SDXL's ``_get_add_time_ids`` for the default sizes)."""
    n = len(idx)
    prompts = [PROMPTS[i] for i in idx]
    if kind == "sd":
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[negative] * n)
        eps = pipe.unet(torch.cat([x_vp, x_vp]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        return cond, eps[:n], eps[n:]
    cond, uncond, pooled, u_pooled = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True,
                                                        negative_prompt=[negative] * n if negative else None)
    size = tuple(d * pipe.vae_scale_factor for d in x_vp.shape[-2:])
    ids = pipe._get_add_time_ids(size, (0, 0), size, cond.dtype, pipe.text_encoder_2.config.projection_dim).repeat(2 * n, 1)
    eps = pipe.unet(torch.cat([x_vp, x_vp]), t, encoder_hidden_states=torch.cat([uncond, cond]),
                    added_cond_kwargs={"text_embeds": torch.cat([u_pooled, pooled]), "time_ids": ids}).sample
    return cond, eps[:n], eps[n:]


@pytest.mark.parametrize("kind, negative", [("sd", "the cat"), ("sdxl", "")])
def test_the_dmd_gradient_with_text_guidance_is_the_pipelines_own_cfg(hooks, pipeline, sdxl, tmp_path, kind, negative):
    """Embeddings are the pipeline's encode_prompt (SDXL: two encoders, pooled, size conditions, the empty negative
    prompt as zeros); D_real is its guided noise prediction made x_0 by its scheduler's step; DMD's gradient (eq. 7 with
    eq. 8's normalisation) is then written out from those."""
    import diffusers

    from scoredistill.distill import dmd_gradient

    g, folder = 4.5, pipeline if kind == "sd" else sdxl
    teacher = _teacher(hooks, folder, tmp_path, f"teacher.guidance_scale={g}", *([f"teacher.negative_prompt={negative}"] if negative else []))
    assert teacher.conditioning == "text" and teacher.data_space == "latents" and teacher.prompts == PROMPTS
    fake = teacher.trainable_copy().eval()
    with torch.no_grad():
        for p in fake.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    sched = diffusers.DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # (x_0 as it is)
    t, idx = 600, torch.tensor([1, 5, 0])
    abar = sched.alphas_cumprod[t]
    sigma = ((1 - abar) / abar).sqrt().float()
    torch.manual_seed(3)
    x = torch.randn(3, *teacher.data_shape)
    x_s = x + sigma * torch.randn_like(x)
    x_vp = x_s * abar.sqrt().float()  # = x_s / sqrt(1 + sigma^2), what the network saw at t
    with torch.no_grad():
        real = teacher(x_s, sigma.expand(3), idx)
        ours = dmd_gradient(x, real, fake(x_s, sigma.expand(3), idx))
        cond, eps_u, eps_c = _pipeline_eps(pipe, kind, x_vp, t, idx, negative)
        x0_real = sched.step(eps_u + g * (eps_c - eps_u), t, x_vp).pred_original_sample
        pipe.unet = fake.unet
        _, _, eps_fake = _pipeline_eps(pipe, kind, x_vp, t, idx, negative)
        x0_fake = sched.step(eps_fake, t, x_vp).pred_original_sample
    assert torch.allclose(teacher.denoiser.prompt_embeddings[idx], cond, atol=1e-6)
    want = (x0_fake - x0_real) / (x - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(real, x0_real, atol=1e-4, rtol=1e-4)
    assert torch.allclose(ours, want, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(real, teacher.denoiser.denoise(x_s, sigma.expand(3), idx), atol=1e-3)  # guidance acts


def _export_reproduces_sample(run: Path, tmp_path: Path) -> None:
    """``scoredistill export`` writes a diffusers pipeline whose one step, given the same noise and prompts, is
    ``scoredistill sample``'s output (diffusers alone)."""
    import diffusers
    import numpy as np

    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    assert main(["sample", str(run), "--num", "3", "--seed", "5", "--out", str(tmp_path / "s.npy")]) == 0
    x, labels = torch.from_numpy(np.load(tmp_path / "s.npy")), np.load(tmp_path / "s_labels.npy")
    readme = (tmp_path / "export" / "README.md").read_text()
    assert "num_inference_steps=1" in readme and "data_space: `latents`" in readme and "preset: `teacher`" in readme
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "export"))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = pipe([PROMPTS[i] for i in labels], latents=z, num_inference_steps=1, guidance_scale=1.0, output_type="latent").images
    assert type(pipe).__name__ == "StableDiffusionPipeline" and float((out - x).abs().max()) < 1e-3
    assert pipe([PROMPTS[0]], num_inference_steps=1, guidance_scale=1.0, output_type="np").images.shape == (1, 16, 16, 3)


def test_a_text_to_image_run_end_to_end_reuses_its_cache(pipeline, tmp_path, monkeypatch):
    """Two runs on one prompts file: the first fills the cache, the second reads it (not one file rewritten)."""
    monkeypatch.setenv("SCOREDISTILL_CACHE", str(tmp_path / "cache"))
    sets = ["teacher.sampler_steps=2", "teacher.guidance_scale=2", "pairs.num_pairs=4", "pairs.steps=2", "pairs.batch_size=4",
            "train.batch_size=2", "train.pair_batch_size=2", "train.steps=2", "eval.num_samples=4"]
    args = ["run", "dmd", "--teacher", str(pipeline), "--prompts", str(pipeline.parent / "prompts.txt"), "--quiet",
            *[a for s in sets for a in ("--set", s)]]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["non_finite"] == 0
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "prompt_embeddings").rglob("*") if p.is_file()}
    assert len([p for p in files if p.name.startswith("shard-")]) == 1 and any(p.name == "index.json" for p in files)
    assert (tmp_path / "a" / "samples.png").is_file()  # decoded by the VAE, captioned with the prompts
    _export_reproduces_sample(tmp_path / "a", tmp_path)
    lpips = ["losses.regression.component=lpips_regression", "losses.regression.backbone=random", "losses.regression.resize=null"]
    assert main([*args, *[a for s in ["train.steps=1", *lpips] for a in ("--set", s)], "--out", str(tmp_path / "b")]) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == files


@pytest.mark.parametrize("case, message", [
    ("not_text", "is not text-conditional"), ("no_encoder", "lacks text_encoder/"), ("empty", "holds no prompt"),
    ("no_teacher", "add --teacher PIPELINE_FOLDER"), ("both", "not both"), ("no_vae", "lacks vae/")])
def test_bad_text_input_is_one_line_before_training(pipeline, tmp_path, capsys, case, message):
    import shutil

    from scoredistill.images.testing import tiny_diffusers_teacher_folder

    teacher, prompts, extra = pipeline, pipeline.parent / "prompts.txt", []
    if case == "not_text":
        teacher = tiny_diffusers_teacher_folder(tmp_path / "plain")
    elif case in ("no_encoder", "no_vae"):
        teacher = tmp_path / "pipe"
        shutil.copytree(pipeline, teacher)
        shutil.rmtree(teacher / ("text_encoder" if case == "no_encoder" else "vae"))
    elif case == "empty":
        prompts = tmp_path / "empty.txt"
        prompts.write_text("\n")
    elif case == "both":
        extra = ["--set", f"teacher.embeddings={prompts}"]
    args = ["run", "dmd", "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--quiet", *extra]
    assert main(args + ([] if case == "no_teacher" else ["--teacher", str(teacher)])) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "run" / "metrics.json").exists()


def test_latents_decode_through_the_pipelines_vae_with_gradient(hooks, pipeline, tmp_path):
    """``decode(x) = vae.decode(x / scaling_factor + shift_factor)``, as the pipelines unscale their latents."""
    import shutil

    import diffusers

    folder = tmp_path / "pipe"
    shutil.copytree(pipeline, folder)
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**cfg, "shift_factor": 0.3}))
    teacher = _teacher(hooks, folder, tmp_path, prompts=pipeline.parent / "prompts.txt")
    vae = diffusers.AutoencoderKL.from_pretrained(str(folder / "vae"))
    x = torch.randn(2, *teacher.data_shape, requires_grad=True)
    images = teacher.decode(x)
    with torch.no_grad():
        want = vae.decode(x / 0.18215 + 0.3).sample
    assert images.shape == (2, 3, 16, 16) and torch.allclose(images, want, atol=1e-5)
    images.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # LPIPS on decoded images trains the generator through it
    from scoredistill.testing import mixture

    with pytest.raises(UserError, match="has no decoder"):
        mixture([[1.0, 0.0]], [0.3], [1.0]).decode(x)


@pytest.mark.parametrize("kind, t5", [("sd3", True), ("sd3", False), ("flux", True)])
def test_sd3_and_flux_prompts_are_their_pipelines_own(hooks, tmp_path, kind, t5):
    """The cached embeddings (and the null prompt's) are what SD3's / Flux's encode_prompt gives: CLIP-L + CLIP-G padded
    before T5's tokens (zeros without T5) and both pooled projections; Flux: T5's tokens and CLIP's pooled output."""
    import diffusers

    from scoredistill.images.testing import tiny_flow_pipeline_folder

    folder = tiny_flow_pipeline_folder(tmp_path / "pipe", kind, t5=t5)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    sets = ["teacher.max_sequence_length=8", "teacher.guidance_scale=2"] + (["teacher.sample_size=4"] if kind == "flux" else [])
    teacher = _teacher(hooks, folder, tmp_path, *sets)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    idx = torch.tensor([4, 0, 2])
    prompts = [PROMPTS[i] for i in idx]
    den = teacher.denoiser
    if kind == "sd3":
        e, ne, p, npool = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=8)
        null = torch.full((3,), len(PROMPTS))
        assert torch.allclose(den.prompt_embeddings[null], ne, atol=1e-6) and torch.allclose(den.prompt_pooled[null], npool, atol=1e-6)
    else:
        e, p, _ = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=8)
    assert den.prompt_embeddings[idx].shape == e.shape and torch.allclose(den.prompt_embeddings[idx], e, atol=1e-6)
    assert torch.allclose(den.prompt_pooled[idx], p, atol=1e-6)
    x = torch.randn(3, *teacher.data_shape)
    with torch.no_grad():
        assert torch.isfinite(teacher(x, torch.full((3,), 2.0), idx)).all()


def test_dmd2_on_a_text_to_image_teacher_without_real_data_is_one_line(pipeline, tmp_path, capsys):
    args = ["run", "dmd2", "--teacher", str(pipeline), "--prompts", str(pipeline.parent / "prompts.txt"), "--quiet",
            "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "no real data: set teacher.data (--data)" in err and len(err.splitlines()) == 1


def test_sdxl_size_conditions_are_the_pipelines_add_time_ids(hooks, sdxl, tmp_path):
    """teacher.sdxl_time_ids reach the UNet as the pipeline's add_time_ids (original size, crop, target size), and
    change the teacher's fingerprint (its caches)."""
    import diffusers

    ids = [32, 24, 4, 2, 16, 16]
    teacher = _teacher(hooks, sdxl, tmp_path, "teacher.sdxl_time_ids=[32,24,4,2,16,16]")
    plain = _teacher(hooks, sdxl, tmp_path)
    assert teacher.fingerprint() != plain.fingerprint()
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(sdxl))
    idx, t = torch.tensor([2, 6]), 400
    cond, _, pooled, _ = pipe.encode_prompt([PROMPTS[i] for i in idx], device="cpu", do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids(tuple(ids[:2]), tuple(ids[2:4]), tuple(ids[4:]), cond.dtype,
                                      pipe.text_encoder_2.config.projection_dim).repeat(2, 1)
    x = torch.randn(2, *teacher.data_shape)
    with torch.no_grad():
        eps = pipe.unet(x, t, encoder_hidden_states=cond, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        ours = teacher.denoiser.backbone.forward(teacher.denoiser.unet, x, torch.full((2,), float(t)),
                                                 {"encoder_hidden_states": teacher.denoiser.prompt_embeddings[idx],
                                                  "pooled_projections": teacher.denoiser.prompt_pooled[idx]})
    assert torch.allclose(ours, eps, atol=1e-5)


def test_real_images_of_a_latent_teacher_are_encoded_by_its_vae(hooks, pipeline, tmp_path):
    """teacher.data of a pipeline: images at the VAE's size; real samples are their scaled latents
    ((E(x) - shift_factor) * scaling_factor, E the encoder's posterior mean); a wrong size is one line."""
    import diffusers
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, size in enumerate([16, 16, 16, 12]):
        folder = tmp_path / ("images" if size == 16 else "wrong")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    teacher = _teacher(hooks, pipeline, tmp_path, f"teacher.data={tmp_path / 'images'}")
    real = teacher.real_data("train")
    assert teacher.image_shape == (3, 16, 16) and real.shape == (3, 3, 16, 16)
    vae = diffusers.AutoencoderKL.from_pretrained(str(pipeline / "vae"))
    with torch.no_grad():
        want = vae.encode(real).latent_dist.mean * vae.config.scaling_factor
    torch.manual_seed(0)
    latents = teacher.real_samples(64)
    assert latents.shape == (64, *teacher.data_shape)
    assert all(any(torch.allclose(row, w, atol=1e-5) for w in want) for row in latents)  # each is one image's latents
    with pytest.raises(UserError, match="is 12x12 but the teacher makes 16x16 images"):
        _teacher(hooks, pipeline, tmp_path, f"teacher.data={tmp_path / 'wrong'}")
