"""Faults of the file system and of the cache, end to end through the CLI: a read-only or full disk is one
line with exit code 2 (no traceback, nothing left half-written); a full disk on ``metrics.csv`` costs that file
only; a truncated ODE-pair cache is discarded and solved again, with the same numbers."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scoredistill import io as sd_io
from scoredistill import runlog
from scoredistill.cli import main

TINY = ["--preset", "toy2d", "--set", "train.steps=6", "--set", "train.fake_score_warmup_steps=0", "--set", "train.batch_size=32",
        "--set", "pairs.num_pairs=64", "--set", "eval.num_samples=64", "--set", "train.sample_every=null",
        "--set", "train.log_every=2", "--quiet"]


def _tmpfs(where: Path, options: str) -> bool:
    """Mount a tiny tmpfs at ``where`` (root only, where the kernel lets us); False if that cannot be done here."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "none", str(where)], capture_output=True).returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def _one_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_out_on_a_read_only_file_system_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    if not _tmpfs(ro, "ro,size=1m"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        line = _one_line(main(["run", "dmd", "--out", str(ro / "run"), *TINY]), capsys.readouterr().err)
        assert "is not writable (read-only file system" in line
        line = _one_line(main(["teacher", "train", "--out", str(ro / "teacher")]), capsys.readouterr().err)
        assert "is not writable" in line
    finally:
        _umount(ro)


@pytest.fixture(params=["tmpfs", "simulated"])
def full_disk(request, tmp_path, monkeypatch):
    """A folder on a full disk: a real full tmpfs (root), or ENOSPC from every atomic write (anyone)."""
    folder = tmp_path / "disk"
    if request.param == "tmpfs":
        if not _tmpfs(folder, "size=256k"):
            pytest.skip("cannot mount a tmpfs here (needs root)")
        try:
            with open(folder / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        yield folder
        _umount(folder)
    else:
        real = sd_io.atomic_write

        def atomic_write(path, write):
            if Path(path).is_relative_to(folder):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real(path, write)

        monkeypatch.setattr(sd_io, "atomic_write", atomic_write)
        folder.mkdir()
        yield folder


def test_a_full_disk_at_start_up_is_one_line(full_disk, capsys):
    line = _one_line(main(["run", "dmd", "--out", str(full_disk / "run"), *TINY]), capsys.readouterr().err)
    assert "No space left on device" in line and "free some space" in line
    assert not list((full_disk / "run").glob("*.tmp")) and not list((full_disk / "run").glob(".*"))


def test_a_full_disk_on_metrics_csv_costs_that_file_only(tmp_path, capsys, monkeypatch):
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        if Path(path).name == runlog.METRICS_CSV and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(runlog, "open", full_open, raising=False)
    out = tmp_path / "run"
    assert main(["run", "dmd", "--out", str(out), *TINY]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in err if "metrics.csv" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "Traceback" not in "\n".join(err)
    assert [r["step"] for r in json.loads((out / "history.json").read_text())] == [2, 4, 6]


def test_a_truncated_ode_pair_cache_is_solved_again_with_the_same_numbers(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SCOREDISTILL_CACHE", str(cache))
    runs = [tmp_path / "a", tmp_path / "b"]
    assert main(["run", "dmd", "--out", str(runs[0]), *TINY]) == 0
    (file,) = (cache / "pairs").glob("ode-*.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 3])  # as a run killed while writing it would leave it without atomic writes
    capsys.readouterr()
    assert main(["run", "dmd", "--out", str(runs[1]), *TINY]) == 0
    err = capsys.readouterr().err
    assert "discarding the damaged ODE-pair cache" in err and "Traceback" not in err
    assert file.read_bytes() == data  # solved again and cached again
    a, b = (load_file(str(r / "generator.safetensors")) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
