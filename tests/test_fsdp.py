"""FSDP2 (``runtime.distributed=fsdp``, torch's ``fully_shard``) with two CPU processes (torchrun, gloo): the weights
of DDP, bitwise resume after SIGKILL, the frozen teacher sharded (local shard sizes counted), the mixed-precision
policy applied (gathered weights in bf16, float32 shards and gradients), and the units the size policy picks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from scoredistill.images.testing import tiny_diffusers_teacher_folder
from scoredistill.sharding import units

TOY = ["--preset", "toy2d", "--set", "train.steps=6", "--set", "pairs.num_pairs=200", "--set", "eval.num_samples=200",
       "--set", "train.batch_size=32", "--set", "train.fake_score_warmup_steps=2", "--set", "train.log_every=1",
       "--set", "train.sample_every=3", "--set", "train.sample_count=50", "--set", "train.ema_decay=0.9",
       "--set", "runtime.fsdp_min_params=5000", "--quiet"]
OUTPUTS = ("generator.safetensors", "generator_online.safetensors", "fake_score.safetensors")


def torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "scoredistill.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


def fsdp_run(out: Path, *extra: str, plugins: tuple[str, ...] = (), env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return torchrun(*plugins, "run", "dmd", "--out", str(out), *TOY, "--set", "runtime.distributed=fsdp", *extra, env=env)


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    proc = fsdp_run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_units_are_the_smallest_modules_of_min_params_and_the_teacher_is_covered():
    net = nn.Sequential(nn.Linear(10, 10), nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20)), nn.LayerNorm(20))
    # 110 | (220 | 420) | 40 parameters
    assert units(net, 200) == [net[1][0], net[1][2]]  # the smallest of >= 200; not net[1] (it holds units)
    assert units(net, 500) == [net[1]]
    assert units(net, None) == []  # one unit: the root's
    covered = units(net, 200, cover=True)  # the frozen teacher: every parameter in some unit
    assert covered == [net[1][0], net[1][2], net[0], net[2]]
    assert {id(p) for u in covered for p in u.parameters()} == {id(p) for p in net.parameters()}
    assert units(net, None, cover=True) == [net[0], net[1][0], net[1][2], net[2]]  # the layers
    blocks = nn.Sequential(nn.ModuleList([nn.Linear(10, 10), nn.Linear(10, 10)]), nn.Linear(10, 10))
    assert units(blocks, 200) == [blocks[0][0], blocks[0][1]]  # a ModuleList (no forward) is a unit by its members


def test_fsdp2_with_units_gives_the_weights_of_ddp(fsdp_reference, tmp_path):
    ddp = tmp_path / "ddp"
    proc = torchrun("run", "dmd", "--out", str(ddp), *TOY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in OUTPUTS:
        a, b = load_file(str(fsdp_reference / name)), load_file(str(ddp / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


def test_sigkill_then_resume_with_fsdp2_on_two_processes_is_bitwise(fsdp_reference, tmp_path):
    killed = tmp_path / "killed"
    proc = fsdp_run(killed, "--set", "train.checkpoint_every=2", plugins=("-p", "scoredistill.faults"),
                    env={"SCOREDISTILL_FAULT_SIGNAL": "3:SIGKILL"})
    assert proc.returncode != 0 and not (killed / "metrics.json").exists(), proc.stderr[-3000:]
    assert [p.name for p in killed.glob("checkpoint-*")] == ["checkpoint-step-00000002.safetensors"]
    assert not (killed / "generator.safetensors").exists()
    proc = torchrun("run", "--resume", str(killed), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in OUTPUTS:
        a, b = load_file(str(killed / name)), load_file(str(fsdp_reference / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


PROBE = '''
"""A plugin that records, on every rank, what FSDP made of the run (tests/test_fsdp.py)."""
import json, os
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from scoredistill.hookspecs import hookimpl
from scoredistill.sharding import local_numel

OUT = os.environ["FSDP_PROBE_DIR"]
SEEN = {"unit_in_forward": set(), "teacher_unit_in_forward": set()}


def dtypes(params):
    return sorted({str(p.dtype) for p in params})


def watch(module, key):  # runs after FSDP's own pre-hook (registered first): the unit's weights as its forward sees them
    module.register_forward_pre_hook(lambda m, args: SEEN[key].update(dtypes(m.parameters(recurse=False))))


@hookimpl
def scoredistill_train_start(run):
    engine, teacher = run.engine, run.models.teacher
    g = run.trained["generator"]
    units = [m for m in run.models.generator.modules() if isinstance(m, FSDPModule)]
    watch(next(m for m in units if any(True for _ in m.parameters(recurse=False))), "unit_in_forward")
    watch(next(m for m in teacher.modules() if isinstance(m, FSDPModule) and any(True for _ in m.parameters(recurse=False))),
          "teacher_unit_in_forward")
    with engine.full_parameters(g.wrapper):  # the root's own parameters, gathered
        root_own = dtypes(p for p in run.models.generator.parameters() if not isinstance(p, DTensor))
    record = {"rank": engine.rank, "teacher_total": sum(p.numel() for p in teacher.parameters()),
              "teacher_local": local_numel(teacher), "generator_total": sum(p.numel() for p in g.params),
              "generator_local": local_numel(run.models.generator), "generator_shards": dtypes(g.params),
              "root_gathered": root_own, "teacher_shards": dtypes(teacher.parameters()), "units": len(units)}
    with open(os.path.join(OUT, f"start{engine.rank}.json"), "w") as f:
        json.dump(record, f)


@hookimpl
def scoredistill_train_step_end(run, step, logs):
    if step == 1:
        g = run.trained["generator"]
        with open(os.path.join(OUT, f"step{run.engine.rank}.json"), "w") as f:
            teacher_units = [m for m in run.models.teacher.modules() if isinstance(m, FSDPModule)]
            notes = sum(len(m._get_fsdp_state()._comm_ctx.post_forward_order) for m in teacher_units)
            json.dump({"grads": dtypes(p.grad for p in g.params if p.grad is not None), "teacher_forward_notes": notes,
                       **{k: sorted(v) for k, v in SEEN.items()}}, f)
'''


def test_the_teacher_is_sharded_and_the_mixed_precision_policy_applied(tmp_path):
    folder = tiny_diffusers_teacher_folder(tmp_path / "teacher")
    (tmp_path / "fsdp_probe.py").write_text(PROBE)
    sets = ["teacher.component=diffusers_unet", f"teacher.path={folder}", "generator.component=unet_generator",
            "fake_score.component=unet_denoiser", "train.batch_size=4", "train.fake_score_warmup_steps=0",
            "train.sample_every=null", "eval.num_samples=8", "teacher.sampler_steps=2", "train.steps=2", "train.log_every=1",
            "runtime.distributed=fsdp", "runtime.fsdp_min_params=1000", "runtime.mixed_precision=bf16"]
    out = tmp_path / "run"
    proc = torchrun("-p", "fsdp_probe", "run", "dmd", "--preset", "digits", "--ablate", "regression", "--out", str(out),
                    "--quiet", *[a for s in sets for a in ("--set", s)],
                    env={"FSDP_PROBE_DIR": str(tmp_path), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = [json.loads((tmp_path / f"start{r}.json").read_text()) for r in (0, 1)]
    for r in start:
        # each rank holds half of the teacher's parameters (dimension-0 shards, rounded up), not all of them
        assert 0.48 * r["teacher_total"] <= r["teacher_local"] <= 0.56 * r["teacher_total"], r
        assert 0.48 * r["generator_total"] <= r["generator_local"] <= 0.56 * r["generator_total"], r
        assert r["teacher_shards"] == r["generator_shards"] == ["torch.float32"]  # the masters stay float32
        assert r["root_gathered"] == ["torch.bfloat16"] and r["units"] > 1  # param_dtype: the run's bf16
    assert start[0]["teacher_local"] + start[1]["teacher_local"] >= start[0]["teacher_total"]
    for r in (0, 1):
        step = json.loads((tmp_path / f"step{r}.json").read_text())
        assert step["unit_in_forward"] == step["teacher_unit_in_forward"] == ["torch.bfloat16"]  # gathered in bf16
        assert step["grads"] == ["torch.float32"]  # reduce_dtype float32: the sharded gradients the optimiser steps on
        assert step["teacher_forward_notes"] == 0  # FSDP's per-forward notes of the no-grad teacher calls do not pile up
    assert (out / "metrics.json").is_file()  # the evaluation ran the (gathered) teacher on the main process


def test_lora_with_fsdp_is_a_one_line_error_before_training(tmp_path):
    folder = tiny_diffusers_teacher_folder(tmp_path / "teacher")
    sets = ["teacher.component=diffusers_unet", f"teacher.path={folder}", "generator.component=unet_generator",
            "fake_score.component=unet_denoiser", "train.batch_size=4", "train.lora.rank=2", "runtime.distributed=fsdp"]
    out = tmp_path / "run"
    proc = torchrun("run", "dmd", "--preset", "digits", "--ablate", "regression", "--out", str(out), "--quiet",
                    *[a for s in sets for a in ("--set", s)])
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("scoredistill: error")]
    assert lines and all("train.lora cannot be used with runtime.distributed=fsdp" in ln for ln in lines), proc.stderr[-2000:]
    # (torchrun prints its own traceback when a process exits with an error; none comes from scoredistill's code)
    assert not [ln for ln in proc.stderr.splitlines() if 'File "' in ln and "scoredistill" in ln], proc.stderr[-2000:]
    assert not list(out.glob("checkpoint-*"))
