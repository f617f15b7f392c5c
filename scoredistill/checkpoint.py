"""Checkpoints: everything a run needs to continue exactly, in one file, never half-written, never pickled.

A checkpoint is one safetensors file in the run folder::

    checkpoint-step-00000040.safetensors      (checkpoint-warmup-00000150.safetensors during the fake-score warm-up)

holding, as tensors: ``generator.*``, ``fake_score.*`` and ``ema.*`` (weights and buffers),
``optim::NETWORK::PARAMETER::NAME`` (each optimiser's moments and step counts) and
``rng::rankR::torch`` / ``rng::rankR::cuda`` (the torch RNG states of every process);
and, as JSON text in the file's metadata: ``state`` (step counters, optimiser
hyper-parameters, lr schedules, loss scaler, Python and NumPy RNG states of every
process, history, skip counts), ``config`` (the resolved run config, YAML) and
``sha256`` (of every tensor's bytes, in key order, then of the state and config texts: a
flipped bit anywhere in what a resume reads is caught).

The file is written to a temporary name, flushed to disk and renamed into place, so a
crash at any moment leaves the previous checkpoint intact; the temporary files a crash
leaves (ours and safetensors' own ``.tmpXXXXXX``) are deleted at the next checkpoint save. Loading runs no pickle
(safetensors and JSON only) and checks the checksum, so a truncated or corrupted file
is reported in one line, naming the previous checkpoint to resume from instead.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from scoredistill.errors import UserError
from scoredistill.hashing import sha256_digest
from scoredistill.io import atomic_write

FORMAT = "2"
LEGACY_FORMATS = ("1",)  # format 1: the checksum covers the tensors only
PATTERN = "checkpoint-*.safetensors"
_NAME = re.compile(r"^checkpoint-(?P<phase>warmup|step)-(?P<n>\d{8})\.safetensors$")
_SEP = "::"


def checkpoint_name(step: int, warmup_step: int, warmup_total: int) -> str:
    """``checkpoint-step-00000040.safetensors``; ``checkpoint-warmup-00000150.safetensors`` during the warm-up."""
    if step == 0 and warmup_step < warmup_total:
        return f"checkpoint-warmup-{warmup_step:08d}.safetensors"
    return f"checkpoint-step-{step:08d}.safetensors"


def _order(name: str) -> tuple[int, int]:
    m = _NAME.match(name)
    return (0 if m["phase"] == "warmup" else 1, int(m["n"])) if m else (-1, -1)


# --------------------------------------------------------------------------- flattening (no pickle)


def optimizer_to_flat(net: str, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser state dict keyed by parameter name -> (tensors, JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, entries in state.get("state", {}).items():  # empty on ranks > 0 under FSDP
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[_SEP.join(("optim", net, param, key))] = value
            else:
                scalars.setdefault(param, {})[key] = value
    return tensors, {"param_groups": state.get("param_groups", []), "scalars": scalars}


def optimizer_from_flat(net: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict[str, Any]] = {p: dict(v) for p, v in meta["scalars"].items()}
    prefix = _SEP.join(("optim", net)) + _SEP
    for key, value in tensors.items():
        if key.startswith(prefix):
            param, name = key[len(prefix):].rsplit(_SEP, 1)
            state.setdefault(param, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's RNG states: torch (CPU, and CUDA when used) as tensors; Python and NumPy as JSON."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out["python"] = [version, list(internal), gauss]
    out["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return out


def restore_rng(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def rng_to_flat(per_rank: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors, meta = {}, []
    for rank, states in enumerate(per_rank):
        for key in ("torch", "cuda"):
            if key in states:
                tensors[_SEP.join(("rng", f"rank{rank}", key))] = states[key]
        meta.append({"python": states["python"], "numpy": states["numpy"]})
    return tensors, meta


def rng_from_flat(tensors: dict[str, torch.Tensor], meta: list[dict], rank: int) -> dict[str, Any]:
    out = dict(meta[rank])
    for key in ("torch", "cuda"):
        name = _SEP.join(("rng", f"rank{rank}", key))
        if name in tensors:
            out[key] = tensors[name]
    return out


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix.``, without it."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


# --------------------------------------------------------------------------- writing


def _digest(tensors: dict[str, torch.Tensor], *texts: str) -> str:
    """SHA-256 of every tensor (key, dtype, shape, bytes; in key order), then of each text (the state and config)."""

    def chunks():
        for key in sorted(tensors):
            yield f"{key}|{tensors[key].dtype}|{tuple(tensors[key].shape)}|".encode()
            yield tensors[key]
        for text in texts:
            yield f"text|{len(text)}|".encode()
            yield text.encode()

    return sha256_digest(chunks(), length=None)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors that share storage with another entry (tied weights): safetensors refuses those."""
    seen: dict[int, int] = {}
    for v in tensors.values():
        ptr = v.untyped_storage().data_ptr()
        seen[ptr] = seen.get(ptr, 0) + 1
    return {k: (v.clone() if v.numel() and seen[v.untyped_storage().data_ptr()] > 1 else v) for k, v in tensors.items()}


