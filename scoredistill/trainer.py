"""The training loop, readable top to bottom (DMD Algorithm 1, generalised).

Per generator step::

    z ~ N(0, I);  x = G(z)
    L_G = sum_k w_k * term_k(batch, models)          # e.g. distribution matching, regression
    update G on L_G
    repeat fake_updates_per_step times:               # TTUR (DMD2) when > 1
        update D_fake on fake_score_loss(sg(x))       # the first time on this step's x

Which terms, which fake score and which fake-score loss are the method's choice
(its components); the loop has no knowledge of any particular method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from scoredistill.config import RunConfig
from scoredistill.errors import UserError
from scoredistill.io import environment_versions, load_tensors, save_tensors, write_json, write_text
from scoredistill.plugins import Hooks
from scoredistill.roles import BuildContext, FakeScoreLoss, GeneratorBatch, GeneratorLoss, Models, PairSource


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

    @property
    def sampling_generator(self) -> torch.nn.Module:
        """The generator used for samples and evaluation: its EMA when ``train.ema_decay`` is set."""
        return self.ema.module if self.ema is not None else self.models.generator

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.runtime.device)

    def trains_fake_score(self) -> bool:
        return self.fake_score_loss is not None and any(p.requires_grad for p in self.models.fake_score.parameters())


def _set_runtime(config: RunConfig) -> None:
    if config.runtime.num_threads:
        torch.set_num_threads(config.runtime.num_threads)
    torch.manual_seed(config.seed)


def build(config: RunConfig, hooks: Hooks, run_dir: Path, with_losses: bool = True) -> Run:
    """Build every role's object through the role hooks (teacher first; it is frozen)."""
    hooks.configure(config=config)
    _set_runtime(config)
    device = torch.device(config.runtime.device)
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


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list, clip: Optional[float]) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


