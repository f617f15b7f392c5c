"""A built run made ready to train, on every process: engine, EMA, speed options, wrapped networks, optimisers, guard."""

from __future__ import annotations

import torch

from scoredistill.cuda_graph import IterationGraph
from scoredistill.ema import EMA
from scoredistill.engine import Engine
from scoredistill.errors import UserError
from scoredistill.guard import NonFiniteGuard
from scoredistill.precision import WeightCopies
from scoredistill.roles import Role
from scoredistill.run import Run
from scoredistill.trained import Trained, lr_schedule, make_optimizer


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
    run.guard = NonFiniteGuard(cfg.on_nonfinite, engine.device, watch_gradients=not engine.scaler.is_enabled())
    for name, (net, lr) in nets.items():
        wrapper = engine.wrap(net)
        opt = make_optimizer(cfg, name, wrapper, net, lr, fused)
        params = [p for p in wrapper.parameters() if p.requires_grad]
        copies = WeightCopies(net, dtype, engine.device.type) if dtype is not None else None
        run.trained[name] = Trained(name, wrapper, opt, lr_schedule(opt, cfg.lr_schedule, cfg.steps), params, copies,
                                    engine, run.guard, cfg.grad_clip)
    run.iteration_graph = IterationGraph() if run.config.runtime.cuda_graph else None  # the engine checked it can be
