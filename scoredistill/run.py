"""A run's state (:class:`Run`) and how its role objects are built through the role hooks (:func:`build`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from scoredistill.config import RunConfig
from scoredistill.cuda_graph import IterationGraph
from scoredistill.ema import EMA
from scoredistill.engine import Engine
from scoredistill.errors import UserError
from scoredistill.guard import NonFiniteGuard
from scoredistill.plugins import Hooks
from scoredistill.precision import WeightCopies
from scoredistill.roles import BuildContext, FakeScoreLoss, GeneratorLoss, Models, PairSource
from scoredistill.trained import Trained


@dataclass
class Run:
    """Everything a run is made of (the trainer's state); lifecycle hooks see it as a :class:`~scoredistill.views.RunView`."""

    config: RunConfig
    dir: Path
    hooks: Hooks
    models: Models
    losses: dict[str, GeneratorLoss]
    fake_score_loss: Optional[FakeScoreLoss]
    pairs: Optional[PairSource]
    history: list[dict[str, float]] = field(default_factory=list)
    step: int = 0
    ema: Optional[EMA] = None
    engine: Optional[Engine] = None
    trained: dict[str, Trained] = field(default_factory=dict)
    warmup_step: int = 0
    guard: Optional[NonFiniteGuard] = None
    train_seconds: float = 0.0  # training time of earlier processes (a resumed run) and of this one once it ends
    checkpoint_seconds: float = 0.0
    last_checkpoint: Optional[Path] = None
    started: Optional[float] = None  # perf_counter() when this process began training
    cuda_graphs: bool = False  # the networks replay CUDA graphs (compile_mode=reduce-overhead on CUDA); set by setup()
    teacher_copies: Optional[WeightCopies] = None  # the frozen teacher's low-precision weights (runtime.cast_weights)
    iteration_graph: Optional[IterationGraph] = None  # runtime.cuda_graph: the updates captured and replayed; set by setup()

    def elapsed(self) -> float:
        """Seconds of training so far, over every process that worked on this run (resumes included)."""
        return self.train_seconds + (time.perf_counter() - self.started if self.started is not None else 0.0)

    @property
    def sampling_generator(self) -> torch.nn.Module:
        """The generator used for samples and evaluation: its EMA when ``train.ema_decay`` is set (and ``eval_with_ema``)."""
        if self.ema is not None and self.config.train.eval_with_ema:
            return self.ema.module
        return self.models.generator

    @property
    def device(self) -> torch.device:
        return self.engine.device if self.engine is not None else torch.device(self.config.runtime.device)

    def keep(self, x: Tensor) -> Tensor:
        """``x`` (a network's output, detached) made safe to hand to another network's update.

        Under CUDA graphs (torch's CUDAGraph Trees) a compiled call made with no backward pending
        starts a new "iteration" and may reuse the memory of the previous iteration's outputs; the
        fake-score update is such a call, and its input is G's output. A copy outside the graphs'
        memory pool keeps it valid; elsewhere ``x`` is returned as it is.
        """
        return x.clone() if self.cuda_graphs else x

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (the only one without torchrun)."""
        return self.engine is None or self.engine.is_main

    @property
    def batch_size(self) -> int:
        """Generator samples per step on this process: ``train.batch_size`` split over the processes."""
        return self.config.train.batch_size // (self.engine.world_size if self.engine else 1)

    @property
    def pair_batch_size(self) -> int:
        n = self.config.train.pair_batch_size or self.config.train.batch_size
        return n // (self.engine.world_size if self.engine else 1)

    def refresh_weight_copies(self) -> None:
        """The low-precision weight copies follow weights changed outside an update (a resume, ``train_start`` hooks)."""
        for copies in (self.teacher_copies, *(net.copies for net in self.trained.values())):
            if copies is not None:
                copies.refresh()

    def trains_fake_score(self) -> bool:
        return self.fake_score_loss is not None and any(p.requires_grad for p in self.models.fake_score.parameters())


def _set_runtime(config: RunConfig) -> None:
    if config.runtime.num_threads:
        torch.set_num_threads(config.runtime.num_threads)
    torch.manual_seed(config.seed)


def build(config: RunConfig, hooks: Hooks, run_dir: Path, with_losses: bool = True, device: Optional[torch.device] = None) -> Run:
    """Build every role's object through the role hooks (teacher first; it is frozen)."""
    hooks.configure(config=config)
    _set_runtime(config)
    device = device if device is not None else torch.device(config.runtime.device)
    ctx = BuildContext(hooks=hooks, device=device, seed=config.seed, extra={"progress": config.runtime.progress})
    teacher = hooks.make_teacher(spec=config.teacher, ctx=ctx).to(device).eval().requires_grad_(False)
    ctx.teacher = teacher
    generator = hooks.make_generator(spec=config.generator, ctx=ctx).to(device)
    fake_score = hooks.make_fake_score(spec=config.fake_score, ctx=ctx).to(device)
    ctx.fake_score = fake_score
    models = Models(teacher=teacher, generator=generator, fake_score=fake_score)
    losses: dict[str, GeneratorLoss] = {}
    fake_loss = pairs = None
    if with_losses:
        losses = {name: hooks.make_generator_loss(name=name, spec=spec, ctx=ctx).to(device) for name, spec in config.losses.items()}
        if config.fake_score_loss is not None:
            fake_loss = hooks.make_fake_score_loss(spec=config.fake_score_loss, ctx=ctx)
        if any(term.needs_pairs for term in losses.values()):
            if config.pairs is None:
                raise UserError("a generator loss term needs regression pairs but the config has no 'pairs' section")
            pairs = hooks.make_pair_source(spec=config.pairs, ctx=ctx)
    return Run(config, Path(run_dir), hooks, models, losses, fake_loss, pairs)
