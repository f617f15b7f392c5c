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
    ("report", "SIGTERM", 128 + signal.SIGTERM, "during its evaluation and report", ["generator.safetensors"]),
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


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped by SIGTERM at step 3 (its checkpoint saved)."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    os.environ[ENV_SIGNAL] = "3:SIGTERM"
    try:
        assert main([*RUN, "--out", str(run_dir)]) == 128 + signal.SIGTERM
    finally:
        del os.environ[ENV_SIGNAL]
    return run_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_edited_config_yaml_is_refused_naming_the_changed_keys(stopped, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    text = (run_dir / "config.yaml").read_text()
    assert "batch_size: 32" in text and "steps: 6" in text
    edited = text.replace("batch_size: 32", "batch_size: 16").replace("seed: 0", "seed: 1")
    edited = edited.replace("steps: 6", "steps: 9")  # a setting --set may change: not refused, so not named
    (run_dir / "config.yaml").write_text(edited)
    before = snapshot(run_dir)
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "config.yaml was edited after checkpoint-step-00000003.safetensors" in lines[0], lines
    assert "(seed, train.batch_size changed)" in lines[0] and "--set" in lines[0], lines[0]
    assert snapshot(run_dir) == before
    # the same change through --set is refused as before
    (run_dir / "config.yaml").write_text(text)
    assert main(["run", "--resume", str(run_dir), "--set", "train.batch_size=16", "--quiet"]) == 2
    assert "--set train.batch_size cannot change on --resume" in capsys.readouterr().err


def test_a_deleted_config_yaml_is_restored_from_the_checkpoint(stopped, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    (run_dir / "config.yaml").unlink()
    assert main(["-p", "scoredistill.faults", "run", "--resume", str(run_dir), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "config.yaml was missing: restored from the copy in checkpoint-step-00000003.safetensors" in err, err
    assert_same(contents(run_dir), reference)


def test_a_run_folder_in_use_is_refused_and_a_killed_holder_does_not_block_it(stopped, reference, tmp_path, capsys):
    """A second ``--resume`` of a folder another process is resuming is refused in one line, nothing touched; once
    that process is killed (its lock file left behind), the folder resumes and ends as an uninterrupted run."""
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    first = subprocess.Popen([sys.executable, "-m", "scoredistill.cli", "-p", "scoredistill.faults", "run", "--resume", str(run_dir),
                              "--quiet"], env={**os.environ, ENV_SIGNAL: "build:SIGSTOP"}, stderr=subprocess.PIPE)
    try:  # it stops itself once it holds the folder and begins to build
        deadline = __import__("time").monotonic() + 120
        while not _stopped(first.pid):
            assert first.poll() is None and __import__("time").monotonic() < deadline, first.stderr.read()
            __import__("time").sleep(0.1)
        before = snapshot(run_dir)
        assert main(["-p", "scoredistill.faults", "run", "--resume", str(run_dir), "--quiet"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"is in use by another scoredistill process (process {first.pid})" in lines[0], lines
        assert snapshot(run_dir) == before
        assert main(["run", "dmd", "--out", str(run_dir), *TINY]) == 2  # nor can a new run go there
    finally:
        first.kill()
        first.wait()
    assert (run_dir / ".scoredistill.lock").is_file()  # left by the killed process: stale, not blocking
    assert main(["-p", "scoredistill.faults", "run", "--resume", str(run_dir), "--quiet"]) == 0
    assert not (run_dir / ".scoredistill.lock").exists()
    assert_same(contents(run_dir), reference)


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def test_skipping_more_than_the_bound_ends_with_exit_1_and_metrics_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    skip = ["--set", "train.on_nonfinite=skip", "--set", "losses.boom.component=nan_at", "--set", "losses.boom.steps=[1,2,3]"]
    # 3 of 6 generator updates + 2 warm-up + 6 fake-score updates = 3 of 14 skipped (21%)
    assert main([*RUN, "--out", str(run_dir), *skip]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "skipped 3 of 14 updates (21%), more than train.max_skipped_fraction=0.1" in lines[0], lines
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainer"]["skipped_updates"] == 3  # under the bound it is "done" (test_trainer_faults: 3 of 80)


def test_the_same_seed_gives_identical_checkpoints_whatever_python_and_numpy_drew_before(tmp_path):
    import random

    import numpy as np

    runs = [tmp_path / "a", tmp_path / "b"]
    for k, run_dir in enumerate(runs):
        random.seed(100 + k)  # whatever state the generators had before the run
        np.random.seed(100 + k)
        assert main([*RUN, "--out", str(run_dir), "--set", "seed=7", "--set", "train.steps=3"]) == 0
    a, b = (contents(r) for r in runs)
    assert_same(a, b)
    state = ckpt_module.load(runs[0] / "checkpoint-step-00000003.safetensors").state
    random.seed(7)
    np.random.seed([7, 0])
    assert state["rng"][0]["python"][1] == list(random.getstate()[1])  # nothing in the run drew from them
    assert state["rng"][0]["numpy"][1] == np.random.get_state()[1].tolist()


def test_a_signal_while_the_digits_teacher_trains_stops_the_run_and_its_training_resumes_exactly(tmp_path, monkeypatch):
    """The digits teacher trains while a run is built (13 minutes at full size: here a tiny one). A SIGTERM then
    stops the run at once (its handler raises: the loop's own checkpoint saves cover training only); the teacher's
    training resumes from its own last checkpoint when the run is started again (what ``--resume`` of a run
    without a checkpoint does), and ends with the weights of an uninterrupted training."""
    from scoredistill.images import training
    from scoredistill.images.loading import load_denoiser
    from scoredistill.images.testing import tiny_teacher_settings
    from scoredistill.runner import _Moment, _stop_at_signals
    from scoredistill.trainer import RunInterrupted

    s = tiny_teacher_settings(train_steps=6)
    straight = training.train_digits_teacher(s, tmp_path / "a", progress=False, checkpoint_every=3, log=lambda m: None)
    real_loss, calls = training.edm_loss, {"n": 0}

    def loss_then_signal(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args)

    monkeypatch.setattr(training, "edm_loss", loss_then_signal)
    with pytest.raises(RunInterrupted) as stop, _stop_at_signals(_Moment(None)):
        training.train_digits_teacher(s, tmp_path / "b", progress=False, checkpoint_every=3, log=lambda m: None)
    assert stop.value.phase == "building" and stop.value.checkpoint is None and stop.value.exit_code == 143
    assert (tmp_path / "b.partial" / training.STATE_FILE).is_file() and not (tmp_path / "b").exists()
    monkeypatch.setattr(training, "edm_loss", real_loss)
    logged: list[str] = []
    resumed = training.train_digits_teacher(s, tmp_path / "b", progress=False, checkpoint_every=3, log=logged.append)
    assert any("resuming digits teacher training at step 3/6" in m for m in logged), logged
    a, b = load_denoiser(str(straight)), load_denoiser(str(resumed))
    for (name, p), q in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values()):
        assert torch.equal(p, q), name
