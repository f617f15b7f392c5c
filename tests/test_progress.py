"""Progress on stderr, results on stdout: plain lines (at most one every few seconds) when stderr is not a
terminal, and a bar that keeps step, total and time left at 80 columns."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

from rich.console import Console

from scoredistill.progress import PlainProgress, progress, rich_progress

TINY = ["--preset", "toy2d", "--set", "train.steps=6", "--set", "train.fake_score_warmup_steps=0", "--set", "train.batch_size=32",
        "--set", "pairs.num_pairs=64", "--set", "eval.num_samples=64", "--set", "train.sample_every=null", "--set", "train.log_every=2"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_come_at_most_once_per_interval_and_once_at_the_end():
    clock, out = FakeClock(), io.StringIO()
    with progress(True, "losses", stream=out, clock=clock, interval=10.0) as bar:  # a StringIO is not a terminal
        assert isinstance(bar, PlainProgress)
        task = bar.add_task("dmd", total=1000, completed=0, losses="")
        for step in range(1, 1001):
            clock.now += 0.25  # 250 s in all
            if step % 100 == 0:
                bar.update(task, losses=f"loss={1 / step:.3g}")
            bar.advance(task)
    lines = out.getvalue().splitlines()
    assert 24 <= len(lines) <= 26  # 250 s / 10 s, plus the last
    assert lines[0] == "dmd: 40/1000 (4%), 0:00:10 elapsed, 0:04:00 left"
    assert lines[-1].startswith("dmd: 1000/1000 (100%), 0:04:10 elapsed") and lines[-1].endswith("loss=0.001")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_a_task_cut_short_says_where_it_stopped_and_a_disabled_one_says_nothing():
    clock, out = FakeClock(), io.StringIO()
    with progress(True, stream=out, clock=clock) as bar:
        task = bar.add_task("ODE pairs", total=64)
        clock.now += 1
        bar.advance(task, 16)
    assert out.getvalue() == "ODE pairs: 16/64 (25%), 0:00:01 elapsed, 0:00:03 left\n"
    quiet = io.StringIO()
    with progress(False, stream=quiet) as bar:
        bar.advance(bar.add_task("x", total=3), 3)
    assert quiet.getvalue() == ""


def test_at_80_columns_the_bar_keeps_step_total_and_time_left_and_cuts_the_losses():
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    bar = rich_progress(console, ("speed", "losses"))
    losses = "  ".join(f"term_{i}=0.{i}2345" for i in range(12))
    bar.add_task("dmd2", total=100000, completed=12000, speed="3.4 it/s", losses=losses)
    console.print(bar.get_renderable())
    (line,) = buf.getvalue().splitlines()
    assert len(line) <= 80
    assert "12000/100000" in line and re.search(r"(-:--:--|\d+:\d\d:\d\d) ", line), line
    assert "term_0=0.02345" in line and losses not in line and line.rstrip().endswith("…"), line


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scoredistill.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=os.environ)


def test_a_run_into_a_log_file_has_its_result_on_stdout_and_plain_progress_on_stderr(tmp_path):
    proc = _cli("run", "dmd", "--out", str(tmp_path / "run"), *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"done: {tmp_path / 'run'}  mode_coverage=") and len(proc.stdout.splitlines()) == 1
    assert "dmd: 6/6 (100%)" in proc.stderr and "\r" not in proc.stderr and "\x1b" not in proc.stderr, proc.stderr


def test_compare_into_a_file_gives_a_clean_table(tmp_path):
    proc = _cli("compare", "dmd", "regression", *TINY, "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert all(line.startswith("|") for line in lines) and len(lines) == 6, proc.stdout  # header, rule, 2 specs, teacher, target
    assert proc.stdout.strip() in (tmp_path / "cmp" / "comparison.md").read_text()