def save(run_dir: Path, name: str, tensors: dict[str, torch.Tensor], state: dict, config_yaml: str, keep: int) -> Path:
    """Write checkpoint ``name`` into ``run_dir`` atomically and durably; keep the newest ``keep``. Returns its path."""
    tensors = _unshared({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    state_json = json.dumps(state)
    metadata = {"format": FORMAT, "state": state_json, "config": config_yaml, "sha256": _digest(tensors, state_json, config_yaml)}
    path = Path(run_dir) / name

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    atomic_write(path, write)
    _fsync_dir(Path(run_dir))
    _prune(Path(run_dir), name, keep)
    return path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(run_dir: Path, newest: str, keep: int) -> None:
    """Delete checkpoints older than the ``keep`` newest, and any newer than ``newest`` (an abandoned timeline:
    the run was resumed from an earlier checkpoint)."""
    names = sorted((p.name for p in run_dir.glob(PATTERN) if _NAME.match(p.name)), key=_order)
    older = [n for n in names if _order(n) <= _order(newest)]
    stale = [n for n in names if _order(n) > _order(newest)]
    for name in older[: max(len(older) - keep, 0)] + stale:
        (run_dir / name).unlink(missing_ok=True)
    remove_partial_writes(run_dir)


#: safetensors (0.5 and later) writes ``.tmp`` + six characters beside the file, then renames it
_SAFETENSORS_TMP = re.compile(r"^\.tmp[A-Za-z0-9_]{6}$")


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete the temporary files a crash in the middle of a checkpoint write leaves in ``run_dir``: ours
    (``.checkpoint-*.tmp``) and safetensors' own (``.tmpXXXXXX``). Returns what was deleted."""
    run_dir = Path(run_dir)
    gone = [p for p in run_dir.glob(".*") if p.is_file() and (
        _SAFETENSORS_TMP.match(p.name) or (p.name.startswith(".checkpoint-") and p.name.endswith(".tmp")))]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


# --------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    path: Path
    state: dict
    tensors: dict[str, torch.Tensor]
    config_yaml: str

    @property
    def run_dir(self) -> Path:
        return self.path.parent


def list_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoint files, oldest first."""
    return sorted((p for p in Path(run_dir).glob(PATTERN) if _NAME.match(p.name)), key=lambda p: _order(p.name))


def is_checkpoint_path(path: Path) -> bool:
    return bool(_NAME.match(Path(path).name))


def locate(path: Path) -> Path:
    """The checkpoint to resume from: ``path`` itself if it names one, else its run folder's newest."""
    path = Path(path)
    if is_checkpoint_path(path):
        if not path.is_file():
            have = ", ".join(p.name for p in list_checkpoints(path.parent)) or "none"
            raise UserError(f"no checkpoint '{path}' (that run folder has: {have})")
        return path
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"run folder '{path}' has no checkpoint to resume from (no {PATTERN})")
    return found[-1]


def _read(path: Path) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"checkpoint {path} is corrupt or truncated: {str(exc).splitlines()[0]}") from None
    fmt = meta.get("format")
    if fmt not in (FORMAT, *LEGACY_FORMATS) or not {"state", "config", "sha256"} <= set(meta):
        raise UserError(f"{path} is not a scoredistill checkpoint of format {FORMAT} (its metadata lacks state, config or sha256)")
    texts = (meta["state"], meta["config"]) if fmt == FORMAT else ()
    if _digest(tensors, *texts) != meta["sha256"]:
        raise UserError(f"checkpoint {path} is corrupt: its tensors, state or config do not match the SHA-256 checksum it was written with")
    try:
        state = json.loads(meta["state"])
    except ValueError:
        raise UserError(f"checkpoint {path} is corrupt: its state is not valid JSON") from None
    return Checkpoint(path, state, tensors, meta["config"])


def verify(path: Path) -> None:
    _read(path)


def load(path: Path) -> Checkpoint:
    """Read and check ``path`` (one-line :class:`UserError` naming an earlier intact checkpoint if it is damaged)."""
    path = Path(path)
    try:
        return _read(path)
    except UserError as exc:
        raise UserError(str(exc) + _previous_hint(path)) from None


def _previous_hint(path: Path) -> str:
    earlier = [p for p in list_checkpoints(path.parent) if _order(p.name) < _order(path.name)]
    for p in reversed(earlier):
        try:
            _read(p)
        except UserError:
            continue
        return f"; resume from the previous one with: scoredistill run --resume {p}"
    return "; no earlier intact checkpoint is left"


def latest_in(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None
