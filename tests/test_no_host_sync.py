"""A training iteration never reads a device value back to the host (no syncs in the hot path: a GPU run must not wait on the host).

On a GPU, ``.item()``, ``float(t)``, ``bool(t)``, ``nonzero`` and boolean-mask indexing make
the CPU wait for every kernel queued so far, and a tensor built from Python data is a
host-to-device copy. Each shows up as an aten op on any device, so this is checked on CPU:
a dispatch mode records every such op made inside :func:`trainer.train_iteration`, with
the Python line that made it. The device-side check is ``benchmarks/gpu_dmd.py``'s
``torch.cuda.set_sync_debug_mode`` pass.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scoredistill import trainer
from scoredistill.config import resolve
from scoredistill.plugins import Hooks, make_plugin_manager

#: aten ops that wait for the device (their result sizes or values are needed on the host)
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2", "unique_dim",
              "unique_consecutive", "repeat_interleave"}
#: aten ops that make a tensor from Python data (a host-to-device copy on a GPU)
FROM_HOST = {"lift_fresh", "lift_fresh_copy"}


class HostReads(TorchDispatchMode):
    """Records the ops in :data:`HOST_READS` and :data:`FROM_HOST`, and boolean-mask indexing, by source line."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        masked = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if name in HOST_READS or name in FROM_HOST or masked:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
            self.seen[f"{name}{'[bool mask]' if masked else ''} at {where}"] += 1
        return func(*args, **(kwargs or {}))


def test_the_check_sees_a_host_read():
    x = torch.randn(5, requires_grad=True)
    with HostReads() as mode:
        y = (x * 2).sum()
        y.backward()
    assert not mode.seen
    with HostReads() as mode:
        float(y.detach()), x[x > 0], torch.tensor(0.5)
    assert sum(mode.seen.values()) == 3, mode.seen


def _iterations_read_nothing(config, tmp_path, iterations: int = 3) -> None:
    run = trainer.build(config, Hooks(make_plugin_manager()), tmp_path)
    trainer.setup(run)
    trainer.train_iteration(run)  # lazy state (optimiser moments, the EMA's first copy) outside the check
    with HostReads() as mode:
        for _ in range(iterations):
            logs = trainer.train_iteration(run)
    assert not mode.seen, "host reads in train_iteration:\n" + "\n".join(f"{n} x {k}" for k, n in mode.seen.items())
    assert all(torch.isfinite(v).all() for v in logs.values())


def _variants():
    reg = Hooks(make_plugin_manager()).registry
    for name in sorted(reg.methods):
        yield name


TOY = ["train.batch_size=32", "pairs.num_pairs=64", "runtime.progress=false", "train.fake_score_warmup_steps=0"]


@pytest.mark.parametrize("method", list(_variants()))
@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_toy2d_iterations_read_nothing_back(hooks, tmp_path, method, on_nonfinite):
    config = resolve(hooks.registry, method, "toy2d", [], TOY + [f"train.on_nonfinite={on_nonfinite}"])
    _iterations_read_nothing(config, tmp_path)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_diffusers_unet_iterations_read_nothing_back(hooks, tmp_path, precision):
    """The GPU benchmark's setting, small: a diffusers UNet2DModel teacher (EDM scheduler config), DMD without regression."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                 norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "teacher" / "unet")
    diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5).save_pretrained(tmp_path / "teacher" / "scheduler")
    overrides = ["teacher.component=diffusers_unet", f"teacher.path={tmp_path / 'teacher'}", "generator.component=unet_generator",
                 "fake_score.component=unet_denoiser", "train.batch_size=4", f"runtime.mixed_precision={precision}",
                 "runtime.progress=false", "train.fake_score_warmup_steps=0"]
    config = resolve(hooks.registry, "dmd", "digits", ["regression"], overrides)
    _iterations_read_nothing(config, tmp_path / "run")


def test_class_conditional_iterations_read_nothing_back(hooks, tmp_path):
    """Labels are drawn on the device each step (no host-to-device copy), pairs keep theirs there."""
    from scoredistill.images.testing import tiny_diffusers_teacher_folder

    folder = tiny_diffusers_teacher_folder(tmp_path / "teacher", num_class_embeds=11)
    overrides = ["teacher.component=diffusers_unet", f"teacher.path={folder}", "teacher.null_class=10",
                 "teacher.guidance_scale=2.0", "pairs.num_pairs=16", "pairs.steps=3", "train.batch_size=4",
                 "runtime.progress=false", "train.fake_score_warmup_steps=0"]
    config = resolve(hooks.registry, "dmd", "digits", [], overrides)
    _iterations_read_nothing(config, tmp_path / "run")


def test_class_conditional_toy_iterations_read_nothing_back(hooks, tmp_path):
    config = resolve(hooks.registry, "dmd", "toy2d", [], TOY + ["teacher.class_conditional=true"])
    _iterations_read_nothing(config, tmp_path)
