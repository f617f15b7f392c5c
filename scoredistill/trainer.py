"""The training loop, readable top to bottom (DMD Algorithm 1, generalised).

Per generator step::

    z ~ N(0, I);  x = G(z)
    L_G = sum_k w_k * term_k(batch, models)          # e.g. distribution matching, regression
    update G on L_G
    repeat fake_updates_per_step times:               # TTUR (DMD2) when > 1
        update D_fake on fake_score_loss(sg(x))       # the first time on this step's x

Which terms, which fake score and which fake-score loss are the method's choice
(its components); the loop has no knowledge of any particular method.

Around the loop, and out of its way:

* the :class:`~scoredistill.engine.Engine` (accelerate): one process, or data-parallel
  processes under torchrun (DDP, or FSDP), mixed precision;
* every update is ``backward -> unscale -> clip -> step`` (:func:`_update`); a
  non-finite loss term or gradient either stops the run (checked at log and
  checkpoint steps, so the loop never waits for the device) or skips the update
  on the device (``train.on_nonfinite``);
* checkpoints (:mod:`scoredistill.checkpoint`) every ``train.checkpoint_every``
  steps and at the end; ``--resume`` continues bit for bit; SIGINT / SIGTERM save
  one and stop;
* logs (:mod:`scoredistill.runlog`): progress bar, ``history.json``, ``metrics.csv``,
  TensorBoard, periodic sample pictures.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from scoredistill import checkpoint as ckpt
from scoredistill.config import RunConfig, TrainConfig, load_run_config
from scoredistill.cuda_graph import IterationGraph
from scoredistill.engine import Engine, Trainable, launched_processes, rank_seed
from scoredistill.errors import UserError
from scoredistill.io import environment_versions, load_tensors, save_tensors, write_json, write_text
from scoredistill.plugins import Hooks
from scoredistill.precision import WeightCopies
from scoredistill.roles import (BuildContext, FakeScoreLoss, GeneratorBatch, GeneratorLoss, Models, PairSource, Role, cat_conditions,
                               seeded_conditions)
from scoredistill.runlog import METRICS_CSV, RunLog, check_tensorboard, weights_hash


class TrainingStopped(UserError):
    """A non-finite loss or gradient stopped the run (``train.on_nonfinite: stop``)."""

    exit_code = 1


class RunInterrupted(Exception):
    """SIGINT or SIGTERM: a checkpoint was saved and the run stopped."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class Trained:
    """A network the run trains: the wrapper its updates run in (DDP/FSDP or plain), its optimiser and lr schedule."""

    name: str
    wrapper: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Optional[torch.optim.lr_scheduler.LRScheduler]  # None: a constant lr
    params: list[nn.Parameter] = field(default_factory=list)
    copies: Optional[WeightCopies] = None  # its low-precision weight copies (runtime.cast_weights=per_update)

    def __call__(self, objective: Callable[[nn.Module], Any]) -> Any:
        """Run ``objective(network)`` as this network's forward (so DDP/FSDP see the whole update)."""
        if type(self.wrapper) is Trainable:  # one process: no DDP/FSDP around it, and no hooks on it to run
            return objective(self.wrapper.net)
        return self.wrapper(objective)


@dataclass
class Run:
    """Everything a run is made of; handed to the lifecycle hooks."""

    config: RunConfig
    dir: Path
    hooks: Hooks
    models: Models
    losses: dict[str, GeneratorLoss]
    fake_score_loss: Optional[FakeScoreLoss]
    pairs: Optional[PairSource]
    history: list[dict[str, float]] = field(default_factory=list)
    step: int = 0
    ema: Optional[torch.optim.swa_utils.AveragedModel] = None
    engine: Optional[Engine] = None
    trained: dict[str, Trained] = field(default_factory=dict)
    warmup_step: int = 0
    guard: Optional["NonFiniteGuard"] = None
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
    ctx.generator = generator
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


# --------------------------------------------------------------------------- one update


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

        ``gradients``: :meth:`Engine.check_gradients`' flag (1.0: a gradient is not finite), or ``None``.
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

    def check(self, run: "Run") -> None:
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


