"""Checkpoints of a run (save, restore) and the config of a resumed run (``--resume``): bit-for-bit continuation."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from scoredistill import checkpoint as ckpt
from scoredistill.config import RunConfig, load_run_config
from scoredistill.engine import rank_seed, seed_all
from scoredistill.errors import UserError
from scoredistill.io import write_text
from scoredistill.plugins import Hooks
from scoredistill.run import Run
from scoredistill.run_dir import CONFIG_FILE, LOCK_FILE, METRICS_FILE


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
    for term_name, term in run.losses.items():
        if term.checkpointed:  # a term's own state (an EMA target network)
            tensors.update({f"losses.{term_name}.{k}": v for k, v in term.state_dict().items()})
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
        for term_name, term in run.losses.items():
            if term.checkpointed:
                term.load_state_dict(ckpt.prefixed(tensors, f"losses.{term_name}"))
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
            sys.stderr.write(f"scoredistill: warning: the checkpoint was written by {state['world_size']} process(es), this run has "
                             f"{engine.world_size}: random streams are re-seeded, so the result will not equal an uninterrupted run\n")
        seed_all(rank_seed(run.config.seed + run.step, engine.rank))


#: ``--set`` keys a resumed run may change: they do not change its numbers (train.steps extends it)
RESUMABLE_OVERRIDES = ("train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                       "train.sample_every", "train.sample_count", "runtime.progress", "runtime.tensorboard",
                       "runtime.debug_weight_hashes")


def resume_dir(target: Path) -> Path:
    """The run folder of a ``--resume`` target (a run folder or one of its checkpoints)."""
    target = Path(target)
    return target.parent if ckpt.is_checkpoint_path(target) else target


def resume_config(hooks: Hooks, target: Path, overrides: list[str]) -> tuple[RunConfig, Optional[ckpt.Checkpoint], Path]:
    """The config, checkpoint and run folder to continue from ``target`` (a run folder or one of its checkpoints).

    The checkpoint is ``None`` when the run stopped before its first one: it starts again from the beginning,
    as its ``config.yaml`` says. Otherwise ``config.yaml`` must equal the config stored in the checkpoint (a
    deleted one is restored from it by :func:`resume_commit`). Everything is checked (the checkpoint against its
    checksum included) and nothing is written.
    """
    target, run_dir = Path(target), resume_dir(target)
    config_file = run_dir / CONFIG_FILE
    if not ckpt.is_checkpoint_path(target) and not ckpt.list_checkpoints(run_dir):
        if not config_file.is_file():
            raise UserError(_nothing_to_resume(run_dir))
        return _with_overrides(hooks, load_run_config(hooks.registry, config_file), overrides), None, run_dir
    checkpoint = ckpt.load(ckpt.locate(target))
    stored = _stored_config(hooks, checkpoint)
    base = stored  # config.yaml, once checked, for the settings an earlier resume may have changed (a longer train.steps)
    if config_file.is_file():
        base = load_run_config(hooks.registry, config_file)
        _check_unedited(base, stored, config_file, checkpoint.path)
    config = _with_overrides(hooks, base, overrides)
    step = checkpoint.state["step"]
    if config.train.steps < step:
        raise UserError(f"train.steps={config.train.steps} is below the checkpoint's step {step}")
    if config.train.steps != stored.train.steps and config.train.lr_schedule == "cosine":
        raise UserError("train.steps cannot change on --resume with train.lr_schedule=cosine (its horizon is the original train.steps)")
    if step >= config.train.steps and (run_dir / METRICS_FILE).is_file():
        raise UserError(f"run '{run_dir}' is already finished at step {step}; to train longer: --set train.steps=N with N > {step}")
    return config, checkpoint, run_dir


def resume_commit(run_dir: Path, config: RunConfig, checkpoint: Optional[ckpt.Checkpoint], explicit: bool) -> None:
    """Once the folder is held (:func:`~scoredistill.run_dir.run_dir_lock`): check that it is still as
    :func:`resume_config` found it (no other process went on meanwhile), restore a deleted ``config.yaml``
    from the checkpoint's copy (main process) and say what the resume does. ``explicit``: the checkpoint was
    named on the command line."""
    if not explicit and ckpt.latest_in(run_dir) != (checkpoint.path if checkpoint is not None else None):
        raise UserError(f"run folder '{run_dir}' changed while --resume looked at it (another process worked on it); try again")
    config_file = run_dir / CONFIG_FILE
    if checkpoint is None:
        _say(f"'{run_dir}' has no checkpoint: the run starts again from the beginning, as its {CONFIG_FILE} says")
        return
    if not config_file.is_file() and _is_main():
        write_text(config_file, checkpoint.config_yaml)
        _say(f"{config_file} was missing: restored from the copy in {checkpoint.path.name}")
    if checkpoint.state["step"] >= config.train.steps:
        _say(f"'{run_dir}' finished training at step {checkpoint.state['step']}: its evaluation and report are made again "
             f"from {checkpoint.path.name}")


def _with_overrides(hooks: Hooks, base: RunConfig, overrides: list[str]) -> RunConfig:
    """``base`` with the ``--set`` changes a resumed run may make (:data:`RESUMABLE_OVERRIDES`; others refused)."""
    from omegaconf import OmegaConf

    from scoredistill.config import parse_overrides, validate

    changes = parse_overrides(overrides)
    for key in sorted(set(_dotted(changes))):
        if key not in RESUMABLE_OVERRIDES:
            raise UserError(f"--set {key} cannot change on --resume (it would change the run's numbers); "
                            f"allowed: {', '.join(RESUMABLE_OVERRIDES)}; start a new run to change it")
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base.to_dict()), OmegaConf.create(changes)), resolve=True)
    return validate(hooks.registry, merged)


def _stored_config(hooks: Hooks, checkpoint: ckpt.Checkpoint) -> RunConfig:
    """The run config a checkpoint was written with, validated against the installed plugins."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from scoredistill.config import validate

    try:
        raw = OmegaConf.to_container(OmegaConf.create(checkpoint.config_yaml), resolve=True)
    except (ValueError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise UserError(f"checkpoint {checkpoint.path} holds an unreadable config: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"checkpoint {checkpoint.path} holds no run config")
    return validate(hooks.registry, raw)


def _check_unedited(current: RunConfig, stored: RunConfig, config_file: Path, checkpoint: Path) -> None:
    """``config.yaml`` says what the checkpoint's run is: an edit (other than a setting ``--set`` may change on a
    resume, which a resume writes back there) is refused, naming the changed keys."""
    a, b = dict(_flat(current.to_dict())), dict(_flat(stored.to_dict()))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING) and k not in RESUMABLE_OVERRIDES)
    if changed:
        raise UserError(f"{config_file} was edited after {checkpoint.name} was written ({', '.join(changed)} changed): a resumed "
                        "run keeps its config; undo the edit (or delete the file: it is restored from the checkpoint), pass "
                        f"what may change with --set ({', '.join(RESUMABLE_OVERRIDES)}), or start a new run")


_MISSING = object()


def _flat(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _nothing_to_resume(run_dir: Path) -> str:
    if not run_dir.is_dir():
        return f"'{run_dir}' is not a run folder: it does not exist"
    if all(p.name == LOCK_FILE for p in run_dir.iterdir()):
        return (f"run folder '{run_dir}' is empty: its run stopped before writing anything, so there is nothing to resume; "
                f"start it again with: scoredistill run METHOD --out {run_dir} [options]")
    return (f"'{run_dir}' is not a run folder: it has no {CONFIG_FILE} and no checkpoint, so there is nothing to resume; "
            "start a new run with another --out")


def _is_main() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _say(message: str) -> None:
    if _is_main():
        sys.stderr.write(f"scoredistill: {message}\n")


def _dotted(d: dict, prefix: str = "") -> Iterator[str]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _dotted(v, key + ".")
        else:
            yield key
