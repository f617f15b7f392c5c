"""Captioned real data (``--data FOLDER``): the folder layouts users have, resizing and cropping to the teacher's size,
VAE latents cached once, captions embedded by the pipeline's own encoders, and DMD2's discriminator on a text-to-image
teacher (a projection head on the pooled text embedding), on tiny random-weight pipelines.

Independent computations: torchvision's ``Resize`` + ``CenterCrop``; the pipeline's own ``vae.encode`` and
``encode_prompt``; its UNet's middle block run by hand on the caption's embeddings; the projection discriminator's
formula written out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scoredistill.cli import main
from scoredistill.errors import UserError
from scoredistill.images.folders import cached_latents, load_images, scan_image_folder

PROMPTS = ["a cat", "the red dog", "a dog"]
CAPTIONS = ["a red cat", "the dog", "a cat", "red dog", "the cat"]


def _images(folder: Path, n: int = len(CAPTIONS), size=(32, 24), seed: int = 0) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"{k}.png" for k in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    return names


def _jsonl_folder(folder: Path, **kw) -> Path:
    names = _images(folder, **kw)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": c}) + "\n" for n, c in zip(names, CAPTIONS)))
    return folder


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    from scoredistill.images.testing import tiny_sd_pipeline_folder

    root = tmp_path_factory.mktemp("sd")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    _jsonl_folder(root / "data")
    return tiny_sd_pipeline_folder(root / "pipe")


def _teacher(hooks, pipeline: Path, cache: Path, *sets: str):
    from scoredistill.config import resolve
    from scoredistill.roles import BuildContext

    config = resolve(hooks.registry, "dmd2", "teacher", [], [
        "teacher.component=diffusers", f"teacher.path={pipeline}", f"teacher.prompts={pipeline.parent / 'prompts.txt'}", *sets])
    return hooks.make_teacher(spec=config.teacher, ctx=BuildContext(hooks=hooks, cache_dir=cache, extra={"progress": False}))


# --------------------------------------------------------------------------- folders


def test_the_layouts_users_have(tmp_path):
    """imagefolder metadata.jsonl / metadata.csv (text or caption, in a subfolder too), same-stem .txt, images alone."""
    names = _images(tmp_path / "jsonl" / "train")
    (tmp_path / "jsonl" / "train" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": n, "caption": c}) + "\n" for n, c in zip(names, CAPTIONS)))
    names = _images(tmp_path / "csv")
    (tmp_path / "csv" / "metadata.csv").write_text("file_name,text\n" + "".join(f"{n},{c}\n" for n, c in zip(names, CAPTIONS)))
    names = _images(tmp_path / "txt")
    for n, c in zip(names, CAPTIONS):
        (tmp_path / "txt" / n).with_suffix(".txt").write_text(c + "\n")
    _images(tmp_path / "plain")
    for layout in ("jsonl", "csv", "txt"):
        files, captions = scan_image_folder(tmp_path / layout)
        assert [f.name for f in files] == [f"{k}.png" for k in range(5)] and captions == CAPTIONS, layout
    files, captions = scan_image_folder(tmp_path / "plain")
    assert len(files) == 5 and captions is None
    (tmp_path / "csv" / "metadata.csv").write_text("file_name,prompt\n" + "".join(f"{n},{c}\n" for n, c in zip(names, CAPTIONS)))
    assert scan_image_folder(tmp_path / "csv", caption_column="prompt")[1] == CAPTIONS


def test_resize_and_crop_are_torchvisions(tmp_path):
    """``resize`` scales the shorter side to the target (bicubic) and ``crop=center`` is torchvision's CenterCrop; a
    ``random`` crop is one fixed window of the resized image per file."""
    from PIL import Image
    from torchvision import transforms

    files, _ = scan_image_folder(_jsonl_folder(tmp_path / "d"))
    shape = (3, 16, 16)
    ours = load_images(files, shape, resize=True, crop="center")
    tv = transforms.Compose([transforms.Resize(16, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(16), transforms.PILToTensor()])
    want = torch.stack([tv(Image.open(f).convert("RGB")).float() for f in files]) / 127.5 - 1
    assert ours.shape == (5, 3, 16, 16) and torch.allclose(ours, want, atol=1e-6)
    rand = load_images(files, shape, resize=True, crop="random")
    assert torch.equal(rand, load_images(files, shape, resize=True, crop="random"))  # the cached latents stay valid
    full = transforms.Compose([transforms.Resize(16, interpolation=transforms.InterpolationMode.BICUBIC), transforms.PILToTensor()])
    for f, img in zip(files, rand):
        big = full(Image.open(f).convert("RGB")).float() / 127.5 - 1  # 16 x 21
        windows = [big[:, :, k : k + 16] for k in range(big.shape[-1] - 15)]
        assert any(torch.allclose(img, w, atol=1e-6) for w in windows)
    assert not torch.equal(rand, ours)  # some image is cropped off-centre
    with pytest.raises(UserError, match="is 32x24 but the teacher makes 16x16 images"):
        load_images(files, shape)


def test_the_latents_are_encoded_once(tmp_path):
    files, _ = scan_image_folder(_jsonl_folder(tmp_path / "d"))
    calls = []

    def encode(images):
        calls.append(len(images))
        return images[:, :2, ::2, ::2] * 3

    kw = dict(files=files, shape=(3, 16, 16), resize=True, crop="center", vae_key="vae", cache_dir=tmp_path / "c", progress=False)
    first = cached_latents(encode=encode, batch_size=2, **kw)
    assert calls == [2, 2, 1] and torch.equal(first, load_images(files, (3, 16, 16), True)[:, :2, ::2, ::2] * 3)
    calls.clear()
    assert torch.equal(cached_latents(encode=encode, **kw), first) and calls == []
    cached_latents(encode=encode, **{**kw, "crop": "random"})
    assert calls == [5]  # other sizing: another cache


def test_a_checked_folder_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    from PIL import Image

    from scoredistill.images.folders import check_images

    files, _ = scan_image_folder(_jsonl_folder(tmp_path / "d", size=(16, 16)))
    check_images(files, (3, 16, 16), False, tmp_path / "c")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda f, *a, **k: (opened.append(f), real_open(f, *a, **k))[1])
    check_images(files, (3, 16, 16), False, tmp_path / "c")
    assert opened == [] and len(list((tmp_path / "c" / "checked_images").iterdir())) == 1
    files[3].write_bytes(b"no longer an image")
    with pytest.raises(UserError, match="cannot read image .*3.png"):
        check_images(files, (3, 16, 16), False, tmp_path / "c")


# --------------------------------------------------------------------------- a text-to-image teacher


def test_real_latents_and_captions_are_the_pipelines_own(hooks, sd, tmp_path):
    """Real samples are the VAE's scaled latents of the resized images; their conditions index the captions' embeddings
    (the pipeline's encode_prompt), which the fake score's copy reads too: its middle block on a caption index is the
    pipeline UNet's on that caption's embedding; the head's text vector is the mean of those token embeddings."""
    import diffusers

    from scoredistill.distill import GANHead, attach_gan_head

    teacher = _teacher(hooks, sd, tmp_path, f"teacher.data={sd.parent / 'data'}", "teacher.resize=true")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(sd))
    files, _ = scan_image_folder(sd.parent / "data")
    with torch.no_grad():
        want = pipe.vae.encode(load_images(files, (3, 16, 16), True)).latent_dist.mean * pipe.vae.config.scaling_factor
    torch.manual_seed(0)
    fake = teacher.trainable_copy().eval()
    head = attach_gan_head(fake, teacher, 8, 1.0)
    assert isinstance(head, GANHead) and head.text_projection is not None and head.class_embedding is None
    x, cond = teacher.real_labelled_samples(16)
    first = len(PROMPTS) + 1
    assert int(cond.min()) >= first and int(cond.max()) < first + len(CAPTIONS)
    assert all(torch.allclose(row, want[int(c) - first], atol=1e-5) for row, c in zip(x, cond))
    caps = [CAPTIONS[int(c) - first] for c in cond[:3]]
    emb, _ = pipe.encode_prompt(caps, "cpu", 1, False)
    assert torch.allclose(teacher.condition_vectors(cond[:3]), emb.mean(1), atol=1e-6)
    sigma = teacher.sigmas[600].expand(3)
    captured = {}
    handle = pipe.unet.mid_block.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    with torch.no_grad():
        ours = fake.features(x[:3], sigma, cond[:3])
        pipe.unet(x[:3] / (1 + sigma[0] ** 2).sqrt(), 600, encoder_hidden_states=emb)
    handle.remove()
    assert torch.allclose(ours, captured["h"].mean(dim=(2, 3)), atol=1e-5)
    torch.nn.init.normal_(head.text_projection.weight)
    v = teacher.condition_vectors(cond[:3])
    with torch.no_grad():
        h = torch.nn.functional.silu(ours @ head.net[0].weight.T + head.net[0].bias)
        by_hand = h @ head.net[2].weight[0] + head.net[2].bias + ((v @ head.text_projection.weight.T) * h).sum(-1)
        assert torch.allclose(head(ours, cond[:3], v), by_hand, atol=1e-5)


