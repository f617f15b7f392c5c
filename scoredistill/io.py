"""Files that are never half-written: atomic replace for text, JSON and safetensors; caches filled once."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # after the write: mkstemp makes 0600, and a writer may replace the file (safetensors renames its own
        # 0600 temporary file onto it); a run folder is for sharing
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def fill_lock(path: Path, log: Callable[[str], None] = lambda m: None, wait: bool = True) -> Iterator[bool]:
    """Hold the lock on filling the cache entry ``path`` (``fcntl.flock`` on ``path.lock``); yields whether it is held.

    Of several processes about to compute the same entry (the ranks of one run, or two runs sharing a cache), the
    first computes it while the others wait here (``wait=False``: they get ``False`` at once and may do other work
    first), then find it written. The caller looks for the entry again inside the lock. Where the file system has no
    locks (or the folder is read-only) every process computes, as without it (``True``). Only for work without
    collectives: a process waiting here must not be needed by the one computing.
    """
    lock, fd = Path(f"{path}.lock"), None
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another process holds it
        if not wait:
            os.close(fd)
            yield False
            return
        log(f"waiting for another process to fill {path}")
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # no lock file here (read-only) or no locks (ENOLCK): compute as without
        if fd is not None:
            os.close(fd)
        yield True
        return
    try:
        yield True
    finally:
        # removed while held: a process still waiting holds the old file and looks for the entry again (written
        # now, or not, when this one failed: then two may compute it, which atomic writes make safe)
        lock.unlink(missing_ok=True)
        os.close(fd)


def _umask() -> int:
    try:  # Linux: read it, without setting it for a moment (other threads write files too)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata_: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata_))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight"))


def finish_figure(fig, path: Path, title: str | None = None) -> None:
    """Title (optional), tight layout, atomic save, close: the last lines of every picture."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def environment_versions() -> dict[str, str]:
    """Versions of Python and of the packages a run's numbers depend on."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("scoredistill", "torch", "torchvision", "numpy", "pluggy", "pydantic", "omegaconf", "safetensors", "lpips", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
