"""Framework overhead: scoredistill's DMD training iteration and one-step sampling versus a bare PyTorch loop.

    python benchmarks/overhead.py [--presets toy2d digits] [--iters N] [--warmup W] [--threads 1]
                                  [--sample-batch B] [--breakdown N] [--set key=value ...]
                                  [--out benchmarks/results/overhead_cpu.json]

The framework's cost must be the cost of the networks, not of the framework (target:
framework / bare <= 1.05 on CPU, for ``toy2d`` and ``digits``).

For each preset one run is built through the public API (``config.resolve`` -> ``trainer.build``
-> ``trainer.setup``), and a hand-written loop is given deep copies of the same inner networks
(MLP ``nn.Sequential`` stacks and Fourier frequencies, or the diffusers ``UNet2DModel``; the
analytic Gaussian-mixture denoiser written out), the same optimisers' settings (Adam lr, betas, fused or not,
eps; grad clip if set), lr schedule (cosine if set), EMA decay and data (the same ODE pairs):

* ``train``: ``trainer.train_iteration(run)`` (generator step on kl_gradient + regression, the
  fake-score steps, lr schedules, EMA) against the bare iteration doing the same arithmetic:
  ``z``; pairs; ``x, x_ref = G(cat(z, z_ref))`` (one call); ``sigma`` on the teacher's discrete schedule; teacher and fake
  denoiser under ``no_grad``; the DMD gradient with its per-sample normalisation; the surrogate
  loss; L2 regression on ``x_ref``; Adam; ``train.fake_updates_per_step`` times the fake-score
  denoising loss with the teacher's weighting and Adam (the first on ``sg(x)``, later ones on
  fresh samples ``G(z')`` under ``no_grad``); lr schedules; EMA lerp.
  The bare loop runs on the run's device, under autocast when ``runtime.mixed_precision=bf16``
  (``gpu_dmd.py``'s bare rows time it on CUDA).
* ``sample``: the generator role object ``run.sampling_generator(z)`` under ``no_grad`` (what
  ``trainer.generate`` calls) against the bare network forward on the same ``z``.
* ``generate``: ``trainer.generate(run, B, seed, batch_size=B)`` against seeded ``randn`` plus the
  bare forward.

Before timing, both loops do one iteration from the same weights and seed, and the script
checks that they computed the same thing (losses and updated weights, ``check``). Then the two
are alternated in one process (A B A B ..., each pair on the same seed, so the same batch),
after a warm-up; the table shows the median time of each and ``ratio = median(framework) /
median(bare)`` (``ratio_paired``: the median of the per-pair ratios, less sensitive to drifting
load on a shared machine). glibc's malloc is told to keep freed memory (:func:`steady_malloc`;
off with ``--default-malloc``): otherwise page faults land unevenly on the two loops.

``--breakdown N`` adds the microseconds per iteration spent in the trainer's pieces around the
networks (gradient check, autocast, freezing, EMA, ...), timed in place over N more iterations.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_OUT = Path(__file__).parent / "results" / "overhead_cpu.json"
DEFAULTS = {  # preset: (timed pairs of training iterations, warm-up pairs, sampling batch, timed pairs of sampling calls)
    "toy2d": (500, 30, 4096, 500),
    "digits": (30, 3, 500, 30),
}


# --------------------------------------------------------------------------- the bare loop


def _edm(sigma: Tensor, sd: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's c_skip, c_out, c_in, c_noise (Karras et al. 2022, Table 1) for per-sample sigma (N,)."""
    v = sigma**2 + sd**2
    root = v.sqrt()
    return sd**2 / v, sigma * sd / root, 1 / root, sigma.log() / 4