def test_sdxl_heads_read_the_pooled_embedding(hooks, tmp_path):
    import diffusers

    from scoredistill.images.testing import tiny_sdxl_pipeline_folder

    pipe_dir = tiny_sdxl_pipeline_folder(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    data = _images(tmp_path / "data", size=(16, 16))
    for n, c in zip(data, CAPTIONS):
        (tmp_path / "data" / n).with_suffix(".txt").write_text(c)
    teacher = _teacher(hooks, pipe_dir, tmp_path, f"teacher.data={tmp_path / 'data'}")
    _, cond = teacher.real_labelled_samples(4)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(pipe_dir))
    _, _, pooled, _ = pipe.encode_prompt([CAPTIONS[int(c) - len(PROMPTS) - 1] for c in cond], device="cpu",
                                         do_classifier_free_guidance=False)
    assert torch.allclose(teacher.condition_vectors(cond), pooled, atol=1e-6)
    _, _, p_pooled, _ = pipe.encode_prompt(PROMPTS[:2], device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(teacher.condition_vectors(torch.tensor([0, 1])), p_pooled, atol=1e-6)


def test_the_resized_folder_is_the_fid_reference(hooks, sd, tmp_path, monkeypatch):
    """Inception FID's reference is the folder's images, resized and cropped as set (a stand-in feature extractor:
    per-channel means and deviations, in place of Inception's weights, which the tests do not have)."""
    from cleanfid.resize import build_resizer

    from scoredistill.images import metrics
    from scoredistill.images.plugin import decoded

    teacher = _teacher(hooks, sd, tmp_path, f"teacher.data={sd.parent / 'data'}", "teacher.resize=true", "teacher.sampler_steps=2")
    extractor = lambda x: torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)  # noqa: E731
    monkeypatch.setattr(metrics, "inception_extractor", lambda device: extractor)
    samples = torch.randn(4, *teacher.data_shape)
    out = metrics.evaluate_images(teacher, samples, seed=0, cache_dir=tmp_path, inception="require")
    files, _ = scan_image_folder(sd.parent / "data")
    resize = build_resizer("clean")
    ref = metrics.batch_features(load_images(files, (3, 16, 16), True), extractor, 50, resize)
    gen = metrics.batch_features(decoded(teacher, samples).clamp(-1, 1), extractor, 50, resize)
    assert out["fid_inception"] == round(metrics.frechet(gen, ref), 4) and out["teacher"]["fid_inception"] is not None


