"""A built run made ready to train, on every process: engine, EMA, speed options, wrapped networks, optimisers, guard."""

from __future__ import annotations

import torch

from scoredistill.cuda_graph import IterationGraph
from scoredistill.ema import EMA
from scoredistill.engine import Engine
from scoredistill.errors import UserError
from scoredistill.guard import NonFiniteGuard
from scoredistill.lora import AdapterView, enable_checkpointing
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


def _memory_options(run: Run) -> None:
    """``train.lora``'s limits and ``runtime.gradient_checkpointing`` on the trained networks."""
    rt, models = run.config.runtime, run.models
    if run.config.train.lora is not None:
        if run.engine.fsdp:
            raise UserError("train.lora cannot be used with runtime.distributed=fsdp: the generator's and the fake score's "
                            "adapters live inside the teacher's layers (one shared base), which FSDP would have to shard "
                            "once for three roles; LoRA already keeps one base, so use runtime.distributed=ddp (it "
                            "averages the small adapters' gradients) or drop train.lora")
        why = ("runtime.compile is on" if rt.compile else "runtime.cuda_graph is on" if rt.cuda_graph else
               "runtime.cast_weights is per_update" if rt.cast_weights == "per_update" else None)
        if why is not None:
            raise UserError(f"train.lora cannot be used when {why} (one base shared by the roles); turn it off or drop train.lora")
        for section, net in (("generator", models.generator), ("fake_score", models.fake_score)):
            trained = any(p.requires_grad for p in net.parameters())
            if trained and not any(isinstance(m, AdapterView) for m in net.modules()):
                raise UserError(f"train.lora is set but {section} '{getattr(run.config, section).component}' makes no LoRA "
                                "adapters (unet_generator and unet_denoiser do); drop train.lora or choose those")
    if rt.gradient_checkpointing:
        for what, net in (("generator", models.generator), ("fake score", models.fake_score)):
            if any(p.requires_grad for p in net.parameters()):
                enable_checkpointing(net, what)


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
    _memory_options(run)
    _speed_options(run)
    dtype = engine.weight_copies_dtype  # after the EMA's copy and the speed options: the EMA keeps the plain layers
    if cfg.lora is not None:
        dtype = None  # the roles' adapters share the teacher's layers: its low-precision copies would serve them all
    if dtype is not None:  # the frozen teacher's copies are made once: its weights never change
        run.teacher_copies = WeightCopies(models.teacher, dtype, engine.device.type)
    engine.shard_frozen(models.teacher)  # FSDP: the frozen teacher's shards (runtime.fsdp_shard_teacher)
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
