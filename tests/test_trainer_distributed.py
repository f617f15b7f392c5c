"""Two CPU processes (torchrun, gloo): identical weights on both ranks after every step, different noise on each,
quality like one process at the same total batch; FSDP2 (one unit per network) gives the same weights as DDP, bit
for bit (tests/test_fsdp.py: FSDP2 with units, its resume and the sharded teacher)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from scoredistill.cli import main

TINY = ["--preset", "toy2d", "--set", "train.steps=30", "--set", "pairs.num_pairs=300", "--set", "eval.num_samples=400",
        "--set", "train.batch_size=64", "--set", "train.fake_score_warmup_steps=20", "--set", "train.log_every=10",
        "--set", "train.sample_every=null", "--set", "train.ema_decay=0.9", "--set", "runtime.debug_weight_hashes=true", "--quiet"]


def torchrun(*args: str, entry: tuple[str, ...] = ("-m", "scoredistill.cli")) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def hashes(run_dir, rank: int) -> list[dict[str, str]]:
    rows = []
    for line in (run_dir / "debug" / f"weights.rank{rank}.txt").read_text().splitlines():
        step, *fields = line.split()
        rows.append({"step": step, **dict(f.split("=") for f in fields)})
    return rows


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun("run", "dmd", "--out", str(run_dir), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_two_processes_hold_identical_weights_after_every_step(ddp_run):
    rank0, rank1 = hashes(ddp_run, 0), hashes(ddp_run, 1)
    assert [r["step"] for r in rank0] == [str(s) for s in range(1, 31)]
    for a, b in zip(rank0, rank1):
        assert (a["generator"], a["fake_score"]) == (b["generator"], b["fake_score"]), a["step"]
        assert a["rng"] != b["rng"]  # each process draws its own noise
    assert len({r["generator"] for r in rank0}) == 30  # and the weights do change
    assert json.loads((ddp_run / "metrics.json").read_text())["trainer"]["processes"] == 2


def test_two_processes_train_like_one_at_the_same_total_batch(ddp_run, tmp_path):
    one = tmp_path / "one"
    assert main(["run", "dmd", "--out", str(one), *TINY]) == 0
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((ddp_run / "metrics.json").read_text())
    assert m1["trainer"]["processes"] == 1
    # 30 steps are far from converged; both must be equally far along
    assert m2["mode_coverage"] >= m1["mode_coverage"] - 0.125, (m1, m2)
    assert m2["energy_distance"] <= 1.5 * m1["energy_distance"] + 0.05, (m1["energy_distance"], m2["energy_distance"])
    assert m2["non_finite"] == 0


def test_fsdp_gives_the_weights_of_ddp(ddp_run, tmp_path):
    run_dir = tmp_path / "fsdp"
    proc = torchrun("run", "dmd", "--out", str(run_dir), *TINY, "--set", "runtime.distributed=fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hashes(run_dir, 0) == hashes(ddp_run, 0)
    a, b = load_file(str(run_dir / "generator.safetensors")), load_file(str(ddp_run / "generator.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


FREED_CHECK = """
import gc, sys
import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from scoredistill.cli import main

code = main(sys.argv[1:])
alive = [type(o).__name__ for o in gc.get_objects() if isinstance(o, (FSDPModule, DistributedDataParallel))]
print("alive wrappers:", alive, "group:", torch.distributed.is_initialized(), file=sys.stderr)
sys.exit(code or (3 if alive or torch.distributed.is_initialized() else 0))
"""


def test_a_finished_run_frees_its_process_group(tmp_path):
    # left to interpreter exit, the group's gloo threads could abort the process (SIGABRT) after a good run
    script = tmp_path / "freed.py"
    script.write_text(FREED_CHECK)
    proc = torchrun("run", "dmd", "--out", str(tmp_path / "run"), *TINY, "--set", "train.steps=3", "--set", "runtime.distributed=fsdp",
                    entry=(str(script),))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("alive wrappers: [] group: False") == 2
