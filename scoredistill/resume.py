"""Checkpoints of a run (save, restore) and the config of a resumed run (``--resume``): bit-for-bit continuation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from scoredistill import checkpoint as ckpt
from scoredistill.config import RunConfig, load_run_config
from scoredistill.engine import rank_seed
from scoredistill.errors import UserError
from scoredistill.plugins import Hooks
from scoredistill.run import Run
from scoredistill.run_dir import CONFIG_FILE, GENERATOR_FILE


def save_checkpoint(run: Run) -> Path:
    """Write a checkpoint of the run as it is now (every process calls this; the main one writes)."""
    t0 = time.perf_counter()
    run.guard.check(run)  # never after a non-finite update
    engine, cfg = run.engine, run.config.train
    tensors: dict[str, Tensor] = {}
    opt_meta: dict[str, Any] = {}
    for name, net in run.trained.items():
        tensors.update({f"{name}.{k}": v for k, v in engine.model_state(net.wrapper).items()})
        flat, opt_meta[name] = ckpt.optimizer_to_flat(name, engine.optimizer_state(net.wrapper, net.optimizer))
        tensors.update(flat)
    if run.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in run.ema.state_dict().items()})
    rng = engine.gather(ckpt.capture_rng(run.device))
    name = ckpt.checkpoint_name(run.step, run.warmup_step, cfg.fake_score_warmup_steps)
    skipped = float(run.guard.skipped)
    if engine.is_main:
        rng_tensors, rng_meta = ckpt.rng_to_flat(rng)
        state = {
            "step": run.step, "warmup_step": run.warmup_step, "world_size": engine.world_size,
            "optimizers": opt_meta, "schedules": {n: t.schedule.state_dict() for n, t in run.trained.items() if t.schedule is not None},
            "scaler": engine.scaler.state_dict(), "rng": rng_meta, "history": run.history, "skipped": skipped,
            "train_seconds": run.elapsed(),
            "checkpoint_seconds": run.checkpoint_seconds,
        }
        ckpt.save(run.dir, name, {**tensors, **rng_tensors}, state, run.config.to_yaml(), cfg.keep_checkpoints)
    engine.barrier()
    run.last_checkpoint = run.dir / name
    run.checkpoint_seconds += time.perf_counter() - t0
    return run.last_checkpoint


def restore(run: Run, checkpoint: ckpt.Checkpoint) -> None:
    """Put the run back exactly as it was when ``checkpoint`` was written (after :func:`~scoredistill.prepare.setup`)."""
    engine, state, tensors = run.engine, checkpoint.state, checkpoint.tensors
    try:
        for name, net in run.trained.items():
            engine.load_model_state(net.wrapper, ckpt.prefixed(tensors, name))
            flat = ckpt.optimizer_from_flat(name, tensors, state["optimizers"][name])
            engine.load_optimizer_state(net.wrapper, net.optimizer, flat)
            if net.schedule is not None:
                net.schedule.load_state_dict(state["schedules"][name])
        if run.ema is not None:
            run.ema.load_state_dict(ckpt.prefixed(tensors, "ema"))
        if state["scaler"]:
            engine.scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"checkpoint {checkpoint.path} does not fit this run's networks: {str(exc).splitlines()[0]}") from None
    run.refresh_weight_copies()
    run.step, run.warmup_step, run.history = state["step"], state["warmup_step"], list(state["history"])
    run.guard.skipped.fill_(state["skipped"])
    run.train_seconds, run.checkpoint_seconds = state["train_seconds"], state["checkpoint_seconds"]
    run.last_checkpoint = checkpoint.path
    if state["world_size"] == engine.world_size:
        ckpt.restore_rng(ckpt.rng_from_flat(tensors, state["rng"], engine.rank), run.device)
    else:
        if engine.is_main:
            import sys

            sys.stderr.write(f"scoredistill: warning: the checkpoint was written by {state['world_size']} process(es), this run has "
                             f"{engine.world_size}: random streams are re-seeded, so the result will not equal an uninterrupted run\n")
        torch.manual_seed(rank_seed(run.config.seed + run.step, engine.rank))


#: ``--set`` keys a resumed run may change: they do not change its numbers (train.steps extends it)
RESUMABLE_OVERRIDES = ("train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                       "train.sample_every", "train.sample_count", "runtime.progress", "runtime.tensorboard",
                       "runtime.debug_weight_hashes")


def resume_config(hooks: Hooks, target: Path, overrides: list[str]) -> tuple[RunConfig, ckpt.Checkpoint, Path]:
    """The config, checkpoint and run folder to continue from ``target`` (a run folder or one of its checkpoints).

    Everything is checked (the checkpoint against its manifest included) before anything is written.
    """
    from omegaconf import OmegaConf

    from scoredistill.config import parse_overrides, validate

    target = Path(target)
    run_dir = target.parent if ckpt.is_checkpoint_path(target) else target
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"'{run_dir}' is not a run folder: it has no {CONFIG_FILE}")
    base = load_run_config(hooks.registry, run_dir / CONFIG_FILE)
    changes = parse_overrides(overrides)
    flat = {k for k in _dotted(changes)}
    for key in sorted(flat):
        if key not in RESUMABLE_OVERRIDES:
            raise UserError(f"--set {key} cannot change on --resume (it would change the run's numbers); "
                            f"allowed: {', '.join(RESUMABLE_OVERRIDES)}; start a new run to change it")
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base.to_dict()), OmegaConf.create(changes)), resolve=True)
    config = validate(hooks.registry, merged)
    checkpoint = ckpt.load(ckpt.locate(target))
    step = checkpoint.state["step"]
    if config.train.steps < step:
        raise UserError(f"train.steps={config.train.steps} is below the checkpoint's step {step}")
    if config.train.steps != base.train.steps and config.train.lr_schedule == "cosine":
        raise UserError("train.steps cannot change on --resume with train.lr_schedule=cosine (its horizon is the original train.steps)")
    if step >= config.train.steps and (run_dir / GENERATOR_FILE).is_file():
        raise UserError(f"run '{run_dir}' is already finished at step {step}; to train longer: --set train.steps=N with N > {step}")
    return config, checkpoint, run_dir


def _dotted(d: dict, prefix: str = "") -> Iterator[str]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _dotted(v, key + ".")
        else:
            yield key
