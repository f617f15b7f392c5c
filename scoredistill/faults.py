"""Fault injection for testing a run's resilience: a plugin loaded only on request (``-p scoredistill.faults``).

* ``SCOREDISTILL_FAULT_SIGNAL=MOMENT:SIGNAL`` (e.g. ``25:SIGKILL``, ``pairs:SIGTERM``): the main
  process sends itself SIGNAL at MOMENT of the run's life: when generator step MOMENT is logged
  (``train.log_every`` must divide it), or at ``build`` (the run's build begins), ``pairs`` (the
  regression pairs are about to be made), ``train_end`` (training and its final checkpoint are
  done), ``evaluate`` (the evaluation begins) or ``report`` (the report begins);
* the generator-loss component ``nan_at``: zero, except at the listed calls (generator
  steps, counted from 1 in this process), where it is NaN, or has a NaN gradient with a
  finite value (``gradient_only: true``)::

      --set losses.boom.component=nan_at --set losses.boom.steps=[17]

Used by the test suite and ``scripts/check_resume_exact.py``; harmless unless enabled.
"""

from __future__ import annotations

import os
import signal

import torch
from pydantic import BaseModel, ConfigDict, Field

from scoredistill.hookspecs import hookimpl
from scoredistill.registry import component
from scoredistill.roles import GeneratorLoss

ENV_SIGNAL = "SCOREDISTILL_FAULT_SIGNAL"


@component("nan_at", role="generator_loss", paper="(fault injection for tests)")
class NaNAt(GeneratorLoss):
    """A zero loss term that is NaN (or has a NaN gradient) at chosen generator steps: for testing train.on_nonfinite."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        steps: list[int] = Field(default_factory=list, description="calls (1 = first generator step of this process) that go wrong")
        gradient_only: bool = Field(False, description="a finite value (0) with a NaN gradient instead of a NaN value")

    def __init__(self, config: "NaNAt.Config", ctx=None) -> None:
        super().__init__()
        self.config = config
        self.calls = 0

    def forward(self, batch, models) -> torch.Tensor:
        self.calls += 1
        if self.calls not in self.config.steps:
            return (batch.x * 0).sum()
        if self.config.gradient_only:
            return (batch.x * 0).abs().sqrt().sum()  # 0, with gradient 0 * inf = NaN
        return (batch.x * float("nan")).sum()


@hookimpl
def scoredistill_add_components() -> list[type]:
    return [NaNAt]


def _signal_at(moment: str) -> None:
    """Send the signal of ``SCOREDISTILL_FAULT_SIGNAL`` to this process if it names ``moment``."""
    spec = os.environ.get(ENV_SIGNAL)
    if not spec or os.environ.get("RANK", "0") not in ("", "0"):
        return
    at, _, name = spec.partition(":")
    if at == moment:
        os.kill(os.getpid(), getattr(signal, name or "SIGKILL"))


@hookimpl
def scoredistill_train_step_end(run, step: int, logs: dict) -> None:
    _signal_at(str(step))


@hookimpl
def scoredistill_configure(config) -> None:
    _signal_at("build")


@hookimpl(tryfirst=True)
def scoredistill_make_pair_source(spec, ctx):
    _signal_at("pairs")
    return None  # the pairs are made by their own plugin


@hookimpl
def scoredistill_train_end(run) -> None:
    _signal_at("train_end")


@hookimpl(tryfirst=True)
def scoredistill_evaluate(run, samples):
    _signal_at("evaluate")
    return None


@hookimpl(tryfirst=True)
def scoredistill_report(run, samples, metrics) -> None:
    _signal_at("report")