def _col(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(t.shape + (1,) * (ndim - 1))


def _fourier(t: Tensor, freqs: Tensor) -> Tensor:
    arg = 2 * math.pi * (t.reshape(t.shape[0], -1) @ freqs)
    return torch.cat([arg.cos(), arg.sin()], dim=1)


class Bare:
    """What a researcher writes by hand for one DMD iteration on these networks: no framework."""

    def __init__(self, run) -> None:
        from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher
        from scoredistill.images.networks import UNetFakeScore, UNetGenerator
        from scoredistill.images.image_teacher import ImageTeacher
        from scoredistill.toy2d.networks import MLPFakeScore, MLPGenerator
        from scoredistill.precision import without_weight_copies  # the hand-written loop casts as autocast does

        cfg, m = run.config, run.models
        tr = cfg.train
        self.batch, self.pair_batch = tr.batch_size, tr.pair_batch_size or tr.batch_size
        self.device = run.device  # every tensor made where the networks live (the GPU table's bare row runs on CUDA)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.runtime.mixed_precision)
        if dtype is torch.float16:
            raise SystemExit("overhead.py: the bare loop has no fp16 loss scaling; use bf16 or fp32")
        # autocast around the forward passes, as a researcher writes it (weights stay fp32)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
        teacher = m.teacher

        # -- the teacher D_real (frozen)
        self.sigmas = teacher.sigmas.clone()
        self.sd = float(teacher.sigma_data)
        if isinstance(teacher, GaussianMixtureTeacher):
            self.means, self.stds2 = teacher.means.clone(), teacher.stds.clone() ** 2
            self.log_w = teacher.weights.log()
            self.teacher = self._gmm_denoiser
            self.train_sigma = None  # uniform over the timesteps (below)
        elif isinstance(teacher, ImageTeacher) and teacher.kind == "edm" and teacher.denoiser.prediction_type == "epsilon":
            self.t_unet = without_weight_copies(copy.deepcopy(teacher.denoiser.unet)).eval().requires_grad_(False)
            self.teacher = lambda x, s: self._unet_denoiser(self.t_unet, x, s)
            lo, hi, pm, ps = float(self.sigmas[0]), float(self.sigmas[-1]), teacher.p_mean, teacher.p_std
            self.train_sigma = lambda n: (pm + ps * torch.randn((n,), device=self.device)).exp().clamp(lo, hi)
        else:
            raise SystemExit(f"overhead.py: no bare loop for teacher {type(teacher).__name__}")
        # the fake score's noise levels: uniform over the timesteps unless noise_levels is 'teacher'
        if self.train_sigma is None or getattr(run.fake_score_loss, "noise_levels", "timesteps") == "timesteps":
            self.train_sigma = lambda n: self.sigmas[torch.randint(0, len(self.sigmas), (n,), device=self.device)]

        # -- the generator G
        g = m.generator
        if isinstance(g, MLPGenerator):
            self.g_net = without_weight_copies(copy.deepcopy(g.net))
            self.g_feats = g.features.freqs.clone() if g.features is not None else None
            self.G = self._mlp_generator
        elif isinstance(g, UNetGenerator):
            self.g_net = without_weight_copies(copy.deepcopy(g.denoiser.unet))
            self.g_sigma = g.sigma
            self.G = lambda z: self._unet_denoiser(self.g_net, z * self.g_sigma, torch.full((z.shape[0],), self.g_sigma, device=z.device))
        else:
            raise SystemExit(f"overhead.py: no bare loop for generator {type(g).__name__}")
        self.latent_shape = tuple(g.latent_shape)

        # -- the fake score D_fake
        f = m.fake_score
        if isinstance(f, MLPFakeScore):
            d = f.denoiser
            self.f_net = without_weight_copies(copy.deepcopy(d.net))
            self.f_embed = d.embed.freqs.clone()
            self.f_in = d.input_embed.freqs.clone() if d.input_embed is not None else None
            self.fake = self._mlp_denoiser
        elif isinstance(f, UNetFakeScore):
            self.f_net = without_weight_copies(copy.deepcopy(f.denoiser.unet))
            self.fake = lambda x, s: self._unet_denoiser(self.f_net, x, s)
        else:
            raise SystemExit(f"overhead.py: no bare loop for fake score {type(f).__name__}")

        # -- losses, data, optimisers, schedules, EMA: as the config says
        names = {spec.component: (name, spec) for name, spec in cfg.losses.items()}
        fake_loss = cfg.fake_score_loss.component if cfg.fake_score_loss is not None else None
        if set(names) - {"kl_gradient", "l2_regression"} or fake_loss != "fake_score_denoise":
            raise SystemExit("overhead.py: the bare loop is DMD with kl_gradient, l2_regression and fake_score_denoise")
        self.order = [spec.component for spec in cfg.losses.values()]  # the framework's order of terms (RNG draws)
        dm = names["kl_gradient"][1]
        self.w_dm, self.normalize = dm.weight, dm.config.normalize
        T = len(self.sigmas)
        self.t_lo, self.t_hi = int(dm.config.min_timestep_ratio * T), min(int(dm.config.max_timestep_ratio * T), T - 1)
        self.w_reg = names["l2_regression"][1].weight if "l2_regression" in names else None
        self.pz, self.py = (run.pairs.z, run.pairs.y) if self.w_reg is not None else (None, None)
        if tr.optimizer != "adam" or tr.module_lr:
            raise SystemExit("overhead.py: the bare loop has one Adam per network")
        self.fake_updates = tr.fake_updates_per_step
        adam = dict(betas=tr.adam_betas, eps=tr.adam_eps, weight_decay=tr.weight_decay,
                    fused=bool(run.trained["generator"].optimizer.defaults.get("fused")))  # the trainer's kernel choice
        self.g_params = list(self.g_net.parameters())
        self.f_params = list(self.f_net.parameters())
        self.g_opt = torch.optim.Adam(self.g_params, lr=tr.generator_lr, **adam)
        self.f_opt = torch.optim.Adam(self.f_params, lr=tr.fake_score_lr, **adam)
        self.clip = tr.grad_clip
        self.schedules = ([torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(tr.steps, 1)) for o in (self.g_opt, self.f_opt)]
                          if tr.lr_schedule == "cosine" else [])
        self.ema_decay = tr.ema_decay
        self.ema = [p.detach().clone() for p in self.g_params] if tr.ema_decay is not None else None
        self.ema_started = False

    # -- the networks' arithmetic, written out
    def _gmm_denoiser(self, x: Tensor, sigma: Tensor) -> Tensor:
        """E[x | x_s] of the isotropic Gaussian mixture, float64, log-sum-exp responsibilities."""
        x64 = x.double()
        var = self.stds2 + sigma.double()[:, None] ** 2  # (N, K)
        diff = x64[:, None, :] - self.means  # (N, K, d)
        logp = self.log_w - 0.5 * x.shape[1] * torch.log(2 * math.pi * var) - 0.5 * (diff**2).sum(-1) / var
        r = torch.softmax(logp, dim=1)
        cond_means = self.means + (self.stds2 / var)[..., None] * diff
        return (r[..., None] * cond_means).sum(1).to(x.dtype)

    def _unet_denoiser(self, unet: nn.Module, x: Tensor, sigma: Tensor) -> Tensor:
        """EDM-preconditioned UNet2DModel, epsilon form: D = c_skip x + c_out F(c_in x, c_noise)."""
        c_skip, c_out, c_in, c_noise = _edm(sigma, self.sd)
        out = unet(x * _col(c_in, x.ndim), c_noise, return_dict=False)[0]
        return _col(c_skip, x.ndim) * x + _col(c_out, x.ndim) * out

    def _mlp_denoiser(self, x: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out, c_in, c_noise = _edm(sigma, self.sd)
        h = c_in[:, None] * x
        parts = [h, _fourier(c_noise, self.f_embed)] + ([_fourier(h, self.f_in)] if self.f_in is not None else [])
        return c_skip[:, None] * x + c_out[:, None] * self.f_net(torch.cat(parts, dim=1))

    def _mlp_generator(self, z: Tensor) -> Tensor:
        return self.g_net(torch.cat([z, _fourier(z, self.g_feats)], dim=1) if self.g_feats is not None else z)

    # -- one iteration
    def iteration(self) -> dict[str, Tensor]:
        dev = self.device
        with self.autocast():
            z = torch.randn((self.batch, *self.latent_shape), device=dev)
            if self.w_reg is not None:  # G(z) and G(z_ref) in one call
                idx = torch.randint(0, len(self.pz), (self.pair_batch,), device=dev)
                z_ref, y_ref = self.pz[idx], self.py[idx]
                x, x_ref = self.G(torch.cat([z, z_ref])).split([len(z), len(z_ref)])
            else:
                x = self.G(z)
            terms = {}
            for kind in self.order:
                if kind == "kl_gradient":
                    with torch.no_grad():
                        sigma = self.sigmas[torch.randint(self.t_lo, self.t_hi + 1, (len(x),), device=dev)]
                        x_noisy = x + _col(sigma, x.ndim) * torch.randn_like(x)
                        real, fake = self.teacher(x_noisy, sigma), self.fake(x_noisy, sigma)
                        diff = fake - real
                        if self.normalize:
                            diff = diff / _col((x - real).abs().flatten(1).mean(1), x.ndim)
                        grad = torch.nan_to_num(diff)
                    terms["dm"] = self.w_dm * (0.5 * F.mse_loss(x, (x - grad).detach()))
                else:
                    terms["reg"] = self.w_reg * ((x_ref - y_ref) ** 2).flatten(1).mean(1).mean()
            loss = sum(terms.values())
        self.g_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.g_params, self.clip)
        self.g_opt.step()

        x = x.detach()  # fake-score updates: the first on sg(x), later ones on fresh samples
        for k in range(self.fake_updates):
            with self.autocast():
                if k:
                    with torch.no_grad():
                        x = self.G(torch.randn((self.batch, *self.latent_shape), device=dev))
                sigma = self.train_sigma(len(x))
                x_noisy = x + _col(sigma, x.ndim) * torch.randn_like(x)
                weight = (sigma**2 + self.sd**2) / (sigma * self.sd) ** 2  # the teacher's weighting
                f_loss = (weight * ((self.fake(x_noisy, sigma) - x) ** 2).flatten(1).mean(1)).mean()
            self.f_opt.zero_grad(set_to_none=True)
            f_loss.backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.f_params, self.clip)
            self.f_opt.step()

        for s in self.schedules:
            s.step()
        if self.ema is not None:
            with torch.no_grad():
                if self.ema_started:
                    torch._foreach_lerp_(self.ema, self.g_params, 1.0 - self.ema_decay)
                else:
                    torch._foreach_copy_(self.ema, self.g_params)
                    self.ema_started = True
        return {**terms, "generator": loss.detach(), "fake_score": f_loss.detach()}


