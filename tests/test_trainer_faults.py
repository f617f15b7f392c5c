"""Faults: a damaged checkpoint is refused in one line and the previous one still resumes exactly;
a non-finite loss or gradient stops the run (keeping the last good checkpoint) or is skipped and counted."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from scoredistill.cli import main

TINY = ["--preset", "toy2d", "--set", "train.steps=30", "--set", "pairs.num_pairs=300", "--set", "eval.num_samples=300",
        "--set", "train.batch_size=64", "--set", "train.fake_score_warmup_steps=20", "--set", "train.checkpoint_every=10",
        "--set", "train.keep_checkpoints=3", "--set", "train.log_every=5", "--set", "train.sample_every=null", "--quiet"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    assert main(["run", "dmd", "--out", str(run_dir), *TINY]) == 0
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == [
        f"checkpoint-step-000000{n}0.safetensors" for n in (1, 2, 3)]
    return run_dir


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's bytes: safetensors still parses, the checksum does not match
    path.write_bytes(bytes(data))


def edit_header(old: bytes, new: bytes):
    """A same-length change inside the checkpoint's JSON header (safetensors still parses it)."""
    assert len(old) == len(new)

    def damage(path):
        data = path.read_bytes()
        assert data.count(old) >= 1, old
        path.write_bytes(data.replace(old, new, 1))
    damage.__name__ = f"edit_{old.decode()}"
    return damage


SUM = "is corrupt: its tensors, state or config do not match the SHA-256 checksum"


@pytest.mark.parametrize("damage, message", [
    (truncate, "is corrupt or truncated"), (flip_a_bit, SUM),
    (edit_header(b'\\"lr\\": 0.001', b'\\"lr\\": 0.000'), SUM),  # an optimiser's learning rate in the state JSON
    (edit_header(b'\\"step\\": 30', b'\\"step\\": 20'), SUM),  # the step counter
    (edit_header(b"batch_size: 64", b"batch_size: 65"), SUM),  # the config stored in the checkpoint
], ids=["truncated", "tensor-bit", "state-lr", "state-step", "config"])
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_resumes_exactly(finished, tmp_path, capsys, damage, message):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    latest = run_dir / "checkpoint-step-00000030.safetensors"
    damage(latest)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    if damage in (truncate, flip_a_bit):  # as a user sees it: a separate process
        proc = subprocess.run([sys.executable, "-m", "scoredistill.cli", "run", "--resume", str(run_dir), "--quiet"],
                              capture_output=True, text=True, env=os.environ)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = main(["run", "--resume", str(run_dir), "--quiet"]), capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    previous = run_dir / "checkpoint-step-00000020.safetensors"
    assert f"checkpoint {latest} {message}" in lines[0] and f"--resume {previous}" in lines[0], lines[0]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # nothing was touched
    # the previous checkpoint is usable, and the steps after it come out the same again
    (run_dir / "generator.safetensors").unlink()
    assert main(["run", "--resume", str(previous), "--quiet"]) == 0
    a, b = load_file(str(run_dir / "generator.safetensors")), load_file(str(finished / "generator.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_file(str(latest)).keys() == load_file(str(finished / latest.name)).keys()  # rewritten whole


def test_checkpoint_files_are_shared_by_umask_and_a_kill_mid_write_leaves_nothing_behind(finished, tmp_path):
    """A SIGKILL while safetensors writes a checkpoint leaves its own ``.tmpXXXXXX`` file; the next save (here:
    the resumed run's) deletes it. Every checkpoint and weight file gets mode 0666 & ~umask, not mkstemp's 0600."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    junk = tmp_path / "junk"
    junk.mkdir()
    writer = ("import torch, sys; from scoredistill import checkpoint as c; t = {'w': torch.ones(48 << 20)}\n"
              "while True: c.save(sys.argv[1], 'checkpoint-step-00000099.safetensors', t, {}, '', 1)")
    left = []
    for _ in range(5):  # the kill must land inside safetensors' write: watch for its temporary file, then kill
        proc = subprocess.Popen([sys.executable, "-c", writer, str(junk)])
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if any(p.name.startswith(".tmp") for p in junk.iterdir()):
                    break
        finally:
            proc.kill()
            proc.wait()
        left = [p for p in junk.iterdir() if p.name.startswith(".tmp")]
        if left:
            break
    assert left, "no partial write was caught"
    for p in left:
        shutil.move(p, run_dir / p.name)
    old = os.umask(0o022)
    try:
        assert main(["run", "--resume", str(run_dir), "--set", "train.steps=40", "--quiet"]) == 0
    finally:
        os.umask(old)
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    for p in [*run_dir.glob("checkpoint-*.safetensors"), run_dir / "generator.safetensors"]:
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))


@pytest.mark.parametrize("gradient_only, what", [(False, "non-finite loss term 'boom'"), (True, "non-finite gradient of the generator")])
def test_a_non_finite_update_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, gradient_only, what):
    run_dir = tmp_path / "run"
    code = main(["-p", "scoredistill.faults", "run", "dmd", "--out", str(run_dir), *TINY, "--set", "losses.boom.component=nan_at",
                 "--set", "losses.boom.steps=[17]", "--set", f"losses.boom.gradient_only={str(gradient_only).lower()}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and f"{what} at generator step 17" in err[0], err
    assert "checkpoint-step-00000010.safetensors" in err[0] and "train.on_nonfinite=skip" in err[0]
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-step-00000010.safetensors"]
    assert not (run_dir / "generator.safetensors").exists()
    assert main(["-p", "scoredistill.faults", "run", "--resume", str(run_dir), "--set", "train.steps=15", "--quiet"]) == 0


def test_skip_mode_skips_and_counts_non_finite_updates(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["-p", "scoredistill.faults", "run", "dmd", "--out", str(run_dir), *TINY, "--set", "train.on_nonfinite=skip",
                 "--set", "losses.boom.component=nan_at", "--set", "losses.boom.steps=[3,7,8]"]) == 0
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [(r["step"], r["skipped"]) for r in rows] == [("5", "1.0"), ("10", "3.0"), ("15", "3.0"), ("20", "3.0"), ("25", "3.0"), ("30", "3.0")]
    assert all(torch.isfinite(v).all() for v in load_file(str(run_dir / "generator.safetensors")).values())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["non_finite"] == 0 and metrics["trainer"]["skipped_updates"] == 3
