"""Exact resume: a run killed part-way (SIGKILL, SIGTERM, Ctrl-C during the warm-up) and resumed ends
bit for bit where an uninterrupted run of the same length and seed ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from scoredistill import trainer
from scoredistill.cli import main

TINY = ["--preset", "toy2d", "--set", "train.steps=40", "--set", "pairs.num_pairs=300", "--set", "eval.num_samples=300",
        "--set", "train.batch_size=64", "--set", "train.fake_score_warmup_steps=20", "--set", "train.checkpoint_every=10",
        "--set", "train.log_every=5", "--set", "train.sample_every=null", "--quiet"]
# EMA and a cosine schedule (their states must come back too); DMD2: GAN head, 5 fake-score updates per step,
# and the fused optimiser that on_nonfinite=skip uses
CASES = {
    "dmd-ema-cosine": ["dmd", "--set", "train.ema_decay=0.9", "--set", "train.lr_schedule=cosine"],
    "dmd2-skip": ["dmd2", "--set", "train.on_nonfinite=skip", "--set", "train.steps=20"],
}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scoredistill.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def weights(run_dir) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("generator.safetensors", "generator_online.safetensors", "fake_score.safetensors"):
        if (run_dir / name).is_file():
            out.update({f"{name}:{k}": v for k, v in load_file(str(run_dir / name)).items()})
    return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, by case."""
    out = {}
    for name, args in CASES.items():
        run_dir = tmp_path_factory.mktemp("reference") / name
        assert main(["run", *args, "--out", str(run_dir), *TINY]) == 0
        out[name] = run_dir
    return out


def test_sigkill_part_way_then_resume_is_bitwise_exact(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("-p", "scoredistill.faults", "run", *CASES["dmd-ema-cosine"], "--out", str(run_dir), *TINY,
               env={"SCOREDISTILL_FAULT_SIGNAL": "15:SIGKILL"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-step-00000010.safetensors"]
    assert not (run_dir / "generator.safetensors").exists()
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert_bitwise_equal(weights(run_dir), weights(reference["dmd-ema-cosine"]))
    # the history is that of one run: no duplicated or missing steps
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["step"] for r in history] == [r["step"] for r in json.loads((reference["dmd-ema-cosine"] / "history.json").read_text())]
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + len(history) and rows[0].startswith("step,time,")


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_exactly(reference, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("SCOREDISTILL_FAULT_SIGNAL", "15:SIGTERM")
    assert main(["-p", "scoredistill.faults", "run", *CASES["dmd2-skip"], "--out", str(run_dir), *TINY]) == 128 + signal.SIGTERM
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "interrupted by SIGTERM at step 15" in lines[0] and "--resume" in lines[0], lines
    assert (run_dir / "checkpoint-step-00000015.safetensors").is_file()
    monkeypatch.delenv("SCOREDISTILL_FAULT_SIGNAL")
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert_bitwise_equal(weights(run_dir), weights(reference["dmd2-skip"]))


def test_ctrl_c_during_the_warm_up_saves_a_warm_up_checkpoint_and_resumes_exactly(reference, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real_step = trainer.fake_score_step
    calls = {"n": 0}

    def interrupted_step(run, x=None):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: noted by the trainer, not raised
        return real_step(run, x)

    monkeypatch.setattr(trainer, "fake_score_step", interrupted_step)
    assert main(["run", *CASES["dmd-ema-cosine"], "--out", str(run_dir), *TINY]) == 128 + signal.SIGINT
    assert "interrupted by SIGINT at step 0" in capsys.readouterr().err
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-warmup-00000007.safetensors"]
    monkeypatch.setattr(trainer, "fake_score_step", real_step)
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert_bitwise_equal(weights(run_dir), weights(reference["dmd-ema-cosine"]))


def test_a_finished_run_can_be_extended_and_equals_a_longer_run(reference, tmp_path):
    """``--set train.steps=N`` on a finished run (constant schedule) continues it as if it had been asked for N steps."""
    short, longer = tmp_path / "short", tmp_path / "long"
    base = ["dmd", *TINY]
    assert main(["run", *base, "--out", str(short), "--set", "train.steps=20"]) == 0
    assert main(["run", *base, "--out", str(longer), "--set", "train.steps=30"]) == 0
    assert main(["run", "--resume", str(short), "--set", "train.steps=30", "--quiet"]) == 0
    assert_bitwise_equal(weights(short), weights(longer))
    assert "steps: 30" in (short / "config.yaml").read_text()
