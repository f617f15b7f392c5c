"""The command line: run, sample, list, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scoredistill.cli import main

TINY = ["--preset", "toy2d", "--set", "train.steps=30", "--set", "train.fake_score_warmup_steps=10", "--set", "train.batch_size=128",
        "--set", "pairs.num_pairs=256", "--set", "eval.num_samples=400", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dmd"
    assert main(["run", "dmd", "--preset", "toy2d", "--out", str(out), *TINY]) == 0
    return out


def test_run_folder_has_everything(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.yaml", "versions.json", "metrics.json", "history.json", "samples.png", "loss_curves.png",
            "generator.safetensors", "fake_score.safetensors"} <= names
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("mode_coverage", "mode_mass", "energy_distance", "within_3std", "mode_std_ratio"):
        assert key in metrics and key in metrics["teacher"]
    assert len(metrics["mode_mass"]) == 8 and abs(sum(metrics["mode_mass"]) - 1) < 1e-3
    versions = json.loads((tiny_run / "versions.json").read_text())
    assert versions["torch"] and versions["scoredistill"]


def test_sample_writes_float32_array_and_is_seeded(tiny_run, tmp_path):
    a, b, c = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "c.npy"
    assert main(["sample", str(tiny_run), "--num", "123", "--out", str(a), "--seed", "1"]) == 0
    assert main(["sample", str(tiny_run), "--num", "123", "--out", str(b), "--seed", "1"]) == 0
    assert main(["sample", str(tiny_run), "--num", "123", "--out", str(c), "--seed", "2"]) == 0
    x = np.load(a)
    assert x.shape == (123, 2) and x.dtype == np.float32
    assert np.array_equal(x, np.load(b)) and not np.array_equal(x, np.load(c))


def test_runs_are_deterministic(tiny_run, tmp_path):
    out = tmp_path / "again"
    assert main(["run", "dmd", "--preset", "toy2d", "--out", str(out), *TINY]) == 0
    assert (out / "generator.safetensors").read_bytes() == (tiny_run / "generator.safetensors").read_bytes()


def test_list_shows_methods_components_presets_and_ablations(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("dmd", "kl_gradient", "fake_score_denoise", "lpips_regression", "l2_regression",
                 "pseudo_huber_regression", "ode_pairs", "gaussian_mixture", "toy2d", "distribution_matching", "sample_itself"):
        assert word in out


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "scoredistill.cli", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "dmdx"], "unknown method 'dmdx'"),
        (["run", "dmd", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "dmd", "--ablate", "gan"], "unknown ablation 'gan'"),
        (["run", "dmd", "--set", "generator.component=resnet"], "unknown generator component 'resnet'"),
        (["run", "dmd", "--set", "train.stepz=1"], "unknown config key 'train.stepz'"),
        (["run", "dmd", "--set", "train.steps=lots"], "invalid config value 'train.steps'"),
        (["run", "dmd", "--preset", "toy2d", "--set", "teacher.weights=[1,1,1,1,1,1,1,1]"], "sum to 1"),
        (["run", "dmd", "--ablate", "regression", "--ablate", "distribution_matching"], "nothing would train the generator"),
        (["run", "dmd", "--preset", "toy2d", "--set", "runtime.cuda_graph=true"], "runtime.cuda_graph=true cannot be used"),
        (["run"], "the following arguments are required"),
        (["frobnicate"], "invalid choice"),
        (["sample", "/nonexistent", "--num", "3", "--out", "x.npy"], "is not a run folder"),
        (["-p", "no_such_module", "list"], "cannot import plugin module 'no_such_module'"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_existing_run_folder_is_never_overwritten(tiny_run):
    before = {p.name: p.read_bytes() for p in tiny_run.iterdir()}
    proc = _cli("run", "dmd", "--out", str(tiny_run), *TINY)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert {p.name: p.read_bytes() for p in tiny_run.iterdir()} == before


def test_sample_rejects_bad_arguments(tiny_run, tmp_path):
    for args, message in [(["--num", "0", "--out", str(tmp_path / "a.npy")], "--num must be an integer from 1"),
                          (["--num", "5", "--out", str(tmp_path / "a.txt")], "must be a .npy file")]:
        proc = _cli("sample", str(tiny_run), *args)
        assert proc.returncode == 2 and message in proc.stderr
