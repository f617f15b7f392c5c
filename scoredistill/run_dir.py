"""The run folder: its file names, a fresh folder's checks and first files, a finished run's outputs, loading one back."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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


def check_run_dir_free(path: Path) -> None:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"run folder '{path}' already exists and is not empty; choose another --out")


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
