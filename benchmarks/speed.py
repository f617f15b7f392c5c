"""Images per second: the one-step generator versus the teacher's multi-step sampler, in one process.

    python benchmarks/speed.py [--run RUN_DIR] [--preset digits] [--batch 500] [--repeats 5] [--threads 1]

Both are timed on the same batch of noise, in the same process, after one warm-up call
each, alternating (generator, teacher, generator, ...), taking the median of
``--repeats`` timed calls of each. The generator is the run's (if
``--run`` is given) or a fresh copy of the teacher's UNet (``unet_generator`` before
training: the same network, so the same cost). The teacher samples with its own sampler
(deterministic Heun, ``sampler_steps`` steps = ``2 * steps - 1`` function evaluations).
Reports both rates, the speed-up, the NFE ratio and speed-up / NFE ratio (the issue asks
for >= 0.9). Writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def _time_alternating(fns, repeats: int) -> list[float]:
    """Median seconds of each of ``fns``, timed in turn (A B A B ...) after one warm-up call each,
    so that a change in the machine's load touches both alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="a finished run folder (default: an untrained copy of the teacher)")
    p.add_argument("--preset", default="digits")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (without --run), e.g. the settings of the teacher in $SCOREDISTILL_DIGITS_TEACHER")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from scoredistill.config import resolve
    from scoredistill.plugins import Hooks
    from scoredistill.roles import BuildContext
    from scoredistill.trainer import load_run

    hooks = Hooks()
    if args.run is not None:
        run = load_run(args.run, hooks)
        teacher, generator = run.models.teacher, run.sampling_generator
    else:
        config = resolve(hooks.registry, "dmd", args.preset, [], ["runtime.progress=false", *args.set])
        ctx = BuildContext(hooks=hooks, extra={"progress": False})
        teacher = hooks.make_teacher(spec=config.teacher, ctx=ctx).eval().requires_grad_(False)
        ctx.teacher = teacher
        generator = hooks.make_generator(spec=config.generator, ctx=ctx)
    generator.eval().requires_grad_(False)
    z = torch.randn((args.batch, *teacher.data_shape), generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        t_gen, t_teacher = _time_alternating([lambda: generator(z), lambda: teacher.sample(z)], args.repeats)
    nfe = teacher.sampler_nfe
    speedup = t_teacher / t_gen
    result = {
        "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
        "generator_images_per_s": round(args.batch / t_gen, 1), "teacher_images_per_s": round(args.batch / t_teacher, 1),
        "teacher_sampler": f"heun-{teacher.sampler_steps}", "teacher_nfe": nfe, "speedup": round(speedup, 2),
        "speedup_over_nfe_ratio": round(speedup / nfe, 3),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
