"""Sampling throughput per step count: a few-step generator at 1, 2 and 4 steps against the teacher at the same NFEs and at its own sampler.

    python benchmarks/fewstep_speed.py --run RUN_DIR [--batch 500] [--repeats 5] [--threads 1] [--out FILE.json]
    python benchmarks/fewstep_speed.py --preset digits [--method cd] [--set key=value ...]   # untrained, same shape

All in one process on one machine, on the same batch of noise (and conditions, for a conditional
teacher): the generator's ``K``-step chain (``K`` network evaluations; its re-noising noise from a
seeded generator) for each ``--steps`` ``K``; the teacher's deterministic Euler sampler on its EDM
grid with ``K`` steps (``K`` evaluations, the same NFE); and the teacher's own sampler (Heun,
``2 * sampler_steps - 1`` evaluations: 35 for EDM's 18 steps). Each is timed after one warm-up call,
all in turn (A B C ... A B C ...), the median of ``--repeats`` calls (CUDA synchronised). The
generator is the run's (``--run``; its EMA weights where kept) or, without a run, an untrained
``fewstep_generator`` of ``--method`` on ``--preset`` (a copy of the teacher's network: the same cost
per step). Prints a markdown table (images/s) and the JSON on stdout; writes ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def euler_sample(teacher, z: torch.Tensor, steps: int, cond=None) -> torch.Tensor:
    """The probability-flow ODE ``dx/ds = (x - D(x, s)) / s`` by ``steps`` Euler steps on the teacher's EDM grid
    (:meth:`~scoredistill.roles.Teacher.sampling_sigmas`, ending at 0): ``steps`` denoiser evaluations."""
    sigmas = teacher.sampling_sigmas(steps).to(z.device)
    x, n = z * sigmas[0].to(z.dtype), z.shape[0]
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (s_next - s) * (x - teacher(x, torch.full((n,), s, device=z.device, dtype=z.dtype), cond)) / s
    return x


def step_rows(values: dict, keys) -> list[str]:
    """Markdown rows ``| name | steps | ... |`` of ``values[name][steps] = [record per seed]``: each key's mean over the
    records (with `` ± `` their sample standard deviation when there are several), ``-`` where no record has it."""
    rows = []
    for name, by_steps in values.items():
        for k, records in by_steps.items():
            cells = []
            for key in keys:
                xs = [r[key] for r in records if key in r]
                sd = f" ± {statistics.stdev(xs):.2g}" if len(xs) > 1 else ""
                cells.append(f"{statistics.mean(xs):.4g}{sd}" if xs else "-")
            rows.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
    return rows


def time_in_turn(fns: dict, repeats: int, sync) -> dict:
    """Median seconds of each function, timed in turn after one warm-up call each (a change in the machine's load
    touches all alike)."""
    for fn in fns.values():
        fn()
        sync()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def build_models(args):
    from scoredistill.config import resolve
    from scoredistill.plugins import Hooks
    from scoredistill.roles import BuildContext
    from scoredistill.trainer import load_run

    hooks = Hooks()
    if args.run is not None:
        run = load_run(args.run, hooks)
        return run.models.teacher, run.sampling_generator, run.device
    config = resolve(hooks.registry, args.method, args.preset, [], ["runtime.progress=false", *args.set])
    ctx = BuildContext(hooks=hooks, extra={"progress": False})
    teacher = hooks.make_teacher(spec=config.teacher, ctx=ctx).eval().requires_grad_(False)
    ctx.teacher = teacher
    generator = hooks.make_generator(spec=config.generator, ctx=ctx)
    return teacher, generator, torch.device(config.runtime.device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="a finished run folder of a few-step generator")
    p.add_argument("--preset", default="digits", help="without --run: the preset whose teacher (and network) to use")
    p.add_argument("--method", default="cd", help="without --run: a method with a few-step generator (cd, lcm, scm, dmd2_4step)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides (without --run)")
    p.add_argument("--steps", default="1,2,4", help="generator step counts (and the teacher's Euler NFEs)")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = [int(k) for k in args.steps.split(",")]

    from scoredistill.roles import seeded_conditions

    teacher, generator, device = build_models(args)
    if not callable(getattr(generator, "denoise", None)):
        sys.stderr.write("fewstep_speed: the run's generator is one-step (G(z)); use benchmarks/speed.py\n")
        return 2
    teacher, generator = teacher.to(device), generator.to(device).eval().requires_grad_(False)
    z = torch.randn((args.batch, *teacher.data_shape), generator=torch.Generator().manual_seed(0)).to(device)
    cond = seeded_conditions(teacher, args.batch, 0)
    cond = cond.to(device) if cond is not None else None
    noise_gen = torch.Generator().manual_seed(1)

    def noise():
        return torch.randn(z.shape, generator=noise_gen).to(device)

    fns = {}
    for k in steps:
        fns[f"generator_{k}_step"] = lambda k=k: generator.sample(z, cond, k, noise)
        fns[f"teacher_euler_{k}_nfe"] = lambda k=k: euler_sample(teacher, z, k, cond)
    fns[f"teacher_heun_{teacher.sampler_nfe}_nfe"] = lambda: teacher.solve(z, teacher.sampling_sigmas(teacher.sampler_steps), cond)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        seconds = time_in_turn(fns, args.repeats, sync)
    rates = {name: round(args.batch / s, 1) for name, s in seconds.items()}
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)")
    result = {"batch": args.batch, "repeats": args.repeats, "images_per_s": rates,
              "run": str(args.run) if args.run else f"untrained {args.method} generator on {args.preset}",
              "machine": f"{machine}, torch {torch.__version__}"}
    heun = f"teacher_heun_{teacher.sampler_nfe}_nfe"
    rows = ["| sampler | NFE | images/s |", "|---|---|---|"]
    for k in steps:
        rows.append(f"| generator, {k} step(s) | {k} | {rates[f'generator_{k}_step']} |")
        rows.append(f"| teacher, Euler {k} step(s) | {k} | {rates[f'teacher_euler_{k}_nfe']} |")
    rows.append(f"| teacher, Heun {teacher.sampler_steps} steps | {teacher.sampler_nfe} | {rates[heun]} |")
    print("\n".join(rows))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
