"""The tutorial's plugin package, installed with pip and used through the command line.

``docs/examples/scoredistill-example`` is the package the tutorial (docs/tutorial.md)
walks through. This test does what a reader does: installs it with pip, checks that
``scoredistill list`` shows its method and component, runs a short training of its
method on toy2d, and runs the package's own tests.

The package is installed with ``pip install --target`` into a temporary folder that
only this test's subprocesses see (through ``PYTHONPATH``), not into the shared
environment: entry points are discovered from any folder on the path, and other
tests running at the same time (pytest-xdist) never see the extra plugin, even if
this test is interrupted before its cleanup.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "scoredistill-example"
METHOD, COMPONENT, PLUGIN = "example_sid", "example_sid_fisher", "example"


def _run(cmd: list[str], env: dict, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def _scoredistill() -> list[str]:
    """The installed console script, as a reader would type it (fallback: the module)."""
    script = Path(sys.executable).with_name("scoredistill")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "scoredistill.cli"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Install the example package (a copy: the build writes into its source folder); yield the env that sees it."""
    base = tmp_path_factory.mktemp("tutorial_plugin")
    source, target = base / "src", base / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = {**os.environ, "COLUMNS": "250", "SCOREDISTILL_CACHE": str(base / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("SCOREDISTILL_DISABLE_PLUGIN_AUTOLOAD", None)
    env.pop("SCOREDISTILL_BLOCK_PLUGINS", None)
    _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)],
        env, base,
    )
    assert (target / "scoredistill_example" / "methods" / f"{METHOD}.yaml").is_file(), "the method file was not packaged"
    env["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [env.get("PYTHONPATH")])])
    yield {"env": env, "base": base, "source": source}
    shutil.rmtree(base, ignore_errors=True)


def test_list_shows_the_plugin_its_method_and_its_component(installed):
    out = _run([*_scoredistill(), "list"], installed["env"], installed["base"]).stdout
    assert METHOD in out and COMPONENT in out
    plugins_line = next(line for line in out.splitlines() if line.startswith("plugins:"))
    assert PLUGIN in [p.strip() for p in plugins_line.split(":", 1)[1].split(",")]


def test_a_short_run_of_its_method_on_toy2d(installed):
    out_dir = installed["base"] / "run"
    _run(
        [*_scoredistill(), "run", METHOD, "--preset", "toy2d", "--out", str(out_dir),
         "--set", "train.steps=30", "--set", "eval.num_samples=500", "--set", "pairs.num_pairs=300", "--quiet"],
        installed["env"], installed["base"],
    )
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["method"] == METHOD and metrics["preset"] == "toy2d" and metrics["ablations"] == []
    assert metrics["non_finite"] == 0
    assert 0.0 <= metrics["mode_coverage"] <= 1.0
    assert math.isfinite(metrics["energy_distance"]) and math.isfinite(metrics["train_seconds"])
    assert len(metrics["mode_mass"]) == 8

    config = OmegaConf.load(out_dir / "config.yaml")
    assert config.losses.fisher.component == COMPONENT and config.losses.fisher.alpha == 1.2
    assert config.losses.regression.component == "l2_regression"  # the preset's retuning of DMD's term
    assert config.fake_score_loss.component == "fake_score_denoise" and config.pairs.component == "ode_pairs"

    history = json.loads((out_dir / "history.json").read_text())
    assert history and history[-1]["step"] == 30
    assert {"fisher", "regression", "generator", "fake_score"} <= set(history[-1])
    assert all(math.isfinite(v) for record in history for v in record.values())
    for name in ("generator.safetensors", "fake_score.safetensors", "samples.png", "loss_curves.png", "versions.json"):
        assert (out_dir / name).is_file(), name


def test_the_packages_own_tests_pass(installed):
    _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], installed["env"], installed["source"])
