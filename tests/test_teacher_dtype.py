"""``teacher.dtype``: a frozen image teacher kept in bf16 / fp16, with float32 generator and fake-score copies."""

from __future__ import annotations

import pytest
import torch

from scoredistill.config import resolve
from scoredistill.images.teachers import DigitsTeacher
from scoredistill.images.testing import tiny_diffusers_teacher_folder
from scoredistill.testing import WeightCasts
from scoredistill.trainer import build, setup, train_iteration


def _run(hooks, tmp_path, folder, *overrides, name="run"):
    config = resolve(hooks.registry, "dmd", "digits", ["regression"], [
        "teacher.component=diffusers_unet", f"teacher.path={folder}", "generator.component=unet_generator",
        "fake_score.component=unet_denoiser", "train.batch_size=4", "runtime.progress=false", *overrides])
    run = build(config, hooks, tmp_path / name)
    setup(run)
    return run


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_diffusers_teacher_folder(tmp_path_factory.mktemp("teacher"))


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_teacher_loads_in_its_dtype_and_the_trained_copies_are_float32_from_its_weights(hooks, tmp_path, folder, name, dtype):
    run = _run(hooks, tmp_path, folder, f"teacher.dtype={name}")
    teacher_unet = run.models.teacher.denoiser.unet
    assert {p.dtype for p in teacher_unet.parameters()} == {dtype}
    for role in (run.models.generator, run.models.fake_score):
        unet = role.denoiser.unet
        assert {p.dtype for p in unet.parameters()} == {torch.float32}
        theirs = teacher_unet.state_dict()
        for key, mine in unet.state_dict().items():
            assert torch.equal(mine, theirs[key].float()), key  # the teacher's rounded weights, exactly
    fp32 = _run(hooks, tmp_path, folder, name="fp32")
    assert run.models.teacher.fingerprint() != fp32.models.teacher.fingerprint()  # its pairs and samples are its own


def test_a_bf16_teacher_gives_the_fp32_teachers_denoiser_to_bf16_precision(hooks, tmp_path, folder):
    """Against the float32 teacher as the reference: close to bf16's precision, and not equal (bf16 was applied)."""
    fp32 = _run(hooks, tmp_path, folder, name="fp32").models.teacher
    bf16 = _run(hooks, tmp_path, folder, "teacher.dtype=bf16", name="bf16").models.teacher
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((8, 1, 8, 8), generator=gen)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0])
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        ref, low = fp32(x, sigma), bf16(x, sigma)
    assert low.dtype == torch.float32 and bool(torch.isfinite(low).all())
    err = ((low - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()
    assert 0 < err < 0.05, err


def test_under_autocast_a_bf16_teacher_casts_none_of_its_weights(hooks, tmp_path, folder):
    """What the option is for on a GPU (benchmarks/README.md, "GPU throughput"): autocast re-casts a float32 teacher's
    convolution and linear weights to bf16 on every call; a bf16 teacher's are already bf16."""
    x, sigma = torch.randn((2, 1, 8, 8)), torch.tensor([0.5, 3.0])
    counts = {}
    for name in ("fp32", "bf16"):
        teacher = _run(hooks, tmp_path, folder, f"teacher.dtype={name}", name=name).models.teacher
        params = list(teacher.parameters())
        mode = WeightCasts(params)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), mode:
            teacher(x, sigma)
        counts[name] = mode.casts
    matmul_weights = sum(2 for m in teacher.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert counts == {"fp32": matmul_weights, "bf16": 0}


def test_a_run_with_a_bf16_teacher_trains_in_fp32_and_under_bf16_autocast(hooks, tmp_path, folder):
    for precision in ("no", "bf16"):
        run = _run(hooks, tmp_path, folder, "teacher.dtype=bf16", f"runtime.mixed_precision={precision}", name=precision)
        before = [p.detach().clone() for p in run.models.generator.parameters()]
        for _ in range(2):
            logs = train_iteration(run)
        assert all(bool(torch.isfinite(v).all()) for v in logs.values()), logs
        assert any(not torch.equal(a, b) for a, b in zip(before, run.models.generator.parameters()))


def test_the_digits_teachers_dtype_is_not_part_of_its_training_settings():
    """The cache folder and the folder check depend on how the teacher was trained, not on the dtype it is loaded in."""
    assert DigitsTeacher.settings(DigitsTeacher.Config(dtype="bf16")) == DigitsTeacher.settings(DigitsTeacher.Config())
