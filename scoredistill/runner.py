"""One whole run: build, train, save, evaluate and report into its folder (or continue one: ``--resume``).

A run can be stopped at any moment of its life and finished by ``scoredistill run --resume DIR``: SIGINT and SIGTERM
save a checkpoint in training and stop at once elsewhere (:class:`~scoredistill.trainer.RunInterrupted`); a run
stopped before its first checkpoint starts again from its ``config.yaml``; one stopped after training redoes its
evaluation and report from the final checkpoint. ``metrics.json`` is written last: a run folder with it is finished.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from scoredistill import checkpoint as ckpt
from scoredistill.config import RunConfig
from scoredistill.engine import Engine, launched_processes
from scoredistill.guard import check_skipped_share
from scoredistill.io import write_json
from scoredistill.plugins import Hooks
from scoredistill.run import Run, build
from scoredistill.run_dir import (METRICS_FILE, check_run_dir_free, restart_run_dir, run_dir_lock, save_outputs,
                                  start_run_dir)
from scoredistill.runlog import check_tensorboard
from scoredistill.samples import eager, generate
from scoredistill.trainer import RunInterrupted, train


@dataclass
class RunResult:
    """What :func:`execute` returns on the main process. Under several processes ``run.trained`` is
    empty: its DDP/FSDP wrappers are freed with the process group (under FSDP ``run.models`` and ``run.ema``
    are None too: the sharded networks hold it)."""

    run: Run
    samples: torch.Tensor
    metrics: dict


def execute(config: RunConfig, hooks: Hooks, run_dir: Path, resume: Optional[ckpt.Checkpoint] = None,
            again: bool = False) -> Optional[RunResult]:
    """Build, train, save, evaluate and report one run into ``run_dir`` (or continue one from ``resume``;
    ``again``: start the run of ``run_dir``, stopped before its first checkpoint, from the beginning).

    Under several processes every process calls this; only the main one writes files (holding the
    folder's lock), evaluates and returns a :class:`RunResult` (the others return ``None``).
    """
    check_tensorboard(config.runtime.tensorboard)
    fresh = resume is None and not again
    if launched_processes() == 1 and fresh:
        check_run_dir_free(run_dir)  # before accelerate starts: nothing to undo on a mistake
    main = launched_processes() == 1 or _rank() == 0
    engine = Engine(config.runtime)
    try:
        with run_dir_lock(run_dir, create=fresh) if main else contextlib.nullcontext():
            result = _execute(config, hooks, Path(run_dir), engine, resume, again)
        if result is not None and engine.distributed:  # the wrappers hold the process group: Engine.close frees them
            result.run.trained.clear()
            if engine.fsdp:  # and so do the sharded networks (FSDP2's hooks on their layers) and the EMA's view of them
                result.run.models, result.run.ema = None, None
        return result
    finally:
        engine.close()


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _execute(config: RunConfig, hooks: Hooks, run_dir: Path, engine: Engine, resume: Optional[ckpt.Checkpoint],
             again: bool) -> Optional[RunResult]:
    if resume is None and not again:
        check_run_dir_free(run_dir)  # every process looks before any writes
        engine.barrier()
        if engine.is_main:
            start_run_dir(run_dir, config)
        engine.barrier()
    elif engine.is_main:
        if again:
            restart_run_dir(run_dir, config)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)  # finished no longer: written again at the end
    now = _Moment(resume)
    with _stop_at_signals(now):
        t0 = time.perf_counter()
        run = build(config, hooks, run_dir, device=engine.device)
        run.engine, now.run = engine, run
        build_seconds = time.perf_counter() - t0
        train(run, resume)
        return _finish(run, engine, build_seconds)


def _finish(run: Run, engine: Engine, build_seconds: float) -> Optional[RunResult]:
    """The trained run's weights, evaluation, report and (last) ``metrics.json``; then the skip bound."""
    config, g = run.config, run.trained["generator"]
    online = engine.model_state(g.wrapper)
    fake = engine.model_state(run.trained["fake_score"].wrapper) if "fake_score" in run.trained else None
    engine.unshard_for_good(run.models.teacher)  # FSDP: the evaluation runs the teacher on the main process alone
    with engine.full_parameters(g.wrapper):  # FSDP: every process samples (the same collectives), the main one keeps them
        samples = generate(run, config.eval.num_samples, config.eval.seed) if engine.is_main or engine.fsdp else None
    if not engine.is_main:
        return None  # no barrier: the other processes need not wait (and time out) while the main one evaluates
    save_outputs(run, online, fake)
    metrics = {"method": config.method, "preset": config.preset, "ablations": list(config.ablations),
               "train_seconds": round(build_seconds + run.train_seconds, 3),
               "trainer": {"processes": engine.world_size, "checkpoint_seconds": round(run.checkpoint_seconds, 3),
                           "skipped_updates": int(run.guard.skipped)},
               **_evaluate(run, samples)}
    run.hooks.report(run=run, samples=samples, metrics=metrics)
    write_json(run.dir / METRICS_FILE, metrics)  # last: a folder with metrics.json holds a finished run
    check_skipped_share(run)
    return RunResult(run, samples, metrics)


def _evaluate(run: Run, samples: Tensor) -> dict[str, Any]:
    with eager(run.config.runtime.compile):  # the teacher's multi-step sampler and the metrics' networks: no compile for their shapes
        return run.hooks.evaluate(run=run, samples=samples)


@dataclass
class _Moment:
    """Where a run is, for a signal outside the training loop: the checkpoint it started from and, once built, the run."""

    resume: Optional[ckpt.Checkpoint]
    run: Optional[Run] = None

    def interrupted(self, signum: int) -> RunInterrupted:
        run = self.run
        if run is not None and run.last_checkpoint is not None:
            trained = run.step >= run.config.train.steps and run.last_checkpoint.name == ckpt.checkpoint_name(run.step, 0, 0)
            return RunInterrupted(signum, run.step, run.last_checkpoint, "finishing" if trained else "building")
        step = self.resume.state["step"] if self.resume is not None else 0
        return RunInterrupted(signum, step, self.resume.path if self.resume is not None else None, "building")


@contextlib.contextmanager
def _stop_at_signals(now: _Moment) -> Iterator[None]:
    """SIGINT and SIGTERM stop the run at once, outside the training loop (whose own handler saves a checkpoint
    first): nothing is lost, since the folder's files are each written whole and ``--resume`` redoes the rest."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise now.interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