def _update(run: Run, net: Trained, loss: Tensor, terms: dict[str, Tensor], where: str) -> None:
    """``backward -> unscale -> clip -> step`` of one network, watching for non-finite values.

    With low-precision weight copies (``runtime.cast_weights``), their gradients reach the float32
    weights before the unscale, and the copies are refreshed after the step.
    """
    opt, scaler, copies = net.optimizer, run.engine.scaler, net.copies
    scaling = scaler.is_enabled()  # fp16 only
    opt.zero_grad(set_to_none=True)
    if copies is not None:
        copies.zero_grad()
    (scaler.scale(loss) if scaling else loss).backward()
    if copies is not None:
        copies.gradients_to_masters()
    if scaling:
        scaler.unscale_(opt)
    gradients = run.engine.check_gradients(net.wrapper, net.params, run.config.train.grad_clip, run.guard.watch_gradients)
    skip = run.guard.observe(where, net.name, terms, gradients)
    if skip is not None:
        opt.found_inf = skip  # read by the fused optimiser: it skips the update on the device
    if scaling:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    if skip is not None and hasattr(opt, "found_inf"):
        del opt.found_inf
    if copies is not None:
        copies.refresh()


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Within: no gradient is accumulated into ``module``'s parameters (gradients still flow through it)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def generator_step(run: Run) -> tuple[Tensor, Optional[Tensor], dict[str, Tensor]]:
    """One update of G on the weighted sum of the method's terms; returns ``sg(x)``, its conditions ``c`` and the terms.

    ``c`` comes from :meth:`~scoredistill.roles.Teacher.sample_conditions` (``None`` for an unconditional teacher), and
    ``G``, ``D_real`` and ``D_fake`` all see it (``batch.cond``).
    """
    models = run.models

    def objective(g: nn.Module) -> tuple[Tensor, dict[str, Tensor], tuple[Tensor, Optional[Tensor]]]:
        z = torch.randn((run.batch_size, *g.latent_shape), device=run.device)
        cond = models.teacher.sample_conditions(run.batch_size)
        if run.pairs is None:
            batch = GeneratorBatch(z=z, x=g(z, cond), cond=cond)
        else:  # G(z) and G(z_ref) in one batched call (DMD's two generator passes, Algorithm 1)
            z_ref, y_ref, c_ref = run.pairs.sample(run.pair_batch_size)
            x, x_ref = g(torch.cat([z, z_ref]), cat_conditions(cond, c_ref)).split([len(z), len(z_ref)])
            batch = GeneratorBatch(z=z, x=x, cond=cond, z_ref=z_ref, y_ref=y_ref, x_ref=x_ref, cond_ref=c_ref)
        terms = {name: term(batch, models) for name, term in run.losses.items()}
        total = sum(run.config.losses[name].weight * value for name, value in terms.items())
        return total, terms, (batch.x.detach(), cond)

    g, f = run.trained["generator"], run.trained.get("fake_score")
    # D_fake is only read here (a GAN term back-propagates through it to x, not into its weights); FSDP: its full weights
    freeze = any(term.differentiates_fake_score for term in run.losses.values())
    with run.engine.full_parameters(f.wrapper if f else None), (_frozen(models.fake_score) if freeze else contextlib.nullcontext()):
        with run.engine.autocast():
            total, terms, (x, cond) = g(objective)
        terms = {k: v.detach() for k, v in terms.items()}
        _update(run, g, total, terms, f"generator step {run.step + 1}")
    terms["generator"] = total.detach()
    return x, cond, terms


def fake_score_step(run: Run, x: Optional[Tensor] = None, cond: Optional[Tensor] = None) -> Tensor:
    """One update of D_fake on detached generator samples ``x`` with conditions ``cond`` (fresh ones when ``x`` is None)."""
    models = run.models
    g, f = run.trained["generator"], run.trained["fake_score"]
    if x is None:
        with torch.no_grad(), run.engine.autocast():
            z = torch.randn((run.batch_size, *models.generator.latent_shape), device=run.device)
            cond = models.teacher.sample_conditions(run.batch_size)
            x = run.keep(g(lambda gen: gen(z, cond)))
    where = (f"fake-score warm-up update {run.warmup_step + 1}" if run.step == 0 and run.warmup_step < run.config.train.fake_score_warmup_steps
             else f"a fake-score update of generator step {run.step + 1}")
    with run.engine.full_parameters(g.wrapper):  # FSDP: G's weights for this update
        with run.engine.autocast():
            loss = f(lambda fake: run.fake_score_loss(x, cond, models))
        _update(run, f, loss, {"fake_score": loss.detach()}, where)
    return loss.detach()


