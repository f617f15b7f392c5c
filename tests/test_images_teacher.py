"""The digits data and teacher, the UNet generator / fake score copies, and sharded ODE pairs."""

from __future__ import annotations

import pytest
import torch

from scoredistill.errors import UserError
from scoredistill.images.data import DIGITS_TEST_SIZE, digits, to_uint8
from scoredistill.images.loading import load_denoiser
from scoredistill.images.networks import UNetFakeScore, UNetGenerator
from scoredistill.images.pairs import ShardedODEPairs
from scoredistill.images.teachers import DiffusersTeacher, DigitsTeacher
from scoredistill.images.testing import TINY_TEACHER_OVERRIDES, tiny_teacher_folder, tiny_teacher_settings
from scoredistill.images.training import ENV_DIGITS_TEACHER, STATE_FILE, train_digits_teacher
from scoredistill.io import save_tensors
from scoredistill.pairs import ODEPairs
from scoredistill.sampling import heun_sample, karras_sigmas
from scoredistill.testing import build_context


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_teacher_folder(tmp_path_factory.mktemp("teacher") / "digits")


@pytest.fixture
def teacher(teacher_dir):
    return DiffusersTeacher(DiffusersTeacher.Config(path=str(teacher_dir), data="digits", sampler_steps=3)).eval().requires_grad_(False)


def test_digits_split_is_fixed_disjoint_stratified_and_scaled():
    xtr, ytr = digits("train")
    xte, yte = digits("test")
    assert xtr.shape == (1500, 1, 8, 8) and xte.shape == (DIGITS_TEST_SIZE, 1, 8, 8)
    assert xtr.min() == -1 and xtr.max() == 1 and xte.min() >= -1 and xte.max() <= 1
    assert torch.equal(digits("train")[0], xtr)  # fixed
    tr, te = {tuple(v.flatten().tolist()) for v in xtr}, {tuple(v.flatten().tolist()) for v in xte}
    assert len(te - tr) > 0.95 * len(te)  # held out (a few digits occur twice in the dataset itself)
    share = torch.bincount(yte, minlength=10).float() / len(yte)
    assert float((share - 0.1).abs().max()) < 0.01  # stratified
    levels = set(to_uint8(xtr).unique().tolist())
    assert len(levels) == 17  # 0..16 grey levels survive the uint8 round trip


def test_teacher_training_resumes_exactly(tmp_path):
    s = tiny_teacher_settings(train_steps=6)
    straight = train_digits_teacher(s, tmp_path / "a", progress=False, checkpoint_every=3)
    partial = train_digits_teacher(s, tmp_path / "b", progress=False, checkpoint_every=3, max_steps=4)
    assert (partial / STATE_FILE).is_file() and not (tmp_path / "b").exists()
    resumed = train_digits_teacher(s, tmp_path / "b", progress=False, checkpoint_every=3)
    assert not partial.exists()
    a, b = load_denoiser(str(straight)), load_denoiser(str(resumed))
    for (name, p), q in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.kind == "edm" and a.metadata["steps"] == 6 and a.metadata["data"]["train_images"] == 1500


def test_digits_teacher_component_uses_env_folder_and_refuses_an_empty_path(teacher_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_DIGITS_TEACHER, str(teacher_dir))
    cfg = DigitsTeacher.Config(**tiny_teacher_settings().model_dump(), sampler_steps=3)
    t = DigitsTeacher(cfg, build_context())
    assert t.data_shape == (1, 8, 8) and t.kind == "edm" and t.sigma_max == pytest.approx(80.0)
    assert t.real_samples(5).shape == (5, 1, 8, 8)
    sig = t.training_sigmas(4000)
    assert sig.min() >= t.sigma_min and sig.max() <= t.sigma_max
    assert abs(float(sig.log().median()) - (-1.2)) < 0.1  # EDM's log-normal training noise
    with pytest.raises(UserError, match="teacher train"):
        DigitsTeacher(cfg.model_copy(update={"path": str(tmp_path / "none")}), build_context())


