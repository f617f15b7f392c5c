"""Scatter pictures of 2-D samples over a Gaussian mixture's density: one panel, or several side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher  # noqa: E402
from scoredistill.io import finish_figure  # noqa: E402


def _extent(teacher: GaussianMixtureTeacher, pad: float = 3.5) -> tuple[float, float, float, float]:
    m, s = teacher.means.cpu(), teacher.stds.max().item()
    lo, hi = m.min(0).values - pad * s - 0.5, m.max(0).values + pad * s + 0.5
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def draw_scatter(ax, teacher: GaussianMixtureTeacher, samples: torch.Tensor, title: str = "", max_points: int = 3000) -> None:
    """Generator samples (dots) over the target's log-density (shading) on one axis."""
    x0, x1, y0, y1 = _extent(teacher)
    gx, gy = torch.meshgrid(torch.linspace(x0, x1, 200), torch.linspace(y0, y1, 200), indexing="xy")
    logp = teacher.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1).to(teacher.means.device)).reshape(200, 200).cpu()
    ax.imshow(logp.clamp(min=logp.max() - 8).numpy(), extent=(x0, x1, y0, y1), origin="lower", cmap="Blues", alpha=0.9)
    s = samples[:max_points].cpu()
    ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:red", alpha=0.5, linewidths=0)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def scatter_over_density(teacher: GaussianMixtureTeacher, samples: torch.Tensor, path: Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    draw_scatter(ax, teacher, samples, title)
    finish_figure(fig, path)  # the title is the axes'


def scatter_panels(teacher: GaussianMixtureTeacher, panels: Sequence[tuple[str, torch.Tensor]], path: Path, title: Optional[str] = None) -> None:
    """Side-by-side scatter plots, one per (label, samples)."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.2), squeeze=False)
    for ax, (label, samples) in zip(axes[0], panels):
        draw_scatter(ax, teacher, samples, label)
    finish_figure(fig, path, title)