# --------------------------------------------------------------------------- measuring


def steady_malloc() -> str:
    """glibc: keep freed memory in the process instead of returning it to the system at once.

    Otherwise whether a (multi-megabyte) activation is served from the heap or from fresh pages
    (page faults) depends on the exact sequence of allocations, and lands systematically on one of
    two alternated loops: measured swings of +-5% in the ratio between otherwise identical runs.
    Applies equally to both loops. Returns what was done.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_trim_threshold, 1 << 30) == 1 and libc.mallopt(m_mmap_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc mallopt: M_TRIM_THRESHOLD=M_MMAP_THRESHOLD=1 GiB" if ok else "default (not glibc)"


def build_run(preset: str, overrides: list[str], run_dir: Path):
    import scoredistill.config
    import scoredistill.trainer
    from scoredistill.plugins import Hooks

    hooks = Hooks()
    config = scoredistill.config.resolve(hooks.registry, "dmd", preset, [], ["runtime.progress=false", *overrides])
    run = scoredistill.trainer.build(config, hooks, run_dir)
    scoredistill.trainer.setup(run)
    return run


def check_same(run, bare: Bare, seed: int) -> dict[str, float]:
    """One iteration of each from the same weights and seed: the largest differences in losses and updated weights."""
    import scoredistill.trainer as trainer

    torch.manual_seed(seed)
    logs = trainer.train_iteration(run)
    torch.manual_seed(seed)
    mine = bare.iteration()
    g = run.models.generator
    g_net = g.net if hasattr(g, "net") else g.denoiser.unet
    f = run.models.fake_score
    f_net = f.denoiser.net if hasattr(f.denoiser, "net") else f.denoiser.unet

    def weight_diff(a: nn.Module, b: nn.Module) -> float:
        return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))

    out = {"generator_loss_rel_diff": abs(float(logs["generator"]) - float(mine["generator"])) / abs(float(mine["generator"])),
           "fake_score_loss_rel_diff": abs(float(logs["fake_score"]) - float(mine["fake_score"])) / abs(float(mine["fake_score"])),
           "generator_weights_max_diff": weight_diff(g_net, bare.g_net),
           "fake_score_weights_max_diff": weight_diff(f_net, bare.f_net)}
    if bare.ema is not None:
        out["ema_weights_max_diff"] = max(float((p.detach() - q).abs().max()) for p, q in zip(run.ema.module.parameters(), bare.ema))
    return out


def alternate(a: Callable[[], Any], b: Callable[[], Any], iters: int, warmup: int, seed: int,
              untimed: Optional[Callable[[int], Any]] = None) -> dict[str, float]:
    """A B A B ...: each pair on the same seed; medians in milliseconds after ``warmup`` pairs.

    ``untimed(i)`` runs after pair ``i``, outside the timings.
    """
    ta, tb = [], []
    for i in range(warmup + iters):
        if untimed is not None:
            untimed(i)
        times = []
        for fn in (a, b):
            torch.manual_seed(seed + i)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if i >= warmup:
            ta.append(times[0])
            tb.append(times[1])
    ma, mb = statistics.median(ta), statistics.median(tb)
    return {"framework_ms": 1e3 * ma, "bare_ms": 1e3 * mb, "ratio": ma / mb,
            "ratio_paired": statistics.median(x / y for x, y in zip(ta, tb)),
            "framework_ms_iqr": 1e3 * _iqr(ta), "bare_ms_iqr": 1e3 * _iqr(tb), "iters": iters, "warmup": warmup}


def _iqr(v: list[float]) -> float:
    q = statistics.quantiles(v, n=4)
    return q[2] - q[0]


def breakdown(run, iters: int) -> dict[str, float]:
    """Microseconds per training iteration spent in the trainer's pieces around the networks, measured in place.

    Each piece (where the trainer still has it) is wrapped with a timer for ``iters`` iterations, then unwrapped.
    """
    import contextlib

    import scoredistill.engine as engine_mod
    import scoredistill.trainer as trainer

    acc: dict[str, float] = {}
    clock = time.perf_counter

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                acc[name] = acc.get(name, 0.0) + clock() - t0
        return wrapper

    def timed_cm(name: str, factory: Callable) -> Callable:
        @contextlib.contextmanager
        def wrapper(*a: Any, **k: Any):
            t0 = clock()
            cm = factory(*a, **k)
            cm.__enter__()
            acc[name] = acc.get(name, 0.0) + clock() - t0
            try:
                yield
            finally:
                t0 = clock()
                cm.__exit__(None, None, None)
                acc[name] = acc.get(name, 0.0) + clock() - t0
        return wrapper

    targets = [(engine_mod.Engine, "check_gradients", "engine.check_gradients", timed),
               (engine_mod.Engine, "autocast", "engine.autocast", timed_cm),
               (engine_mod.Engine, "full_parameters", "engine.full_parameters", timed_cm),
               (trainer, "frozen", "trainer.frozen", timed_cm),
               (trainer.NonFiniteGuard, "observe", "guard.observe", timed),
               (trainer, "_update_ema", "trainer._update_ema (EMA)", timed)]
    targets += [(run.engine.scaler, m, f"scaler.{m}", timed) for m in ("scale", "unscale_", "update")]
    targets += [(net.schedule, "step", "lr schedule.step", timed) for net in run.trained.values() if net.schedule is not None]
    saved = []
    for owner, attr, name, wrap in targets:
        if hasattr(owner, attr):
            saved.append((owner, attr, vars(owner).get(attr)))  # None: inherited or a method of an instance's class
            setattr(owner, attr, wrap(name, getattr(owner, attr)))
    try:
        t0 = clock()
        for i in range(iters):
            trainer.train_iteration(run)
            if i % run.config.train.log_every == 0:
                run.guard.check(run)
        total = clock() - t0
    finally:
        for owner, attr, original in reversed(saved):
            if original is None:
                delattr(owner, attr)  # the wrapper was added here: what it hid shows through again
            else:
                setattr(owner, attr, original)
    out = {name: round(1e6 * v / iters, 1) for name, v in sorted(acc.items(), key=lambda kv: -kv[1])}
    return {"train_iteration_us": round(1e6 * total / iters, 1), "pieces_us": out, "iters": iters}


def measure(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    import scoredistill.trainer as trainer

    iters, warmup, sample_batch, s_iters = DEFAULTS.get(preset, (30, 3, 500, 30))
    iters, warmup = args.iters or iters, args.warmup if args.warmup is not None else warmup
    sample_batch, s_iters = args.sample_batch or sample_batch, args.sample_iters or (s_iters if not args.iters else args.iters)
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(preset, [f"runtime.num_threads={args.threads}", *args.set], Path(tmp))
        try:
            bare = Bare(run)
            check = check_same(run, bare, args.seed)
            log_every = run.config.train.log_every

            def log_step(i: int) -> None:  # what trainer.train does at log steps (one host sync): not timed
                if i % log_every == 0:
                    run.guard.check(run)

            train = alternate(lambda: trainer.train_iteration(run), bare.iteration, iters, warmup, args.seed, log_step)

            g_fw, g_bare = run.sampling_generator, bare.G
            z = torch.randn((sample_batch, *bare.latent_shape), generator=torch.Generator().manual_seed(args.seed))

            def fw_sample():
                with torch.no_grad():
                    return g_fw(z)

            def bare_sample():
                with torch.no_grad():
                    return g_bare(z)

            def bare_generate():
                with torch.no_grad():
                    return g_bare(torch.randn((sample_batch, *bare.latent_shape), generator=torch.Generator().manual_seed(args.seed)))

            sample = alternate(fw_sample, bare_sample, s_iters, warmup, args.seed)
            generate = alternate(lambda: trainer.generate(run, sample_batch, args.seed, batch_size=sample_batch), bare_generate,
                                 s_iters, warmup, args.seed)
            pieces = breakdown(run, args.breakdown) if args.breakdown else None
        finally:
            run.engine.close()
    out = {"batch_size": run.config.train.batch_size, "sample_batch": sample_batch, "check": check,
           "train": train, "sample": sample, "generate": generate}
    if pieces is not None:
        out["breakdown"] = pieces
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["toy2d", "digits"])
    p.add_argument("--iters", type=int, default=None, help="timed training iterations of each (default: toy2d 500, digits 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed pairs first (default: toy2d 30, digits 3)")
    p.add_argument("--sample-iters", type=int, default=None, help="timed sampling calls of each (default: toy2d 500, digits 30; "
                   "--iters when that is given)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default: toy2d 4096, digits 500)")
    p.add_argument("--breakdown", type=int, default=0, metavar="N",
                   help="also time the trainer's pieces around the networks in place over N more iterations (microseconds each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every preset")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc trimming on (noisier ratios)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc = "default" if args.default_malloc else steady_malloc()

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    presets = {name: measure(name, args) for name in args.presets}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), {args.threads} torch thread(s)",
        "torch": torch.__version__, "python": platform.python_version(),
        "load_average_before": [round(v, 2) for v in load_before], "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "malloc": malloc, "seconds": round(time.perf_counter() - t0, 1), "target_ratio": 1.05, "presets": presets,
    }
    print(f"{'preset':8} {'what':9} {'framework ms':>13} {'bare ms':>9} {'ratio':>7} {'paired':>7}  iters")
    for name, r in presets.items():
        for what in ("train", "sample", "generate"):
            m = r[what]
            print(f"{name:8} {what:9} {m['framework_ms']:13.3f} {m['bare_ms']:9.3f} {m['ratio']:7.3f} {m['ratio_paired']:7.3f}"
                  f"  {m['iters']}")
        if "breakdown" in r:
            b = r["breakdown"]
            pieces = ", ".join(f"{k} {v:.0f}" for k, v in b["pieces_us"].items())
            print(f"{name:8} breakdown us/iteration of {b['train_iteration_us']:.0f}: {pieces}")
        c = r["check"]
        print(f"{name:8} check     loss rel. diff G {c['generator_loss_rel_diff']:.1e}, fake {c['fake_score_loss_rel_diff']:.1e}; "
              f"weights max diff G {c['generator_weights_max_diff']:.1e}, fake {c['fake_score_weights_max_diff']:.1e}")
    print(f"load average before {result['load_average_before']}, after {result['load_average_after']}; {result['seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
