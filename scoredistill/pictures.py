"""Pictures of any run: the loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scoredistill.io import finish_figure  # noqa: E402


def loss_curves(history: Sequence[dict], path: Path, title: str = "") -> None:
    """One panel per logged loss, against the generator step."""
    keys = [k for k in (history[0] if history else {}) if k not in ("step", "time")]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.2 * max(len(keys), 1), 2.8), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [h[key] for h in history], lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        if all(h[key] > 0 for h in history):
            ax.set_yscale("log")
    finish_figure(fig, path, title)