def generator_step(run: Run, opt: torch.optim.Optimizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One update of G on the weighted sum of the method's terms; returns ``sg(x)`` and the terms."""
    cfg, models = run.config.train, run.models
    g = models.generator
    z = torch.randn((cfg.batch_size, *g.latent_shape), device=run.device)
    batch = GeneratorBatch(z=z, x=g(z))
    if run.pairs is not None:
        batch.z_ref, batch.y_ref = run.pairs.sample(cfg.pair_batch_size or cfg.batch_size)
    terms = {name: term(batch, models) for name, term in run.losses.items()}
    total = sum(run.config.losses[name].weight * value for name, value in terms.items())
    _step(opt, total, list(g.parameters()), cfg.grad_clip)
    terms["generator"] = total.detach()
    return batch.x.detach(), {k: v.detach() for k, v in terms.items()}


def fake_score_step(run: Run, opt: torch.optim.Optimizer, x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One update of D_fake on detached generator samples (fresh ones when ``x`` is None)."""
    cfg, models = run.config.train, run.models
    if x is None:
        with torch.no_grad():
            x = models.generator(torch.randn((cfg.batch_size, *models.generator.latent_shape), device=run.device))
    loss = run.fake_score_loss(x, None, models)
    _step(opt, loss, list(models.fake_score.parameters()), cfg.grad_clip)
    return loss.detach()


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[losses]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), transient=False, disable=not enabled,
    )


def _lr_schedule(opt: torch.optim.Optimizer, kind: str, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


def train(run: Run) -> None:
    """Run ``train.steps`` generator steps (after the fake-score warm-up), recording losses."""
    cfg = run.config.train
    models = run.models
    opt_g = torch.optim.Adam(models.generator.parameters(), lr=cfg.generator_lr, betas=cfg.adam_betas)
    optimizers = [opt_g]
    opt_f = None
    if run.trains_fake_score():
        opt_f = torch.optim.Adam(models.fake_score.parameters(), lr=cfg.fake_score_lr, betas=cfg.adam_betas)
        optimizers.append(opt_f)
    schedules = [_lr_schedule(opt, cfg.lr_schedule, cfg.steps) for opt in optimizers]
    if cfg.ema_decay is not None:
        run.ema = torch.optim.swa_utils.AveragedModel(
            models.generator, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay))
    run.hooks.train_start(run=run)
    start = time.perf_counter()
    with _progress(run.config.runtime.progress) as bar:
        if opt_f is not None and cfg.fake_score_warmup_steps:
            task = bar.add_task("fake-score warm-up", total=cfg.fake_score_warmup_steps, losses="")
            for _ in range(cfg.fake_score_warmup_steps):
                fake_score_step(run, opt_f)
                bar.advance(task)
        task = bar.add_task(f"{run.config.method}", total=cfg.steps, losses="")
        for step in range(cfg.steps):
            x, logs = generator_step(run, opt_g)
            if opt_f is not None:
                for k in range(cfg.fake_updates_per_step):
                    logs["fake_score"] = fake_score_step(run, opt_f, x if k == 0 else None)
            for schedule in schedules:
                schedule.step()
            if run.ema is not None:
                run.ema.update_parameters(models.generator)
            run.step = step + 1
            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                record = {"step": run.step, "time": time.perf_counter() - start, **{k: float(v) for k, v in logs.items()}}
                run.history.append(record)
                run.hooks.train_step_end(run=run, step=run.step, logs=dict(record))
                bar.update(task, losses="  ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "time")))
            bar.advance(task)
    run.hooks.train_end(run=run)


@torch.no_grad()
def generate(run: Run, n: int, seed: int, batch_size: int = 4096) -> torch.Tensor:
    """``n`` one-step samples ``G(z)`` from a fixed seed (independent of the training RNG)."""
    g = run.sampling_generator.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        z = torch.randn((min(batch_size, n - start), *g.latent_shape), generator=gen).to(run.device)
        out.append(g(z).float().cpu())
    g.train()
    return torch.cat(out)


# --------------------------------------------------------------------------- run folders

CONFIG_FILE, METRICS_FILE, HISTORY_FILE, VERSIONS_FILE = "config.yaml", "metrics.json", "history.json", "versions.json"
GENERATOR_FILE, FAKE_SCORE_FILE = "generator.safetensors", "fake_score.safetensors"
ONLINE_GENERATOR_FILE = "generator_online.safetensors"


def prepare_run_dir(path: Path) -> Path:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"run folder '{path}' already exists and is not empty; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class RunResult:
    run: Run
    samples: torch.Tensor
    metrics: dict


def execute(config: RunConfig, hooks: Hooks, run_dir: Path) -> RunResult:
    """Build, train, save, evaluate and report one run into ``run_dir``."""
    run_dir = prepare_run_dir(run_dir)
    write_text(run_dir / CONFIG_FILE, config.to_yaml())
    write_json(run_dir / VERSIONS_FILE, environment_versions())
    t0 = time.perf_counter()
    run = build(config, hooks, run_dir)
    train(run)
    train_seconds = time.perf_counter() - t0
    save_tensors(run_dir / GENERATOR_FILE, run.sampling_generator.state_dict())
    if run.ema is not None:
        save_tensors(run_dir / ONLINE_GENERATOR_FILE, run.models.generator.state_dict())
    if run.trains_fake_score():
        save_tensors(run_dir / FAKE_SCORE_FILE, run.models.fake_score.state_dict())
    write_json(run_dir / HISTORY_FILE, run.history)
    samples = generate(run, config.eval.num_samples, config.eval.seed)
    metrics = {"method": config.method, "preset": config.preset, "ablations": list(config.ablations),
               "train_seconds": round(train_seconds, 3), **hooks.evaluate(run=run, samples=samples)}
    write_json(run_dir / METRICS_FILE, metrics)
    hooks.report(run=run, samples=samples, metrics=metrics)
    return RunResult(run, samples, metrics)


def load_run(run_dir: Path, hooks: Hooks) -> Run:
    """Rebuild a finished run's generator (and teacher) from its folder."""
    from scoredistill.config import load_run_config

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"'{run_dir}' is not a run folder: it has no {CONFIG_FILE}")
    if not (run_dir / GENERATOR_FILE).is_file():
        raise UserError(f"run folder '{run_dir}' has no {GENERATOR_FILE} (did the run finish?)")
    config = load_run_config(hooks.registry, run_dir / CONFIG_FILE)
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"progress": False})})
    run = build(config, hooks, run_dir, with_losses=False)
    try:
        state = load_tensors(run_dir / GENERATOR_FILE)
        run.models.generator.load_state_dict(state)
    except Exception as exc:  # corrupt or mismatched file
        raise UserError(f"cannot load {run_dir / GENERATOR_FILE}: {str(exc).splitlines()[0]}") from None
    return run
