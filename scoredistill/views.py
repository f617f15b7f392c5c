"""What a plugin sees of a run: a narrow, typed view, not the trainer's whole state.

The lifecycle hooks (``scoredistill_train_start``, ``..._train_step_end``, ``..._train_end``,
``..._evaluate``, ``..._report``) receive a :class:`RunView`. The trainer's
:class:`~scoredistill.run.Run` is one (it has more: optimisers, the engine, the guard, which a
plugin has no business with); so is a finished run loaded back for ``scoredistill eval``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from scoredistill.config import RunConfig
    from scoredistill.roles import Models


class RunView(Protocol):
    """What a lifecycle hook may read of a run (and, at ``train_start``, change in place: the networks' weights)."""

    @property
    def config(self) -> RunConfig:
        """The resolved run config (method, preset, every section)."""

    @property
    def dir(self) -> Path:
        """The run folder; pictures and extra files go here."""

    @property
    def models(self) -> Models:
        """The teacher, generator and fake score."""

    @property
    def history(self) -> list[dict[str, float]]:
        """The logged records so far (``history.json``)."""

    @property
    def step(self) -> int:
        """Generator steps done."""

    @property
    def is_main(self) -> bool:
        """True on the process that writes files."""

    @property
    def device(self) -> torch.device:
        """Where the networks are."""

    @property
    def sampling_generator(self) -> nn.Module:
        """The generator samples and evaluation use (its EMA where kept)."""