def test_dmd2_runs_on_a_text_to_image_teacher_with_captioned_data(sd, tmp_path, monkeypatch):
    """dmd2 end to end with --data: the projection on the text embedding starts at zero and is trained; the caption
    embeddings and latents are cached."""
    from safetensors.torch import load_file

    monkeypatch.setenv("SCOREDISTILL_CACHE", str(tmp_path / "cache"))
    sets = ["teacher.sampler_steps=2", "teacher.resize=true", "teacher.crop=random", "train.batch_size=2", "train.steps=2",
            "eval.num_samples=4", "train.fake_updates_per_step=1"]
    assert main(["run", "dmd2", "--teacher", str(sd), "--prompts", str(sd.parent / "prompts.txt"), "--data", str(sd.parent / "data"),
                 "--out", str(tmp_path / "run"), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["non_finite"] == 0 and (tmp_path / "run" / "samples.png").is_file()
    fake = load_file(str(tmp_path / "run" / "fake_score.safetensors"))
    proj = [v for k, v in fake.items() if k.endswith("gan_head.text_projection.weight")]
    assert len(proj) == 1 and proj[0].abs().sum() > 0
    assert len(list((tmp_path / "cache" / "real_latents").glob("*.safetensors"))) == 1
    assert len(list((tmp_path / "cache" / "prompt_embeddings").iterdir())) == 2  # the prompts, the captions


def _bad(case: str, root: Path) -> Path:
    folder = root / case
    if case == "empty":
        folder.mkdir()
    elif case == "txt_missing":
        names = _images(folder, size=(16, 16))
        for n, c in zip(names[1:], CAPTIONS[1:]):
            (folder / n).with_suffix(".txt").write_text(c)
    elif case == "row_without_text":
        names = _images(folder, size=(16, 16))
        (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": ""}) + "\n" for n in names))
    elif case == "unlisted_image":
        names = _images(folder, size=(16, 16))
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": names[0], "text": "a cat"}) + "\n")
    elif case == "unreadable":
        _jsonl_folder(folder, size=(16, 16))
        (folder / "2.png").write_bytes(b"not a png at all")
    elif case == "wrong_size":
        _jsonl_folder(folder)
    elif case == "no_captions":
        _images(folder, size=(16, 16))
    return folder


@pytest.mark.parametrize("case, message", [
    ("empty", "holds no images"), ("txt_missing", "has no caption file '0.txt'"), ("row_without_text", "no caption for '0.png'"),
    ("unlisted_image", "has no caption: 4 of 5 images"), ("unreadable", "cannot read image"),
    ("wrong_size", "is 32x24 but the teacher makes 16x16 images"), ("no_captions", "has no captions")])
def test_bad_folders_are_one_line_before_training(sd, tmp_path, capsys, monkeypatch, case, message):
    monkeypatch.setenv("SCOREDISTILL_CACHE", str(tmp_path / "cache"))
    folder = _bad(case, tmp_path)
    args = ["run", "dmd2", "--teacher", str(sd), "--prompts", str(sd.parent / "prompts.txt"), "--data", str(folder), "--quiet",
            "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "history.json").exists()


def test_captions_need_the_prompt_cache(sd, tmp_path, capsys, monkeypatch):
    """A text teacher conditioned by teacher.embeddings (a table of its own) cannot take captions: one line."""
    from safetensors.torch import save_file

    monkeypatch.setenv("SCOREDISTILL_CACHE", str(tmp_path / "cache"))
    save_file({"embeddings": torch.randn(3, 8, 16)}, str(tmp_path / "e.safetensors"))
    args = ["run", "dmd2", "--teacher", str(sd), "--data", str(sd.parent / "data"), "--quiet", "--out", str(tmp_path / "run"),
            "--set", f"teacher.embeddings={tmp_path / 'e.safetensors'}", "--set", "teacher.resize=true"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "give the prompts with --prompts FILE" in err and len(err.splitlines()) == 1
