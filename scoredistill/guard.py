"""The non-finite guard: every update's loss terms and gradients watched for NaN and inf (``train.on_nonfinite``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import torch
from torch import Tensor

from scoredistill.errors import UserError


class TrainingStopped(UserError):
    """A non-finite loss or gradient stopped the run (``train.on_nonfinite: stop``)."""

    exit_code = 1


class _Checkpointed(Protocol):
    last_checkpoint: Optional[Path]


class NonFiniteGuard:
    """Watches every update's loss terms and gradients for NaN and inf, without waiting for the device.

    ``stop``: the values are kept (no device work) and :meth:`check`, at log and
    checkpoint steps (one host sync), reports the first bad update by step and term; no
    checkpoint is written after it, so the last one is good. ``skip``: the optimiser is
    told on the device to skip the update (the fused Adam kernel's ``found_inf``); skips
    are counted.
    With fp16 loss scaling, gradient overflow is the scaler's business (it skips and
    lowers the scale): only the losses are watched.
    """

    def __init__(self, mode: str, device: torch.device, watch_gradients: bool = True) -> None:
        self.mode, self.watch_gradients = mode, watch_gradients
        # stop: (where, network, term names, term values, gradient flag) of each update, checked later
        self.pending: list[tuple[str, str, list[str], list[Tensor], Optional[Tensor]]] = []
        self.skipped = torch.zeros((), device=device)

    def observe(self, where: str, network: str, terms: dict[str, Tensor], gradients: Optional[Tensor]) -> Optional[Tensor]:
        """Record (``stop``) or act on (``skip``) one update's loss terms and gradient flag.

        ``gradients``: :meth:`~scoredistill.engine.Engine.check_gradients`' flag (1.0: a gradient is not finite), or ``None``.
        ``skip`` returns the update's own flag, 1.0 to skip it.
        """
        values = [v.reshape(()) if v.dim() else v for v in terms.values()]
        if self.mode == "stop":
            self.pending.append((where, network, list(terms), values, gradients))  # no device work until check()
            return None
        bad = (~_all_finite(values)).float()
        if gradients is not None:
            bad = torch.maximum(bad, gradients)
        self.skipped += bad
        return bad

    def check(self, run: _Checkpointed) -> None:
        """Raise :class:`TrainingStopped` for the first non-finite update since the last check (a host sync)."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        ok = _all_finite([v for *_, values, _ in pending for v in values])
        flags = [flag for *_, flag in pending if flag is not None]
        if flags:
            ok = ok & (torch.stack(flags) == 0).all()
        if bool(ok):
            return
        for where, network, terms, values, flag in pending:  # something is not finite: find the first (host reads, once)
            bad = [name for name, v in zip(terms, values) if not bool(torch.isfinite(v))]
            if bad or (flag is not None and bool(flag)):
                what = f"loss term '{bad[0]}'" if bad else f"gradient of the {network.replace('_', ' ')}"
                last = run.last_checkpoint
                keep = f"its last good checkpoint is {last}" if last is not None else "no checkpoint was written before it"
                raise TrainingStopped(f"non-finite {what} at {where}: the run stopped; {keep}; "
                                      "set train.on_nonfinite=skip to skip such updates, or lower the learning rates")


def _all_finite(values: list[Tensor]) -> Tensor:
    """A 0-d device bool: every one of ``values`` (0-d tensors) is finite. One ``stack``, however many there are
    (on a launch-bound GPU each op costs about a kernel)."""
    with torch.no_grad():
        return torch.isfinite(torch.stack(values)).all()
