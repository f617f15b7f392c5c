"""The run folder: its file names, a fresh folder's checks and first files, a finished run's outputs, loading one back."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator, Optional

from torch import Tensor

from scoredistill.config import RunConfig, load_run_config
from scoredistill.errors import UserError
from scoredistill.io import environment_versions, load_tensors, save_tensors, write_json, write_text
from scoredistill.plugins import Hooks
from scoredistill.run import Run, build
from scoredistill.runlog import METRICS_CSV


CONFIG_FILE, METRICS_FILE, HISTORY_FILE, VERSIONS_FILE = "config.yaml", "metrics.json", "history.json", "versions.json"
GENERATOR_FILE, FAKE_SCORE_FILE = "generator.safetensors", "fake_score.safetensors"
ONLINE_GENERATOR_FILE, EMA_GENERATOR_FILE = "generator_online.safetensors", "generator_ema.safetensors"
METRICS_CSV_FILE = METRICS_CSV
LOCK_FILE = ".scoredistill.lock"  # held (flock) by the process that works on the run; deleted when it lets go


def check_run_dir_free(path: Path) -> None:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(p.name != LOCK_FILE for p in path.iterdir())):
        hint = f", or continue that run with: scoredistill run --resume {path}" if (path / CONFIG_FILE).is_file() else ""
        raise UserError(f"run folder '{path}' already exists and is not empty; choose another --out{hint}")


_held: dict[Path, int] = {}  # run folders this process holds: how many times


@contextlib.contextmanager
def run_dir_lock(path: Path, create: bool = False) -> Iterator[None]:
    """Hold the run folder ``path`` for this process (an advisory ``fcntl.flock`` on its lock file; re-entrant).

    A second process (a second ``--resume``, or a run with the same ``--out``) is refused in one line. The
    kernel lets go of the lock when its process ends, however it ends, so a lock file left by a killed run
    never blocks the next one. ``create``: make the folder if missing (and remove it again if it is left empty).
    Nothing happens for a folder that does not exist and is not to be created.
    """
    path = Path(path).absolute()
    if path in _held:  # this process holds it already
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    if not (create or path.is_dir()):
        yield
        return
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path / LOCK_FILE, path)
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        (path / LOCK_FILE).unlink(missing_ok=True)  # while still held: a process waiting on the old file tries again
        os.close(fd)
        if made and not any(path.iterdir()):
            path.rmdir()


def _acquire(lock: Path, folder: Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            try:
                owner = lock.read_text().strip()
            except OSError:
                owner = ""
            who = f" (process {owner})" if owner.isdigit() else ""
            raise UserError(f"run folder '{folder}' is in use by another scoredistill process{who}; wait for it to end, "
                            "or stop it, then try again") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not a file its last holder deleted meanwhile
        except FileNotFoundError:
            same = False
        if same:
            try:  # who holds it, for the refusal's message; a full disk can do without
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                pass
            return fd
        os.close(fd)


def prepare_run_dir(path: Path) -> Path:
    path = Path(path)
    check_run_dir_free(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_run_dir(path: Path, config: RunConfig) -> None:
    """A new run's folder with its ``config.yaml`` and ``versions.json`` (the main process, before training)."""
    prepare_run_dir(path)
    write_text(path / CONFIG_FILE, config.to_yaml())
    write_json(path / VERSIONS_FILE, environment_versions())


def restart_run_dir(path: Path, config: RunConfig) -> None:
    """A run folder whose run stopped before its first checkpoint, ready to start again from the beginning: what
    the stopped process logged goes (``metrics.csv`` is rewritten at the start anyway), the first files are rewritten."""
    from scoredistill.checkpoint import remove_partial_writes

    path = Path(path)
    for stale in [*path.glob("events.out.tfevents.*"), path / METRICS_CSV_FILE]:
        stale.unlink(missing_ok=True)
    remove_partial_writes(path)
    write_text(path / CONFIG_FILE, config.to_yaml())
    write_json(path / VERSIONS_FILE, environment_versions())


def save_outputs(run: Run, online: dict[str, Tensor], fake: Optional[dict[str, Tensor]]) -> None:
    """A finished run's weights (``online``: the generator's own, ``fake``: the fake score's) and ``history.json``.

    With an EMA, ``generator.safetensors`` holds the weights samples come from (``train.eval_with_ema``)
    and the other set is kept next to it.
    """
    ema = run.ema.module.state_dict() if run.ema is not None else None
    use_ema = ema is not None and run.config.train.eval_with_ema
    save_tensors(run.dir / GENERATOR_FILE, ema if use_ema else online)
    if use_ema:
        save_tensors(run.dir / ONLINE_GENERATOR_FILE, online)
    elif ema is not None:
        save_tensors(run.dir / EMA_GENERATOR_FILE, ema)
    if fake is not None:
        save_tensors(run.dir / FAKE_SCORE_FILE, fake)
    write_json(run.dir / HISTORY_FILE, run.history)


def load_run(run_dir: Path, hooks: Hooks, online: bool = False) -> Run:
    """Rebuild a finished run's generator (and teacher) from its folder (``online``: the non-EMA weights)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"'{run_dir}' is not a run folder: it has no {CONFIG_FILE}")
    if not (run_dir / GENERATOR_FILE).is_file():
        raise UserError(f"run folder '{run_dir}' has no {GENERATOR_FILE} (did the run finish?)")
    config = load_run_config(hooks.registry, run_dir / CONFIG_FILE)
    weights = GENERATOR_FILE
    if online and config.train.ema_decay is not None and config.train.eval_with_ema:
        weights = ONLINE_GENERATOR_FILE
    elif online and config.train.ema_decay is None:
        raise UserError(f"run '{run_dir}' used no EMA (train.ema_decay is null): its only weights are {GENERATOR_FILE}; drop --online")
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"progress": False})})
    run = build(config, hooks, run_dir, with_losses=False)
    try:
        state = load_tensors(run_dir / weights)
        run.models.generator.load_state_dict(state)
    except Exception as exc:  # corrupt or mismatched file
        raise UserError(f"cannot load {run_dir / weights}: {str(exc).splitlines()[0]}") from None
    return run
