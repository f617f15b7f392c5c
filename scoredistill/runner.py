"""One whole run: build, train, save, evaluate and report into its folder (or continue one from a checkpoint)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from scoredistill import checkpoint as ckpt
from scoredistill.config import RunConfig
from scoredistill.engine import Engine, launched_processes
from scoredistill.io import write_json
from scoredistill.plugins import Hooks
from scoredistill.run import Run, build
from scoredistill.run_dir import METRICS_FILE, check_run_dir_free, save_outputs, start_run_dir
from scoredistill.runlog import check_tensorboard
from scoredistill.samples import eager, generate
from scoredistill.trainer import train


@dataclass
class RunResult:
    """What :func:`execute` returns on the main process. Under several processes ``run.trained`` is
    empty: its DDP/FSDP wrappers are freed with the process group."""

    run: Run
    samples: torch.Tensor
    metrics: dict


def execute(config: RunConfig, hooks: Hooks, run_dir: Path, resume: Optional[ckpt.Checkpoint] = None) -> Optional[RunResult]:
    """Build, train, save, evaluate and report one run into ``run_dir`` (or continue one from ``resume``).

    Under several processes every process calls this; only the main one writes files,
    evaluates and returns a :class:`RunResult` (the others return ``None``).
    """
    check_tensorboard(config.runtime.tensorboard)
    if launched_processes() == 1 and resume is None:
        check_run_dir_free(run_dir)  # before accelerate starts: nothing to undo on a mistake
    engine = Engine(config.runtime)
    try:
        result = _execute(config, hooks, Path(run_dir), engine, resume)
        if result is not None and engine.distributed:
            result.run.trained.clear()  # the DDP/FSDP wrappers hold the process group: Engine.close frees them
        return result
    finally:
        engine.close()


def _execute(config: RunConfig, hooks: Hooks, run_dir: Path, engine: Engine, resume: Optional[ckpt.Checkpoint]) -> Optional[RunResult]:
    if resume is None:
        check_run_dir_free(run_dir)  # every process looks before any writes
        engine.barrier()
        if engine.is_main:
            start_run_dir(run_dir, config)
        engine.barrier()
    t0 = time.perf_counter()
    run = build(config, hooks, run_dir, device=engine.device)
    run.engine = engine
    build_seconds = time.perf_counter() - t0
    train(run, resume)
    train_seconds = build_seconds + run.train_seconds

    g = run.trained["generator"]
    online = engine.model_state(g.wrapper)
    fake = engine.model_state(run.trained["fake_score"].wrapper) if "fake_score" in run.trained else None
    with engine.full_parameters(g.wrapper):
        samples = generate(run, config.eval.num_samples, config.eval.seed) if engine.is_main else None
    result = None
    if engine.is_main:
        save_outputs(run, online, fake)
        metrics = {"method": config.method, "preset": config.preset, "ablations": list(config.ablations),
                   "train_seconds": round(train_seconds, 3),
                   "trainer": {"processes": engine.world_size, "checkpoint_seconds": round(run.checkpoint_seconds, 3),
                               "skipped_updates": int(run.guard.skipped)},
                   **_evaluate(run, samples)}
        write_json(run_dir / METRICS_FILE, metrics)
        hooks.report(run=run, samples=samples, metrics=metrics)
        result = RunResult(run, samples, metrics)
    return result  # no barrier: the other processes need not wait (and time out) while the main one evaluates


def _evaluate(run: Run, samples: Tensor) -> dict[str, Any]:
    with eager(run.config.runtime.compile):  # the teacher's multi-step sampler and the metrics' networks: no compile for their shapes
        return run.hooks.evaluate(run=run, samples=samples)