def test_a_damaged_cached_teacher_says_to_delete_and_retrain(teacher_dir, monkeypatch, tmp_path):
    import shutil

    damaged = tmp_path / "digits"
    shutil.copytree(teacher_dir, damaged)
    for weights in (damaged / "unet").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    monkeypatch.setenv(ENV_DIGITS_TEACHER, str(damaged))
    cfg = DigitsTeacher.Config(**tiny_teacher_settings().model_dump(), sampler_steps=3)
    with pytest.raises(UserError, match=f"delete {damaged} and run again to retrain it") as err:
        DigitsTeacher(cfg, build_context())
    assert "\n" not in str(err.value)


def test_digits_data_on_a_wrong_shape_teacher_is_a_clear_error(tmp_path):
    import diffusers

    diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          norm_num_groups=4).save_pretrained(tmp_path / "rgb")
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "rgb")
    with pytest.raises(UserError, match="1x8x8"):
        DiffusersTeacher(DiffusersTeacher.Config(path=str(tmp_path / "rgb"), data="digits"))


def test_generator_starts_as_the_teachers_one_step_denoiser_and_copies_are_independent(teacher):
    ctx = build_context(teacher)
    g = UNetGenerator(UNetGenerator.Config(), ctx)
    f = UNetFakeScore(UNetFakeScore.Config(), ctx)
    z = torch.randn(6, 1, 8, 8)
    s_max = torch.full((6,), teacher.sigma_max)
    with torch.no_grad():
        assert torch.allclose(g(z), teacher(z * teacher.sigma_max, s_max), atol=1e-6)
        x_s, s = torch.randn(6, 1, 8, 8), torch.rand(6) + 0.1
        assert torch.allclose(f(x_s, s, x_clean=None), teacher(x_s, s), atol=1e-6)
    assert g.latent_shape == (1, 8, 8)
    assert all(p.requires_grad for p in g.parameters()) and all(p.requires_grad for p in f.parameters())
    ids = {id(p) for p in teacher.parameters()}
    assert not ids & {id(p) for p in g.parameters()} and not ids & {id(p) for p in f.parameters()}


def test_fake_score_features_are_the_pooled_mid_block_output_with_gradient(teacher):
    f = UNetFakeScore(UNetFakeScore.Config(), build_context(teacher))
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    captured = {}
    handle = f.denoiser.unet.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    with torch.no_grad():
        f(x, sigma)  # a full forward pass, observed independently
    handle.remove()
    feats = f.features(x, sigma)
    assert feats.shape == (3, f.denoiser.unet.config.block_out_channels[-1])
    assert torch.allclose(feats, captured["h"].mean(dim=(2, 3)), atol=1e-6)
    feats.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # before pooling: one token per position of the mid block, in row-major order (the teacher's, for LADD's heads)
    tokens = teacher.feature_tokens(x.detach(), sigma)
    h = captured["h"]
    assert tokens.shape == (3, h.shape[2] * h.shape[3], h.shape[1])
    assert torch.allclose(tokens[:, 1], h[:, :, 0, 1], atol=1e-6)  # position (0, 1) is token 1
    assert torch.allclose(tokens[:, h.shape[3]], h[:, :, 1, 0], atol=1e-6)  # position (1, 0) is token W


