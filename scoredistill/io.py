"""Files that are never half-written: atomic replace for text, JSON and safetensors."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

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
