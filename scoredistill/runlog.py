"""Where a run's numbers and pictures go while it trains (the main process only).

* progress on stderr (:mod:`scoredistill.progress`): step, total, time left, steps per second, losses;
* ``metrics.csv``: one row per logged step (the records of ``history.json``);
* TensorBoard scalars (an ``events.out.tfevents.*`` file in the run folder, so that
  ``tensorboard --logdir runs`` shows every run by its folder name) when the
  ``tensorboard`` package is installed;
* ``samples_step{N}.png`` every ``train.sample_every`` steps, drawn in a background
  thread so that the training loop only pays for one forward pass of the generator;
* with ``runtime.debug_weight_hashes``, ``debug/weights.rank{R}.txt`` from every process.

Nothing here synchronises the device except at the log steps the trainer chooses.
"""

from __future__ import annotations

import csv
import io
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from scoredistill.errors import UserError
from scoredistill.hashing import state_hash
from scoredistill.io import atomic_write, write_text
from scoredistill.progress import progress

if TYPE_CHECKING:
    from scoredistill.run import Run

METRICS_CSV = "metrics.csv"
DEBUG_DIR = "debug"


def tensorboard_writer_class() -> Optional[type]:
    """``torch.utils.tensorboard.SummaryWriter`` if the tensorboard package is installed, else ``None``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def check_tensorboard(setting: Optional[bool]) -> None:
    """``runtime.tensorboard: true`` without the package is a user error (before anything runs)."""
    if setting is True and tensorboard_writer_class() is None:
        raise UserError("runtime.tensorboard=true but the tensorboard package is not installed: pip install tensorboard "
                        "(or set runtime.tensorboard=false)")


def progress_bar(enabled: bool) -> Any:
    """On stderr: step, total, time left, then speed and losses (cut first on a narrow terminal); plain lines in a log."""
    return progress(enabled, "speed", "losses")


def weights_hash(tensors: dict[str, torch.Tensor]) -> str:
    return state_hash(tensors)


def sample_picture(teacher: Any, samples: torch.Tensor, path: Path, title: str, hooks: Any = None) -> bool:
    """Samples as a picture: as a plugin draws them (``scoredistill_draw_samples``, e.g. over the target's
    density), else 2-D points as a scatter and images as a grid."""
    if hooks is not None and hooks.draw_samples(teacher=teacher, panels=[(title, samples)], path=path):
        return True
    if samples.ndim == 2 and samples.shape[1] == 2:
        import matplotlib.pyplot as plt

        from scoredistill.io import save_figure

        fig, ax = plt.subplots(figsize=(5, 5))
        s = samples[:3000].cpu()
        ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:red", alpha=0.5, linewidths=0)
        ax.set_title(title, fontsize=9)
        save_figure(fig, path)
        plt.close(fig)
        return True
    if samples.ndim == 4 and samples.shape[1] in (1, 3):
        from torchvision.utils import make_grid, save_image

        grid = make_grid(samples[:64].clamp(-1, 1) * 0.5 + 0.5, nrow=8)
        atomic_write(path, lambda p: save_image(grid, str(p), format="png"))
        return True
    return False


class RunLog:
    """The progress bar, ``metrics.csv``, TensorBoard and periodic pictures of one run (a context manager)."""

    def __init__(self, run: "Run") -> None:
        self.run = run
        self.main = run.is_main
        self.bar = progress_bar(run.config.runtime.progress and self.main)
        self.task: Optional[int] = None
        self.columns: Optional[list[str]] = None
        self.tb = None
        self.pool: Optional[ThreadPoolExecutor] = None
        self.pending: list[Future] = []
        self.hash_file: Optional[Path] = None
        self._last = (0, 0.0)  # (step, time) of the previous record, for steps per second
        self.csv_failed = False

    # -- lifecycle
    def __enter__(self) -> "RunLog":
        run = self.run
        if self.main:
            self._rewrite_csv(run.history)
            writer_cls = tensorboard_writer_class() if run.config.runtime.tensorboard is not False else None
            if writer_cls is not None:
                self.tb = writer_cls(log_dir=str(run.dir), purge_step=run.step + 1 if run.step else None)  # after the checkpoint
        if run.config.runtime.debug_weight_hashes:
            self.hash_file = run.dir / DEBUG_DIR / f"weights.rank{run.engine.rank}.txt"
            self.hash_file.parent.mkdir(parents=True, exist_ok=True)
            kept = []  # on resume, forget what the interrupted process wrote after its checkpoint
            if self.hash_file.is_file():
                kept = [line for line in self.hash_file.read_text().splitlines() if int(line.split()[0]) <= run.step]
            self.hash_file.write_text("".join(line + "\n" for line in kept))
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)
        for future in self.pending:
            try:
                future.result()
            except Exception as err:  # a picture is not worth failing the run for
                sys.stderr.write(f"scoredistill: warning: a periodic sample picture failed: {err}\n")
        if self.pool is not None:
            self.pool.shutdown()
        if self.tb is not None:
            self.tb.close()

    # -- progress
    def start_warmup(self, total: int, done: int) -> None:
        self.task = self.bar.add_task("fake-score warm-up", total=total, completed=done, losses="", speed="")

    def start_training(self, total: int, done: int) -> None:
        self.task = self.bar.add_task(self.run.config.method, total=total, completed=done, losses="", speed="")
        self._last = (done, 0.0)

    def advance(self) -> None:
        self.bar.advance(self.task)

    # -- records
    def record(self, record: dict[str, float]) -> None:
        """One logged step: the progress bar, ``metrics.csv`` and TensorBoard."""
        if not self.main:
            return
        step, now = record["step"], record["time"]
        last_step, last_time = self._last
        speed = (step - last_step) / (now - last_time) if now > last_time and step > last_step else 0.0
        self._last = (step, now)
        shown = "  ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "time"))
        self.bar.update(self.task, losses=shown, speed=f"{speed:.1f} it/s" if speed else "")
        self._append_csv(record)
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "time"):
                    self.tb.add_scalar(f"train/{key}", value, global_step=int(step))

    def _rewrite_csv(self, history: list[dict[str, float]]) -> None:
        """``metrics.csv`` from ``history`` (at the start, and on resume: rows after the checkpoint are dropped)."""
        self.columns = list(history[0]) if history else None
        buf = io.StringIO()
        if history:
            writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)
        write_text(self.run.dir / METRICS_CSV, buf.getvalue())

    def _append_csv(self, record: dict[str, float]) -> None:
        """One row of ``metrics.csv``. A full disk (or any other OS fault) here costs that file only: one warning, no
        more rows, training goes on (``history.json`` and the checkpoints keep every record)."""
        if self.csv_failed:
            return
        path = self.run.dir / METRICS_CSV
        try:
            with open(path, "a", newline="") as f:
                if self.columns is None:
                    self.columns = list(record)
                    csv.DictWriter(f, fieldnames=self.columns).writeheader()
                csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(record)
        except OSError as err:
            self.csv_failed = True
            sys.stderr.write(f"scoredistill: warning: cannot append to {path} ({err.strerror or err}); it gets no more rows "
                             "this session (history.json keeps them; a --resume rewrites it)\n")

    # -- pictures and debug
    def picture(self, step: int, samples: torch.Tensor) -> None:
        """``samples_step{N}.png`` in a background thread."""
        if not self.main:
            return
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoredistill-pictures")
        run = self.run
        title = f"{run.config.method} — step {step}"
        path = run.dir / f"samples_step{step}.png"
        self.pending = [f for f in self.pending if not f.done()]
        self.pending.append(self.pool.submit(sample_picture, run.models.teacher, samples, path, title, run.hooks))

    def weight_hashes(self, step: int, hashes: dict[str, str]) -> None:
        if self.hash_file is not None:
            with open(self.hash_file, "a") as f:
                f.write(f"{step} " + " ".join(f"{k}={v}" for k, v in hashes.items()) + "\n")