def updates(run: Run) -> dict[str, Tensor]:
    """An iteration's device work: a generator step, then ``train.fake_updates_per_step`` fake-score steps (the
    first on the generator step's own samples); returns the logged values as device tensors."""
    x, cond, logs = generator_step(run)
    x = run.keep(x)
    if "fake_score" in run.trained:
        for k in range(run.config.train.fake_updates_per_step):  # the first on sg(G(z, c)), later ones on fresh samples
            logs["fake_score"] = fake_score_step(run, x if k == 0 else None, cond if k == 0 else None)
    return logs


def train_iteration(run: Run) -> dict[str, Tensor]:
    """One training iteration (Algorithm 1): the :func:`updates` (replayed as one CUDA graph with
    ``runtime.cuda_graph``: :mod:`scoredistill.cuda_graph`), then the lr schedules and the EMA.

    Returns the logged values as device tensors: nothing here waits for the device.
    """
    if run.cuda_graphs:  # the graphs' outputs from the last iteration are dead from here on
        torch.compiler.cudagraph_mark_step_begin()
    logs = run.iteration_graph(run, updates) if run.iteration_graph is not None else updates(run)
    for net in run.trained.values():
        if net.schedule is not None:
            net.schedule.step()
    _update_ema(run)
    run.step += 1
    return logs


# --------------------------------------------------------------------------- set-up


