"""A run stopped at any moment of its life (building, pairs, training, after training, evaluation, report; by
SIGTERM, SIGKILL or a full disk) is finished by one ``scoredistill run --resume DIR``, ending identical to an
uninterrupted run: the same files, the same weights and checkpoints bit for bit, the same metrics and history
(timings aside)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scoredistill import checkpoint as ckpt_module
from scoredistill import io as sd_io
from scoredistill.cli import main
from scoredistill.faults import ENV_SIGNAL

TINY = ["--preset", "toy2d", "--set", "train.steps=6", "--set", "train.fake_score_warmup_steps=2", "--set", "train.batch_size=32",
        "--set", "pairs.num_pairs=64", "--set", "eval.num_samples=64", "--set", "train.sample_every=null",
        "--set", "train.log_every=3", "--set", "train.checkpoint_every=3", "--quiet"]
RUN = ["-p", "scoredistill.faults", "run", "dmd", *TINY]
TIMINGS = ("train_seconds", "checkpoint_seconds", "time")


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scoredistill.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def untimed(obj):
    """``obj`` without its wall-clock timings (the only thing a resumed run may differ in)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def contents(run_dir: Path) -> dict:
    """Everything a run folder holds that must not depend on an interruption: file names, every tensor of the
    weights and checkpoints (optimiser and RNG states included), the checkpoints' state, metrics, history."""
    out: dict = {"files": sorted(p.name for p in run_dir.iterdir())}
    for path in sorted(run_dir.glob("*.safetensors")):
        out.update({f"{path.name}:{k}": v for k, v in load_file(str(path)).items()})
        if path.name.startswith("checkpoint-"):
            out[f"{path.name}:state"] = untimed(ckpt_module.load(path).state)
    for name in ("metrics.json", "history.json"):
        out[name] = untimed(json.loads((run_dir / name).read_text()))
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    out["metrics.csv"] = [",".join(c for i, c in enumerate(r.split(",")) if i != 1) for r in rows]  # column 1: time
    out["config.yaml"] = (run_dir / "config.yaml").read_text()
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a["files"] == b["files"]
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert main([*RUN, "--out", str(run_dir)]) == 0
    return contents(run_dir)


def full_disk_at(name: str):
    def fault(monkeypatch):
        def atomic_write(path, write, real=sd_io.atomic_write):
            if Path(path).name.startswith(name):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real(path, write)

        monkeypatch.setattr(sd_io, "atomic_write", atomic_write)
        monkeypatch.setattr(ckpt_module, "atomic_write", atomic_write)
    return fault


# moment, how it is stopped, exit status, a word of its message, what the folder then holds
MOMENTS = [
    ("build", "SIGTERM", 128 + signal.SIGTERM, "before its first checkpoint", []),
    ("pairs", "SIGKILL", -signal.SIGKILL, None, []),
    ("first checkpoint", full_disk_at("checkpoint-"), 2, "No space left on device", []),
    ("3", "SIGTERM", 128 + signal.SIGTERM, "at step 3", ["checkpoint-step-00000003.safetensors"]),
    ("train_end", "SIGTERM", 128 + signal.SIGTERM, "after training (step 6", ["checkpoint-step-00000006.safetensors"]),
    ("evaluate", "SIGTERM", 128 + signal.SIGTERM, "after training (step 6", ["generator.safetensors"]),
    ("report", "SIGKILL", -signal.SIGKILL, None, ["generator.safetensors"]),
    ("metrics.json", full_disk_at("metrics.json"), 2, "No space left on device", ["loss_curves.png", "samples.png"]),
]


@pytest.mark.parametrize("moment, how, code, message, present", MOMENTS, ids=[f"{m[0]}-{m[1] if isinstance(m[1], str) else 'full-disk'}"
                                                                             for m in MOMENTS])
def test_a_run_stopped_at_any_moment_is_finished_by_one_resume(reference, tmp_path, monkeypatch, capsys, moment, how, code, message,
                                                                present):
    run_dir = tmp_path / "run"
    if moment == "pairs":  # the pairs are made, not read from the cache, in the stopped run and in its resume
        monkeypatch.setenv("SCOREDISTILL_CACHE", str(tmp_path / "cache"))
    if callable(how):
        how(monkeypatch)
        assert main([*RUN, "--out", str(run_dir)]) == code
    elif how == "SIGKILL":  # no handler runs: a separate process
        proc = cli(*RUN, "--out", str(run_dir), env={ENV_SIGNAL: f"{moment}:{how}"})
        assert proc.returncode == code, proc.stderr
    else:
        monkeypatch.setenv(ENV_SIGNAL, f"{moment}:{how}")
        assert main([*RUN, "--out", str(run_dir)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    if message is not None:
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
        assert "--resume" in err[0], err
    assert not (run_dir / "metrics.json").exists()  # not finished
    assert all((run_dir / name).is_file() for name in ["config.yaml", *present])
    monkeypatch.undo()
    if moment == "pairs":
        monkeypatch.setenv("SCOREDISTILL_CACHE", str(tmp_path / "cache"))
    assert main(["-p", "scoredistill.faults", "run", "--resume", str(run_dir), "--quiet"]) == 0
    assert_same(contents(run_dir), reference)


def test_a_folder_with_nothing_to_resume_says_what_to_do(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", "--resume", str(empty)]) == 2
    line = capsys.readouterr().err.strip()
    assert "is empty" in line and f"scoredistill run METHOD --out {empty}" in line and "\n" not in line
    assert main(["run", "dmd", "--out", str(empty), *TINY, "--set", "train.steps=1"]) == 0  # and it can be used
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    assert main(["run", "--resume", str(other)]) == 2
    line = capsys.readouterr().err.strip()
    assert "has no config.yaml and no checkpoint" in line and "\n" not in line
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
