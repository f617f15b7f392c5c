"""One training iteration's updates captured as a CUDA graph and replayed (``runtime.cuda_graph``).

An eager DMD iteration on a CIFAR-sized UNet launches about 6,000 kernels, and the host's
dispatch of them (PyTorch's eager ops, autograd, diffusers' Python) is slower than the
card's work: on an H200 the iteration takes the host's time, not the kernels'. A CUDA graph
of the whole iteration (the generator step, the fake-score steps, their optimiser steps and
weight-copy refreshes) is launched with one call, so the iteration is paced by its kernels.
The networks, the optimisers and the maths are the ones of the eager iteration:

- the first :data:`WARMUP_ITERATIONS` iterations of a process run eagerly, on a side stream
  (as capture needs: cuDNN's timed algorithm choice, the optimisers' lazy state, the
  gradients' buffers);
- the next is captured (which runs nothing) and then replayed, as is every later one;
- random draws come from the default CUDA generator, which a graph advances at each replay
  as the eager calls would, so a replay draws the numbers that eager iteration would draw;
- a scheduled learning rate is read by the captured optimiser step from a device tensor,
  filled from the schedule on the host when it changes; a constant one is captured as it is;
- ``train.on_nonfinite=stop``: the guard's record of each captured update (its loss terms and
  gradient flag, overwritten by each replay) is copied after each replay, under that
  iteration's step, so the guard's ``check`` reports the update it would report
  eagerly; ``skip`` counts on the device inside the graph.

What a replay repeats is the kernels: anything a component computes on the host inside an
update (a Python counter, a weight annealed by the step number, a draw from the CPU's random
generator) is fixed at the capture. The built-in components keep such state on the device
and draw their random numbers there; a plugin's components must do the same to be replayed
correctly (``docs/tutorial.md``, "Checklist and common errors").

What a graph cannot follow, and the engine therefore refuses (:class:`~scoredistill.engine.Engine`):
CPU devices, several processes, ``runtime.compile`` (inductor's own graphs:
``compile_mode=reduce-overhead``) and fp16 loss scaling. Outside a replay nothing changes:
the schedules, the EMA, the step count, logging, samples and checkpoints run on the host as
before. The returned logs are the graph's own output tensors, valid until the next
iteration; a plugin that keeps them must copy them. Weights may be changed in place between
iterations (a replay reads them), but a network's parameter, gradient or optimiser-state
tensors must not be replaced after the capture (a resume loads before the first iteration).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import torch
from torch import Tensor

from scoredistill.errors import UserError


class Run(Protocol):
    """What the graph reads of a run (:class:`scoredistill.run.Run` is one)."""

    trained: dict[str, Any]  # name -> Trained: its optimizer and lr schedule
    device: torch.device
    guard: Any  # the NonFiniteGuard: its pending records
    step: int

#: eager iterations before the capture (on a side stream); PyTorch's whole-network capture examples take three
WARMUP_ITERATIONS = 3


class IterationGraph:
    """Runs a run's per-iteration updates: eagerly at first, then as one captured CUDA graph."""

    def __init__(self) -> None:
        self.eager_left = WARMUP_ITERATIONS
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logs: dict[str, Tensor] = {}
        self.lrs: list[tuple[dict, Tensor, float]] = []  # (param group, the lr the graph reads, its value there)
        self.observed: list[tuple] = []  # the non-finite guard's records made at capture (on_nonfinite=stop)
        self.captured_at = 0  # run.step at capture: the step its records name

    def __call__(self, run: "Run", updates: Callable[["Run"], dict[str, Tensor]]) -> dict[str, Tensor]:
        if self.eager_left > 0:
            self.eager_left -= 1
            return _on_side_stream(lambda: updates(run))
        if self.graph is None:
            self._capture(run, updates)
        self._fill_lrs()
        self.graph.replay()
        self._observe(run)
        return self.logs

    def _capture(self, run: "Run", updates: Callable[["Run"], dict[str, Tensor]]) -> None:
        """Capture ``updates(run)`` (nothing runs); the optimisers' groups are as before afterwards."""
        groups = [(net, group) for net in run.trained.values() for group in net.optimizer.param_groups]
        for net, group in groups:
            group["capturable"] = True  # Adam's capture check; its fused kernel does the same arithmetic
            if net.schedule is not None:  # the captured step reads the lr from the device
                lr = torch.full((), group["lr"], dtype=torch.float32, device=run.device)
                self.lrs.append((group, lr, group["lr"]))
                group["lr"] = lr
        first = len(run.guard.pending)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the loop's background threads (the sample pictures' device-to-host copy) may use CUDA meanwhile
        try:
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.logs = updates(run)
        except RuntimeError as exc:  # e.g. a plugin's component waits for the device or copies from the host
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"runtime.cuda_graph: the training iteration could not be captured as a CUDA graph ({first_line}); "
                            "a component synchronises with the host or uses CPU tensors in its update; set "
                            "runtime.cuda_graph=false") from exc
        finally:
            for net, group in groups:
                group["capturable"] = False
            for group, _, value in self.lrs:
                group["lr"] = value  # a float again, for the schedule and the checkpoints
        self.observed, run.guard.pending[first:] = run.guard.pending[first:], []
        self.captured_at = run.step

    def _fill_lrs(self) -> None:
        for i, (group, lr, value) in enumerate(self.lrs):
            if group["lr"] != value:
                lr.fill_(group["lr"])
                self.lrs[i] = (group, lr, group["lr"])

    def _observe(self, run: "Run") -> None:
        """The captured updates' guard records, copied (the next replay overwrites them) under this step."""
        then, now = f"generator step {self.captured_at + 1}", f"generator step {run.step + 1}"
        for where, network, names, values, flag in self.observed:
            kept = torch.stack(values)
            run.guard.pending.append((where.replace(then, now), network, names, list(kept.unbind()),
                                      None if flag is None else flag.clone()))


def _on_side_stream(work: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """``work()`` on a side stream, ordered after and before the current stream's work (capture's warm-up recipe)."""
    current, side = torch.cuda.current_stream(), torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = work()
    current.wait_stream(side)
    return out