def test_sharded_pairs_are_the_teachers_heun_solutions_and_resume(teacher, tmp_path):
    cfg = ODEPairs.Config(num_pairs=10, steps=3, batch_size=4, seed=7)
    ctx = build_context(teacher, cache_dir=tmp_path)
    pairs = ShardedODEPairs(cfg, ctx)
    shards = sorted(pairs.folder.glob("shard-*.safetensors"))
    assert len(shards) == 3
    want = heun_sample(teacher, pairs.z * teacher.sigma_max, karras_sigmas(3, teacher.sigma_min, teacher.sigma_max))
    assert torch.allclose(pairs.y, want, atol=1e-5)
    z = torch.randn((10, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    assert torch.equal(pairs.z, z)  # the same noise as the core's ode_pairs
    shards[1].unlink()  # an interrupted solve
    shards[2].write_bytes(b"damaged")
    again = ShardedODEPairs(cfg, ctx)
    assert torch.allclose(again.y, pairs.y, atol=1e-6) and len(list(pairs.folder.glob("shard-*"))) == 3
    zr, yr, cr = again.sample(5)
    assert zr.shape == yr.shape == (5, 1, 8, 8) and cr is None  # an unconditional teacher


def test_processes_needing_the_same_pairs_share_the_shards(teacher, tmp_path):
    # another process (a rank, a run) holds shard 1: this one solves 0 and 2 meanwhile, then waits for 1 and reads it
    import fcntl
    import os
    import threading
    import time

    cfg = ODEPairs.Config(num_pairs=10, steps=3, batch_size=4, seed=7)
    ctx = build_context(teacher, cache_dir=tmp_path)
    plain = ShardedODEPairs(cfg.model_copy(update={"cache": False}), ctx)  # solved alone; its folder is the cache's
    shard1 = plain.shard_path(1)
    shard1.parent.mkdir(parents=True)
    fd = os.open(f"{shard1}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(ShardedODEPairs(cfg, ctx)))
    worker.start()
    deadline = time.monotonic() + 60
    while not (plain.shard_path(0).is_file() and plain.shard_path(2).is_file()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert plain.shard_path(0).is_file() and plain.shard_path(2).is_file()  # solved past the held shard
    time.sleep(0.2)
    assert worker.is_alive() and not shard1.is_file()  # waiting for the holder of shard 1
    save_tensors(shard1, {"z": plain.z[4:8].cpu(), "y": plain.y[4:8].cpu() + 1})  # the holder writes it
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    worker.join(60)
    pairs = result[0]
    assert torch.allclose(pairs.y[4:8], plain.y[4:8] + 1)  # read, not solved again
    assert torch.allclose(pairs.y[:4], plain.y[:4], atol=1e-6) and torch.allclose(pairs.y[8:], plain.y[8:], atol=1e-6)
    assert not list(plain.folder.glob("*.lock"))


def test_teacher_train_command(tmp_path, capsys):
    from scoredistill.cli import main

    out = tmp_path / "t"
    sets = [a for o in TINY_TEACHER_OVERRIDES for a in ("--set", o)]
    assert main(["teacher", "train", "--preset", "digits", "--out", str(out), "--quiet", *sets]) == 0
    assert (out / "unet" / "config.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    assert main(["teacher", "train", "--preset", "digits", "--out", str(out), "--quiet", *sets]) == 0
    assert "already trained" in capsys.readouterr().out
    assert main(["teacher", "train", "--preset", "toy2d"]) == 2
    assert main(["teacher", "train", "--set", "teacher.train_steps=-1"]) == 2
    assert main(["teacher", "train", "--set", "train.steps=5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "digits_unet" in err and "train_steps" in err


def test_a_teacher_folder_trained_with_other_settings_is_a_one_line_error(teacher_dir, monkeypatch):
    """teacher.path (or the env folder) is used as trained: a config asking for another architecture or schedule would
    be ignored and misstated in the run's config.yaml, so the run stops and names each difference."""
    monkeypatch.setenv(ENV_DIGITS_TEACHER, str(teacher_dir))
    same = DigitsTeacher.Config(**tiny_teacher_settings().model_dump(), sampler_steps=3)
    DigitsTeacher(same, build_context())  # the settings it was trained with
    DigitsTeacher(same.model_copy(update={"train_steps": 999, "train_seed": 5}), build_context())  # training history: not checked
    other = same.model_copy(update={"block_out_channels": [16, 32], "sigma_data": 0.5})
    with pytest.raises(UserError) as err:
        DigitsTeacher(other, build_context())
    message = str(err.value)
    assert "\n" not in message and "teacher.block_out_channels=[16, 32] (it has [8, 16])" in message
    assert "teacher.sigma_data=0.5 (it has 0.75)" in message and "teacher train" in message
