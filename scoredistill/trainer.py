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
* every update is ``backward -> unscale -> clip -> step``
  (:meth:`~scoredistill.trained.Trained.update`, which owns the weight copies, loss
  scaling and the gradient check); a non-finite loss term or gradient either stops the run (checked at
  log and checkpoint steps, so the loop never waits for the device) or skips the update
  on the device (``train.on_nonfinite``, :mod:`scoredistill.guard`);
* checkpoints (:mod:`scoredistill.resume`) every ``train.checkpoint_every``
  steps and at the end; ``--resume`` continues bit for bit; SIGINT / SIGTERM save
  one and stop;
* logs (:mod:`scoredistill.runlog`): progress bar, ``history.json``, ``metrics.csv``,
  TensorBoard, periodic sample pictures.

The run's state is :class:`~scoredistill.run.Run`, built by :func:`~scoredistill.run.build` and
made ready by :func:`~scoredistill.prepare.setup`; the run folder is :mod:`scoredistill.run_dir`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from scoredistill import checkpoint as ckpt
from scoredistill.engine import rank_seed, seed_all
from scoredistill.errors import RunInterrupted
from scoredistill.ema import EMA  # noqa: F401  (public name)
from scoredistill.guard import NonFiniteGuard, TrainingStopped  # noqa: F401  (public names)
from scoredistill.io import write_text
from scoredistill.prepare import setup
from scoredistill.resume import RESUMABLE_OVERRIDES, restore, resume_config, save_checkpoint  # noqa: F401
from scoredistill.roles import GeneratorBatch, cat_conditions
from scoredistill.run import Run, build  # noqa: F401  (public names)
from scoredistill.run_dir import CONFIG_FILE, FAKE_SCORE_FILE, METRICS_FILE, load_run, prepare_run_dir  # noqa: F401
from scoredistill.runlog import RunLog, weights_hash
from scoredistill.samples import eager, generate, one_step_samples  # noqa: F401  (public names)
from scoredistill.trained import Trained, frozen  # noqa: F401


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
    # D_fake is only read here (a GAN term back-propagates through it to x, not into its weights); FSDP: read outside its wrapper
    freeze = any(term.differentiates_fake_score for term in run.losses.values())
    # (frozen first: FSDP gathers the weights with their requires_grad as it is then)
    with (frozen(models.fake_score) if freeze else contextlib.nullcontext()), run.engine.full_parameters(f.wrapper if f else None):
        with run.engine.autocast():
            total, terms, (x, cond) = g(objective)
        terms = {k: v.detach() for k, v in terms.items()}
        g.update(total, terms, f"generator step {run.step + 1}")
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
        f.update(loss, {"fake_score": loss.detach()}, where)
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


def _update_ema(run: Run) -> None:
    if run.ema is not None:  # FSDP: from the float32 shards, gathered (the EMA is whole on every process)
        run.ema.update_parameters(run.models.generator)


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
        out[name] = weights_hash(run.engine.full_state(net.wrapper))
    out["rng"] = weights_hash({"torch": torch.get_rng_state()})
    return out


@torch.no_grad()
def _periodic_samples(run: Run) -> Optional[Tensor]:
    cfg = run.config.train
    if not (run.is_main or run.engine.fsdp):
        return None
    with run.engine.full_parameters(run.trained["generator"].wrapper):  # FSDP: every process samples, the main one keeps them
        samples = generate(run, cfg.sample_count, run.config.eval.seed)
    return samples if run.is_main else None


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
        seed_all(rank_seed(run.config.seed, engine.rank))  # each process draws its own noise
    run.hooks.train_start(run=run)
    run.refresh_weight_copies()  # a plugin may have set weights
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
