"""Bad inputs around runs, resume, checkpoints, export and the new config keys: each gives one line,
exit code 2, no traceback, and leaves every existing run folder as it was.

(tests/test_cli.py and tests/test_config.py cover the method, preset, ablation and --set basics.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

from scoredistill.cli import main
from scoredistill.runlog import tensorboard_writer_class

TINY = ["--preset", "toy2d", "--set", "train.steps=20", "--set", "pairs.num_pairs=300", "--set", "eval.num_samples=200",
        "--set", "train.batch_size=64", "--set", "train.fake_score_warmup_steps=10", "--set", "train.checkpoint_every=10",
        "--set", "train.sample_every=null", "--quiet"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("bad-inputs") / "run"
    assert main(["run", "dmd", "--out", str(run_dir), *TINY]) == 0
    return run_dir


# --------------------------------------------------------------------------- damaged copies of the run


def not_a_run(run: Path, copy: Path) -> None:
    copy.mkdir()
    (copy / "notes.txt").write_text("someone's file\n")


def edited_config(run: Path, copy: Path) -> None:
    shutil.copytree(run, copy)
    text = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(text.replace("batch_size: 64", "batch_size: 65"))


def truncate_latest(run: Path, copy: Path) -> None:
    shutil.copytree(run, copy)
    path = copy / "checkpoint-step-00000020.safetensors"
    path.write_bytes(path.read_bytes()[:5000])


def foreign_checkpoint(run: Path, copy: Path) -> None:
    shutil.copytree(run, copy)
    shutil.copy(copy / "generator.safetensors", copy / "checkpoint-step-00000020.safetensors")


def broken_config(run: Path, copy: Path) -> None:
    shutil.copytree(run, copy)
    (copy / "config.yaml").write_text("method: [dmd\n")


def corrupt_generator(run: Path, copy: Path) -> None:
    shutil.copytree(run, copy)
    (copy / "generator.safetensors").write_bytes(b"not safetensors at all")


def unfinished(run: Path, copy: Path) -> None:
    shutil.copytree(run, copy)
    (copy / "generator.safetensors").unlink()


def export_target(run: Path, copy: Path) -> None:
    copy.mkdir()
    (copy / "keep.txt").write_text("someone's file\n")


NEW = "{tmp}/new"
CASES: list[tuple[str, list[str], str, Optional[Callable[[Path, Path], None]]]] = [
    # resume
    ("resume a folder that does not exist", ["run", "--resume", "{tmp}/nope"], "is not a run folder", None),
    ("resume a finished run", ["run", "--resume", "{run}"], "is already finished at step 20; to train longer: --set train.steps=N", None),
    ("resume with a method too", ["run", "dmd", "--resume", "{run}"], "give either METHOD (a new run) or --resume RUN_DIR, not both", None),
    ("resume with --out", ["run", "--resume", "{run}", "--out", NEW], "--out cannot be used with --resume", None),
    ("resume changing the numbers", ["run", "--resume", "{run}", "--set", "train.batch_size=8"],
     "--set train.batch_size cannot change on --resume", None),
    ("resume with fewer steps", ["run", "--resume", "{run}", "--set", "train.steps=5"], "train.steps=5 is below the checkpoint's step 20", None),
    ("resume with a malformed --set", ["run", "--resume", "{run}", "--set", "train.steps"], "--set expects key=value", None),
    ("resume with a bad value", ["run", "--resume", "{run}", "--set", "train.steps=lots"], "invalid config value 'train.steps'", None),
    ("resume from a checkpoint that is not there", ["run", "--resume", "{run}/checkpoint-step-00000099.safetensors"],
     "no checkpoint '", None),
    ("resume a folder that is not a run's", ["run", "--resume", "{copy}"], "has no config.yaml and no checkpoint, so there is nothing "
     "to resume", not_a_run),
    ("resume after editing config.yaml", ["run", "--resume", "{copy}"], "config.yaml was edited after checkpoint-step-00000020"
     ".safetensors was written (train.batch_size changed)", edited_config),
    ("resume from a truncated checkpoint", ["run", "--resume", "{copy}"], "is corrupt or truncated", truncate_latest),
    ("resume from a file that is not a checkpoint", ["run", "--resume", "{copy}"], "is not a scoredistill checkpoint", foreign_checkpoint),
    ("resume a run whose config.yaml is broken", ["run", "--resume", "{copy}"], "cannot read run config", broken_config),
    # export and sample
    ("export a folder that does not exist", ["export", "{tmp}/nope", NEW], "is not a run folder", None),
    ("export into a folder in use", ["export", "{run}", "{copy}"], "already exists and is not empty", export_target),
    ("export a corrupt generator", ["export", "{copy}", NEW], "cannot load", corrupt_generator),
    ("export an unfinished run", ["export", "{copy}", NEW], "has no generator.safetensors (did the run finish?)", unfinished),
    ("sample the online weights of a run without EMA", ["sample", "{run}", "--num", "5", "--out", "{tmp}/a.npy", "--online"],
     "used no EMA", None),
    # new config keys and where a run may go
    ("run into an existing run folder", ["run", "dmd", "--out", "{run}", *TINY], "already exists and is not empty", None),
    ("unknown non-finite policy", ["run", "dmd", "--out", NEW, "--set", "train.on_nonfinite=maybe"],
     "invalid config value 'train.on_nonfinite'", None),
    ("fp16 on a CPU", ["run", "dmd", "--out", NEW, "--set", "runtime.mixed_precision=fp16"], "needs a CUDA device", None),
    ("checkpoints every 0 steps", ["run", "dmd", "--out", NEW, "--set", "train.checkpoint_every=0"],
     "invalid config value 'train.checkpoint_every'", None),
    ("keep no checkpoint", ["run", "dmd", "--out", NEW, "--set", "train.keep_checkpoints=0"], "invalid config value 'train.keep_checkpoints'", None),
    ("unknown distributed strategy", ["run", "dmd", "--out", NEW, "--set", "runtime.distributed=zero"],
     "invalid config value 'runtime.distributed'", None),
    ("a module learning rate without its network", ["run", "dmd", "--out", NEW, "--set", "train.module_lr={gan_head: 1.0e-4}"],
     "must be generator.SUBMODULE or fake_score.SUBMODULE", None),
    ("a negative module learning rate", ["run", "dmd2", "--out", NEW, "--set", "train.module_lr={fake_score.gan_head: -1}"],
     "invalid config value 'train.module_lr.fake_score.gan_head'", None),
]
if not __import__("torch").cuda.is_available():
    CASES.append(("a CUDA device that is not there", ["run", "dmd", "--out", NEW, "--set", "runtime.device=cuda"], "has no CUDA device", None))
if tensorboard_writer_class() is None:
    CASES.append(("TensorBoard asked for but not installed", ["run", "dmd", "--out", NEW, "--set", "runtime.tensorboard=true"],
                  "the tensorboard package is not installed", None))


def test_there_are_at_least_15_cases():
    assert len(CASES) >= 15


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


@pytest.mark.parametrize("name, args, message, prepare", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(finished, tmp_path, capsys, name, args, message, prepare):
    copy = tmp_path / "copy"
    if prepare is not None:
        prepare(finished, copy)
    argv = [a.replace("{run}", str(finished)).replace("{copy}", str(copy)).replace("{tmp}", str(tmp_path)) for a in args]
    before = snapshot(finished), snapshot(copy)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert (snapshot(finished), snapshot(copy)) == before
    assert not (tmp_path / "new").exists()


def test_through_the_real_command_line_too(finished, tmp_path):
    """The same as a user sees it: a separate process, stderr, exit status."""
    for args, message in [(["run", "--resume", str(finished)], "is already finished")]:
        proc = subprocess.run([sys.executable, "-m", "scoredistill.cli", *args], capture_output=True, text=True, env=os.environ)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr
