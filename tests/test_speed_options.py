"""``runtime.compile`` and ``runtime.channels_last`` act on the networks a run trains (their speed lives in benchmarks/)."""

from __future__ import annotations

import torch

from scoredistill.config import resolve
from scoredistill.images.testing import tiny_diffusers_teacher_folder
from scoredistill.trainer import build, setup


def _compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None  # what nn.Module.compile() sets


def _image_run(hooks, tmp_path, *overrides):
    folder = tiny_diffusers_teacher_folder(tmp_path / "teacher")
    config = resolve(hooks.registry, "dmd", "digits", ["regression"], [
        "teacher.component=diffusers_unet", f"teacher.path={folder}", "generator.component=unet_generator",
        "fake_score.component=unet_denoiser", "train.batch_size=4", "runtime.progress=false", *overrides])
    run = build(config, hooks, tmp_path / "run")
    setup(run)
    return run


def test_compile_compiles_the_unet_inside_each_image_role(hooks, tmp_path):
    """The teacher, generator and fake score are copies of one UNet: the UNets are compiled, not the role wrappers
    (so torch compiles one architecture's code, and preconditioning and guidance stay eager)."""
    run = _image_run(hooks, tmp_path, "runtime.compile=true")
    models = run.models
    for role in (models.teacher, models.generator, models.fake_score):
        assert role.compile_targets() == [role.denoiser.unet]
        assert _compiled(role.denoiser.unet) and not _compiled(role)
    assert run.ema is None or not any(_compiled(m) for m in run.ema.modules())  # the EMA copy was made before


def test_compile_is_off_by_default_and_channels_last_reaches_every_role(hooks, tmp_path):
    run = _image_run(hooks, tmp_path, "runtime.channels_last=true")
    for role in (run.models.teacher, run.models.generator, run.models.fake_score):
        assert not any(_compiled(m) for m in role.modules())
        convs = [m.weight for m in role.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_a_role_without_its_own_targets_is_compiled_whole(hooks, tmp_path):
    """The default ``Role.compile_targets``: the role itself (the toy's MLP roles)."""
    config = resolve(hooks.registry, "dmd", "toy2d", [], ["runtime.compile=true", "runtime.progress=false", "pairs.num_pairs=64"])
    run = build(config, hooks, tmp_path / "run")
    setup(run)
    for role in (run.models.teacher, run.models.generator, run.models.fake_score):
        assert role.compile_targets() == [role] and _compiled(role)


def test_samples_and_evaluation_run_the_compiled_networks_eagerly(hooks, tmp_path):
    """Compiled graphs are for the training step's shapes: generate() (snapshots, evaluation, `sample`) must not
    compile the generator again for its batch sizes (minutes on a GPU for a few calls)."""
    from scoredistill.trainer import generate

    config = resolve(hooks.registry, "dmd", "toy2d", [], ["runtime.compile=true", "runtime.progress=false", "pairs.num_pairs=64",
                                                          "train.ema_decay=null"])
    run = build(config, hooks, tmp_path / "run")
    setup(run)
    assert _compiled(run.sampling_generator)  # without an EMA copy the samples come from the compiled network itself
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    samples = generate(run, 50, seed=0, batch_size=20)
    assert samples.shape == (50, 2) and bool(torch.isfinite(samples).all())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0, dict(torch._dynamo.utils.counters["stats"])
    with torch.no_grad():  # the premise: called directly, outside eager(), the network compiles
        run.sampling_generator(torch.randn(20, 2))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()