def _make_optimizer(cfg: TrainConfig, name: str, wrapper: nn.Module, net: nn.Module, lr: float, fused: bool) -> torch.optim.Optimizer:
    """Adam(W) over ``wrapper``'s parameters; submodules named in ``train.module_lr`` get their own group."""
    params = [p for p in wrapper.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = []
    taken: set[int] = set()
    for key, module_lr in cfg.module_lr.items():
        owner, _, sub = key.partition(".")
        if owner != name:
            continue
        try:
            module = net.get_submodule(sub)
        except AttributeError:
            children = ", ".join(n for n, _ in net.named_children()) or "(none)"
            raise UserError(f"train.module_lr: the {name} has no submodule '{sub}'; its submodules: {children}") from None
        ids = {id(p) for p in module.parameters()}
        groups.append({"params": [p for p in params if id(p) in ids], "lr": module_lr})
        taken |= ids
    rest = [p for p in params if id(p) not in taken]
    groups = ([{"params": rest}] if rest else []) + groups
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    kwargs: dict[str, Any] = {"lr": lr, "betas": cfg.adam_betas, "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay}
    if fused:
        kwargs["fused"] = True
    return cls(groups if len(groups) > 1 else groups[0]["params"], **kwargs)


def _lr_schedule(opt: torch.optim.Optimizer, kind: str, steps: int) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """Cosine annealing over ``steps``, or None for a constant lr (nothing to step)."""
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    return None


class EMA(torch.optim.swa_utils.AveragedModel):
    """An exponential moving average of the generator's weights, ``ema <- ema + (1 - decay) (w - ema)``.

    :class:`~torch.optim.swa_utils.AveragedModel` (same state dict, so checkpoints are
    interchangeable) whose update never waits for the device: its ``n_averaged == 0``
    test is kept on the host, read from the device once (after a resume).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=False)
        self.module.eval()  # never trained: it only samples
        self.decay = decay
        self._count: Optional[int] = None

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._count is None:
            self._count = int(self.n_averaged)  # once: 0 for a new run, the checkpoint's count after a resume
        lists = self.__dict__.get("_lists")
        if lists is None or lists[0] is not model:  # built once (the Parameter objects: FSDP swaps their data)
            lists = self.__dict__["_lists"] = (model, list(self.module.parameters()), list(model.parameters()))
        _, mine, theirs = lists
        if self._count == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)
        self.n_averaged += 1
        self._count += 1

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._count = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _speed_options(run: Run) -> None:
    """``runtime.channels_last`` and ``runtime.compile``: on the networks themselves, after the EMA copy is made."""
    rt, models = run.config.runtime, run.models
    nets = [models.teacher, models.generator, models.fake_score]
    if rt.channels_last:
        for net in nets:
            net.to(memory_format=torch.channels_last)
    run.cuda_graphs = rt.compile and rt.compile_mode == "reduce-overhead" and run.device.type == "cuda"
    if rt.compile:
        for net in nets:
            for target in net.compile_targets() if isinstance(net, Role) else [net]:  # roles of one architecture share code
                target.compile(mode=rt.compile_mode, dynamic=False)  # in place: state dict keys are unchanged


def setup(run: Run) -> None:
    """Engine, EMA, speed options, wrapped networks, optimisers, schedules and the non-finite guard (every process)."""
    cfg, models = run.config.train, run.models
    if run.engine is None:  # a bare build(): one process
        run.engine = Engine(run.config.runtime)
    engine = run.engine
    if cfg.batch_size % engine.world_size or (cfg.pair_batch_size or cfg.batch_size) % engine.world_size:
        raise UserError(f"train.batch_size={cfg.batch_size} (and pair_batch_size) must divide evenly over "
                        f"{engine.world_size} processes")
    if cfg.ema_decay is not None:
        run.ema = EMA(models.generator, cfg.ema_decay)
    _speed_options(run)
    dtype = engine.weight_copies_dtype  # after the EMA's copy and the speed options: the EMA keeps the plain layers
    if dtype is not None:  # the frozen teacher's copies are made once: its weights never change
        run.teacher_copies = WeightCopies(models.teacher, dtype, engine.device.type)
    fused = cfg.on_nonfinite == "skip" or engine.fused_adam  # one kernel per tensor: faster on CPUs too
    nets = {"generator": (models.generator, cfg.generator_lr)}
    if run.trains_fake_score():
        nets["fake_score"] = (models.fake_score, cfg.fake_score_lr)
    for name, (net, lr) in nets.items():
        wrapper = engine.wrap(net)
        opt = _make_optimizer(cfg, name, wrapper, net, lr, fused)
        params = [p for p in wrapper.parameters() if p.requires_grad]
        copies = WeightCopies(net, dtype, engine.device.type) if dtype is not None else None
        run.trained[name] = Trained(name, wrapper, opt, _lr_schedule(opt, cfg.lr_schedule, cfg.steps), params, copies)
    run.guard = NonFiniteGuard(cfg.on_nonfinite, engine.device, watch_gradients=not engine.scaler.is_enabled())
    run.iteration_graph = IterationGraph() if run.config.runtime.cuda_graph else None  # the engine checked it can be


def _refresh_weight_copies(run: Run) -> None:
    """The low-precision weight copies follow weights changed outside an update (a resume, ``train_start`` hooks)."""
    for copies in (run.teacher_copies, *(net.copies for net in run.trained.values())):
        if copies is not None:
            copies.refresh()


def _update_ema(run: Run) -> None:
    if run.ema is not None:
        with run.engine.full_parameters(run.trained["generator"].wrapper):
            run.ema.update_parameters(run.models.generator)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: Run) -> Path:
    """Write a checkpoint of the run as it is now (every process calls this; the main one writes)."""
    t0 = time.perf_counter()
    run.guard.check(run)  # never after a non-finite update
    engine, cfg = run.engine, run.config.train
    tensors: dict[str, Tensor] = {}
    opt_meta: dict[str, Any] = {}
    for name, net in run.trained.items():
        tensors.update({f"{name}.{k}": v for k, v in engine.model_state(net.wrapper).items()})
        flat, opt_meta[name] = ckpt.optimizer_to_flat(name, engine.optimizer_state(net.wrapper, net.optimizer))
        tensors.update(flat)
    if run.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in run.ema.state_dict().items()})
    for term_name, term in run.losses.items():
        if term.checkpointed:  # a term's own state (an EMA target network)
            tensors.update({f"losses.{term_name}.{k}": v for k, v in term.state_dict().items()})
    rng = engine.gather(ckpt.capture_rng(run.device))
    name = ckpt.checkpoint_name(run.step, run.warmup_step, cfg.fake_score_warmup_steps)
    skipped = float(run.guard.skipped)
    if engine.is_main:
        rng_tensors, rng_meta = ckpt.rng_to_flat(rng)
        state = {
            "step": run.step, "warmup_step": run.warmup_step, "world_size": engine.world_size,
            "optimizers": opt_meta, "schedules": {n: t.schedule.state_dict() for n, t in run.trained.items() if t.schedule is not None},
            "scaler": engine.scaler.state_dict(), "rng": rng_meta, "history": run.history, "skipped": skipped,
            "train_seconds": run.elapsed(),
            "checkpoint_seconds": run.checkpoint_seconds,
        }
        ckpt.save(run.dir, name, {**tensors, **rng_tensors}, state, run.config.to_yaml(), cfg.keep_checkpoints)
    engine.barrier()
    run.last_checkpoint = run.dir / name
    run.checkpoint_seconds += time.perf_counter() - t0
    return run.last_checkpoint


def restore(run: Run, checkpoint: ckpt.Checkpoint) -> None:
    """Put the run back exactly as it was when ``checkpoint`` was written (after :func:`setup`)."""
    engine, state, tensors = run.engine, checkpoint.state, checkpoint.tensors
    try:
        for name, net in run.trained.items():
            engine.load_model_state(net.wrapper, ckpt.prefixed(tensors, name))
            flat = ckpt.optimizer_from_flat(name, tensors, state["optimizers"][name])
            engine.load_optimizer_state(net.wrapper, net.optimizer, flat)
            if net.schedule is not None:
                net.schedule.load_state_dict(state["schedules"][name])
        if run.ema is not None:
            run.ema.load_state_dict(ckpt.prefixed(tensors, "ema"))
        for term_name, term in run.losses.items():
            if term.checkpointed:
                term.load_state_dict(ckpt.prefixed(tensors, f"losses.{term_name}"))
        if state["scaler"]:
            engine.scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"checkpoint {checkpoint.path} does not fit this run's networks: {str(exc).splitlines()[0]}") from None
    _refresh_weight_copies(run)
    run.step, run.warmup_step, run.history = state["step"], state["warmup_step"], list(state["history"])
    run.guard.skipped.fill_(state["skipped"])
    run.train_seconds, run.checkpoint_seconds = state["train_seconds"], state["checkpoint_seconds"]
    run.last_checkpoint = checkpoint.path
    if state["world_size"] == engine.world_size:
        ckpt.restore_rng(ckpt.rng_from_flat(tensors, state["rng"], engine.rank), run.device)
    else:
        if engine.is_main:
            import sys

            sys.stderr.write(f"scoredistill: warning: the checkpoint was written by {state['world_size']} process(es), this run has "
                             f"{engine.world_size}: random streams are re-seeded, so the result will not equal an uninterrupted run\n")
        torch.manual_seed(rank_seed(run.config.seed + run.step, engine.rank))


# --------------------------------------------------------------------------- the loop


@contextlib.contextmanager
def _signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM are noted (the loop then saves a checkpoint and stops); a second SIGINT aborts."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum: int, frame: Any) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _due(step: int, every: Optional[int]) -> bool:
    return every is not None and step % every == 0


def _debug_hashes(run: Run) -> dict[str, str]:
    """Hashes of every trained network's full weights as this process sees them, and of its RNG state."""
    out = {}
    for name, net in run.trained.items():
        with run.engine.full_parameters(net.wrapper):
            out[name] = weights_hash(run.engine.inner(net.wrapper).state_dict())
    out["rng"] = weights_hash({"torch": torch.get_rng_state()})
    return out


@torch.no_grad()
def _periodic_samples(run: Run) -> Optional[Tensor]:
    cfg = run.config.train
    with run.engine.full_parameters(run.trained["generator"].wrapper):
        return generate(run, cfg.sample_count, run.config.eval.seed) if run.is_main else None


def train(run: Run, resume: Optional[ckpt.Checkpoint] = None) -> None:
    """Run ``train.steps`` generator steps (after the fake-score warm-up), recording losses; resumable."""
    cfg = run.config.train
    setup(run)
    engine = run.engine
    if resume is not None:
        restore(run, resume)
        if run.is_main and (run.dir / CONFIG_FILE).read_text() != run.config.to_yaml():
            write_text(run.dir / CONFIG_FILE, run.config.to_yaml())  # e.g. a longer train.steps
    elif engine.rank > 0:
        torch.manual_seed(rank_seed(run.config.seed, engine.rank))  # each process draws its own noise
    run.hooks.train_start(run=run)
    _refresh_weight_copies(run)  # a plugin may have set weights
    run.started = time.perf_counter()
    check_every = 1 if not engine.distributed else cfg.log_every  # processes agree on a stop at log steps only

    def stop_requested(counter: int) -> bool:
        return counter % check_every == 0 and engine.any(bool(received))

    def interrupt() -> None:
        path = save_checkpoint(run)
        raise RunInterrupted(received[0] if received else signal.SIGTERM, run.step, path)

    fake = run.trained.get("fake_score")
    with _signals() as received, RunLog(run) as log:
        # 1. fake-score warm-up: fit D_fake to the initial generator before G moves
        if fake is not None and cfg.fake_score_warmup_steps and run.step == 0:
            log.start_warmup(cfg.fake_score_warmup_steps, run.warmup_step)
            while run.warmup_step < cfg.fake_score_warmup_steps:
                fake_score_step(run)
                run.warmup_step += 1
                log.advance()
                if stop_requested(run.warmup_step):
                    interrupt()
        # 2. generator steps
        log.start_training(cfg.steps, run.step)
        while run.step < cfg.steps:
            logs = train_iteration(run)

            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                run.guard.check(run)
                values = engine.mean(torch.stack([v.float().reshape(()) for v in logs.values()])).tolist()
                record = {"step": run.step, "time": run.elapsed(), **dict(zip(logs, values))}
                if cfg.on_nonfinite == "skip":
                    record["skipped"] = float(run.guard.skipped)
                run.history.append(record)
                log.record(record)
                run.hooks.train_step_end(run=run, step=run.step, logs=dict(record))
            log.advance()
            if run.config.runtime.debug_weight_hashes:
                log.weight_hashes(run.step, _debug_hashes(run))
            if _due(run.step, cfg.sample_every):
                samples = _periodic_samples(run)
                if samples is not None:
                    log.picture(run.step, samples)
            if _due(run.step, cfg.checkpoint_every) and run.step < cfg.steps:
                save_checkpoint(run)
            if stop_requested(run.step):
                interrupt()
        run.guard.check(run)
        run.train_seconds, run.started = run.elapsed(), None
        if run.last_checkpoint is None or run.last_checkpoint.name != ckpt.checkpoint_name(run.step, 0, 0):
            save_checkpoint(run)  # the end of the run (also what a longer run resumes from)
    run.hooks.train_end(run=run)


def generate(run: Run, n: int, seed: int, batch_size: int = 4096, steps: Optional[int] = None) -> torch.Tensor:
    """``n`` samples of the run's generator (EMA weights where kept) from a fixed seed, in ``steps`` steps
    (default: the generator's ``sampling_steps``, 1 for a one-step generator).

    A conditional teacher's runs sample with :func:`~scoredistill.roles.seeded_conditions` (the
    same conditions the evaluation gives the teacher's own sampler).
    """
    cond = seeded_conditions(run.models.teacher, n, seed)
    with eager(run.config.runtime.compile):
        return one_step_samples(run.sampling_generator, n, seed, run.device, batch_size, cond, steps)


@contextlib.contextmanager
def eager(compiled: bool = True) -> Iterator[None]:
    """Within: networks compiled by ``runtime.compile`` run eagerly (torch 2.6+; a no-op before).

    The compiled graphs are for the training step's shapes. Samples and evaluation come in other
    batch sizes, and each new shape would cost another compile (minutes on a GPU) for a few calls.
    ``compiled=False`` (nothing was compiled) skips the stance change, which costs about 0.4 ms.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or not compiled:
        yield
        return
    with set_stance("force_eager"):
        yield


@torch.no_grad()
def one_step_samples(generator: nn.Module, n: int, seed: int, device: Optional[torch.device] = None,
                     batch_size: int = 4096, cond: Optional[Tensor] = None, steps: Optional[int] = None) -> torch.Tensor:
    """``G(z, cond)`` for ``n`` noises from ``seed`` (independent of the training RNG), in eval mode; float32 on the CPU.

    ``cond``: ``n`` conditions (``None``: unconditional). ``steps``: a few-step generator's chain length
    (:meth:`~scoredistill.roles.Generator.sample`; its re-noising noise is drawn from the same seed).
    """
    was_training = generator.training
    if was_training:  # (train() walks every submodule: skipped for the EMA copy, which stays in eval mode)
        generator.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        z = torch.randn((min(batch_size, n - start), *generator.latent_shape), generator=gen).to(device or "cpu")
        c = cond[start : start + len(z)].to(z.device) if cond is not None else None
        noise = (lambda shape=z.shape, where=z.device: torch.randn(shape, generator=gen).to(where))
        out.append(generator.sample(z, c, steps, noise).float().cpu())
    if was_training:
        generator.train()
    return out[0] if len(out) == 1 else torch.cat(out)


# --------------------------------------------------------------------------- run folders

CONFIG_FILE, METRICS_FILE, HISTORY_FILE, VERSIONS_FILE = "config.yaml", "metrics.json", "history.json", "versions.json"
GENERATOR_FILE, FAKE_SCORE_FILE = "generator.safetensors", "fake_score.safetensors"
ONLINE_GENERATOR_FILE, EMA_GENERATOR_FILE = "generator_online.safetensors", "generator_ema.safetensors"
METRICS_CSV_FILE = METRICS_CSV


def check_run_dir_free(path: Path) -> None:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"run folder '{path}' already exists and is not empty; choose another --out")


def prepare_run_dir(path: Path) -> Path:
    path = Path(path)
    check_run_dir_free(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class RunResult:
    """What :func:`execute` returns on the main process. Under several processes ``run.trained`` is
    empty: its DDP/FSDP wrappers are freed with the process group."""

    run: Run
    samples: torch.Tensor
    metrics: dict


def execute(config: RunConfig, hooks: Hooks, run_dir: Path, resume: Optional[ckpt.Checkpoint] = None) -> Optional[RunResult]:
    """Build, train, save, evaluate and report one run into ``run_dir`` (or continue one from ``resume``).

    Under several processes every process calls this; only the main one writes files,
    evaluates and returns a :class:`RunResult` (the others return ``None``).
    """
    check_tensorboard(config.runtime.tensorboard)
    if launched_processes() == 1 and resume is None:
        check_run_dir_free(run_dir)  # before accelerate starts: nothing to undo on a mistake
    engine = Engine(config.runtime)
    try:
        result = _execute(config, hooks, Path(run_dir), engine, resume)
        if result is not None and engine.distributed:
            result.run.trained.clear()  # the DDP/FSDP wrappers hold the process group: Engine.close frees them
        return result
    finally:
        engine.close()


def _execute(config: RunConfig, hooks: Hooks, run_dir: Path, engine: Engine, resume: Optional[ckpt.Checkpoint]) -> Optional[RunResult]:
    if resume is None:
        check_run_dir_free(run_dir)  # every process looks before any writes
        engine.barrier()
        if engine.is_main:
            prepare_run_dir(run_dir)
            write_text(run_dir / CONFIG_FILE, config.to_yaml())
            write_json(run_dir / VERSIONS_FILE, environment_versions())
        engine.barrier()
    t0 = time.perf_counter()
    run = build(config, hooks, run_dir, device=engine.device)
    run.engine = engine
    build_seconds = time.perf_counter() - t0
    train(run, resume)
    train_seconds = build_seconds + run.train_seconds

    g = run.trained["generator"]
    online = engine.model_state(g.wrapper)
    fake = engine.model_state(run.trained["fake_score"].wrapper) if "fake_score" in run.trained else None
    with engine.full_parameters(g.wrapper):
        samples = generate(run, config.eval.num_samples, config.eval.seed) if engine.is_main else None
    result = None
    if engine.is_main:
        ema = run.ema.module.state_dict() if run.ema is not None else None
        use_ema = ema is not None and config.train.eval_with_ema
        save_tensors(run_dir / GENERATOR_FILE, ema if use_ema else online)
        if use_ema:
            save_tensors(run_dir / ONLINE_GENERATOR_FILE, online)
        elif ema is not None:
            save_tensors(run_dir / EMA_GENERATOR_FILE, ema)
        if fake is not None:
            save_tensors(run_dir / FAKE_SCORE_FILE, fake)
        write_json(run_dir / HISTORY_FILE, run.history)
        metrics = {"method": config.method, "preset": config.preset, "ablations": list(config.ablations),
                   "train_seconds": round(train_seconds, 3),
                   "trainer": {"processes": engine.world_size, "checkpoint_seconds": round(run.checkpoint_seconds, 3),
                               "skipped_updates": int(run.guard.skipped)},
                   **_evaluate(run, samples)}
        write_json(run_dir / METRICS_FILE, metrics)
        hooks.report(run=run, samples=samples, metrics=metrics)
        result = RunResult(run, samples, metrics)
    return result  # no barrier: the other processes need not wait (and time out) while the main one evaluates


def _evaluate(run: Run, samples: Tensor) -> dict[str, Any]:
    with eager(run.config.runtime.compile):  # the teacher's multi-step sampler and the metrics' networks: no compile for their shapes
        return run.hooks.evaluate(run=run, samples=samples)


# --------------------------------------------------------------------------- resuming and loading


#: ``--set`` keys a resumed run may change: they do not change its numbers (train.steps extends it)
RESUMABLE_OVERRIDES = ("train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                       "train.sample_every", "train.sample_count", "runtime.progress", "runtime.tensorboard",
                       "runtime.debug_weight_hashes")


def resume_config(hooks: Hooks, target: Path, overrides: list[str]) -> tuple[RunConfig, ckpt.Checkpoint, Path]:
    """The config, checkpoint and run folder to continue from ``target`` (a run folder or one of its checkpoints).

    Everything is checked (the checkpoint against its manifest included) before anything is written.
    """
    from omegaconf import OmegaConf

    from scoredistill.config import parse_overrides, validate

    target = Path(target)
    run_dir = target.parent if ckpt.is_checkpoint_path(target) else target
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"'{run_dir}' is not a run folder: it has no {CONFIG_FILE}")
    base = load_run_config(hooks.registry, run_dir / CONFIG_FILE)
    changes = parse_overrides(overrides)
    flat = {k for k in _dotted(changes)}
    for key in sorted(flat):
        if key not in RESUMABLE_OVERRIDES:
            raise UserError(f"--set {key} cannot change on --resume (it would change the run's numbers); "
                            f"allowed: {', '.join(RESUMABLE_OVERRIDES)}; start a new run to change it")
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base.to_dict()), OmegaConf.create(changes)), resolve=True)
    config = validate(hooks.registry, merged)
    checkpoint = ckpt.load(ckpt.locate(target))
    step = checkpoint.state["step"]
    if config.train.steps < step:
        raise UserError(f"train.steps={config.train.steps} is below the checkpoint's step {step}")
    if config.train.steps != base.train.steps and config.train.lr_schedule == "cosine":
        raise UserError("train.steps cannot change on --resume with train.lr_schedule=cosine (its horizon is the original train.steps)")
    if step >= config.train.steps and (run_dir / GENERATOR_FILE).is_file():
        raise UserError(f"run '{run_dir}' is already finished at step {step}; to train longer: --set train.steps=N with N > {step}")
    return config, checkpoint, run_dir


def _dotted(d: dict, prefix: str = "") -> Iterator[str]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _dotted(v, key + ".")
        else:
            yield key


def load_run(run_dir: Path, hooks: Hooks, online: bool = False) -> Run:
    """Rebuild a finished run's generator (and teacher) from its folder (``online``: the non-EMA weights)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"'{run_dir}' is not a run folder: it has no {CONFIG_FILE}")
    if not (run_dir / GENERATOR_FILE).is_file():
        raise UserError(f"run folder '{run_dir}' has no {GENERATOR_FILE} (did the run finish?)")
    config = load_run_config(hooks.registry, run_dir / CONFIG_FILE)
    weights = GENERATOR_FILE
    if online and config.train.ema_decay is not None and config.train.eval_with_ema:
        weights = ONLINE_GENERATOR_FILE
    elif online and config.train.ema_decay is None:
        raise UserError(f"run '{run_dir}' used no EMA (train.ema_decay is null): its only weights are {GENERATOR_FILE}; drop --online")
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"progress": False})})
    run = build(config, hooks, run_dir, with_losses=False)
    try:
        state = load_tensors(run_dir / weights)
        run.models.generator.load_state_dict(state)
    except Exception as exc:  # corrupt or mismatched file
        raise UserError(f"cannot load {run_dir / weights}: {str(exc).splitlines()[0]}") from None
    return run
