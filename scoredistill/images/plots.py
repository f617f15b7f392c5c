"""Pictures of image runs: teacher-vs-generator sample grids and class histograms."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from scoredistill.io import finish_figure  # noqa: E402


def make_grid(images: Tensor, nrow: int, pad: int = 1) -> Tensor:
    """``(N, C, H, W)`` in [-1, 1] to one ``(H', W', C)`` array in [0, 1], ``nrow`` images per row."""
    x = ((images.float().clamp(-1, 1) + 1) / 2).cpu()
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones((c, rows * (h + pad) + pad, nrow * (w + pad) + pad))
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = x[i]
    return grid.permute(1, 2, 0)


def sample_grids(panels: Sequence[tuple[str, Tensor]], path: Path, title: Optional[str] = None, n: int = 100) -> None:
    """Side-by-side grids (e.g. teacher vs generator, same noise), ``n`` images each."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.9), squeeze=False)
    for ax, (label, images) in zip(axes[0], panels):
        images = images[:n]
        if images.shape[1] not in (1, 3):
            images = images[:, :1]  # latents of another channel count: their first channel, in grey
        grid = make_grid(images, nrow=int(math.ceil(math.sqrt(len(images)))))
        ax.imshow(grid.squeeze(-1).numpy() if grid.shape[-1] == 1 else grid.numpy(), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    finish_figure(fig, path, title)


def captioned_grids(panels: Sequence[tuple[str, Tensor]], captions: Sequence[str], path: Path, title: Optional[str] = None,
                    n: int = 8, width: int = 28) -> None:
    """One row per panel (e.g. teacher, generator: same noise, same prompts), ``n`` images each, every column under
    its prompt (cut to ``width`` characters a line, two lines)."""
    import textwrap

    n = min(n, min(len(images) for _, images in panels))
    fig, axes = plt.subplots(len(panels), n, figsize=(1.9 * n, 2.2 * len(panels)), squeeze=False)
    for r, (label, images) in enumerate(panels):
        for k in range(n):
            ax, img = axes[r][k], ((images[k].float().clamp(-1, 1) + 1) / 2).cpu()
            img = img[:1] if img.shape[0] not in (1, 3) else img
            ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(captions[k], width)[:2]), fontsize=7)
            if k == 0:
                ax.set_ylabel(label, fontsize=8)
    finish_figure(fig, path, title)


def class_histogram(series: Sequence[tuple[str, Sequence[float]]], path: Path, title: Optional[str] = None) -> None:
    """Grouped bars: the share of each predicted class, one colour per series."""
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    width = 0.8 / max(len(series), 1)
    for i, (label, shares) in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(shares))]
        ax.bar(xs, shares, width=width, label=label)
    ax.set_xticks(range(10))
    ax.set_xlabel("predicted class (digits classifier)")
    ax.set_ylabel("share")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    finish_figure(fig, path)
