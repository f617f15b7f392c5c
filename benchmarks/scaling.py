"""Scaling: DMD iteration time and peak memory against batch size and image size, for a diffusers UNet teacher.

    python benchmarks/scaling.py [--sizes 8 16 32 64] [--batches 8 32] [--big-batches 128 --big-max-size 16]
                                 [--iters 3] [--threads 1] [--device cpu] [--channels 32 64 64] [--out FILE]

For each image size a ``UNet2DModel`` with random weights (a small CIFAR-like architecture:
``--channels``, ``--layers-per-block``, self-attention at ``--attention-levels``, ``--in-channels``)
is saved in a temporary folder in diffusers format, exactly as a user would:
``unet.save_pretrained(FOLDER/unet)`` and an ``EDMEulerScheduler`` config in ``FOLDER/scheduler``.
Each (size, batch) point then runs in a fresh subprocess, through the public API::

    config = scoredistill.config.resolve(hooks.registry, "dmd", PRESET, ["regression"],
                                         ["teacher.component=diffusers_unet", "teacher.path=FOLDER", ...])
    run = scoredistill.trainer.build(config, hooks, run_dir); scoredistill.trainer.setup(run)
    scoredistill.trainer.train_iteration(run)   # generator step + fake-score step (+ EMA of the preset)

DMD without its regression term (the ``regression`` ablation: no ODE pairs are needed), so
an iteration is: G forward, teacher and fake-score forwards, G backward, then a fake-score
forward and backward. ``--warmup`` iterations (default 1) are discarded, the median of
``--iters`` is reported. Peak memory: on CPU the process's peak resident set
(``ru_maxrss``), and the same after imports, model build and set-up (the baseline), and the
difference; on CUDA ``torch.cuda.max_memory_allocated`` over the iterations, warm-up included
(and the memory allocated before them). Prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_TAG = "SCALING_RESULT "
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scaling_time_memory.json"


# --------------------------------------------------------------------------- the teacher


def architecture(args: argparse.Namespace) -> dict:
    """The ``UNet2DModel`` keyword arguments (without ``sample_size``) from the CLI options."""
    n = len(args.channels)
    levels = sorted({(lvl + n) % n for lvl in args.attention_levels})
    down = ["AttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n)]
    up = [d.replace("Down", "Up") for d in reversed(down)]
    return dict(in_channels=args.in_channels, out_channels=args.in_channels, block_out_channels=list(args.channels),
                layers_per_block=args.layers_per_block, down_block_types=down, up_block_types=up,
                norm_num_groups=args.norm_groups, attention_head_dim=args.attention_head_dim)


def make_teacher_folder(folder: Path, size: int, arch: dict, seed: int = 0) -> Path:
    """A random-weight EDM teacher in diffusers format: ``FOLDER/unet`` and ``FOLDER/scheduler``."""
    import torch
    from diffusers import EDMEulerScheduler, UNet2DModel

    torch.manual_seed(seed)
    kw = dict(arch, block_out_channels=tuple(arch["block_out_channels"]), down_block_types=tuple(arch["down_block_types"]),
              up_block_types=tuple(arch["up_block_types"]))
    unet = UNet2DModel(sample_size=size, **kw)
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, num_train_timesteps=1000,
                      prediction_type="epsilon").save_pretrained(str(folder / "scheduler"))
    return folder


# --------------------------------------------------------------------------- one point (in its own process)


def _rss_mib() -> float:
    """Peak resident set of this process so far, MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def measure_point(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import scoredistill.config
    import scoredistill.trainer
    from scoredistill.plugins import Hooks

    hooks = Hooks()
    overrides = [
        "teacher.component=diffusers_unet", f"teacher.path={args.teacher}",
        "generator.component=unet_generator", "fake_score.component=unet_denoiser",
        f"train.batch_size={args.batch}", f"runtime.num_threads={args.threads}", f"runtime.device={args.device}",
        "runtime.progress=false", "runtime.tensorboard=false", *args.overrides,
    ]
    config = scoredistill.config.resolve(hooks.registry, "dmd", args.preset, ["regression"], overrides)
    cuda = torch.device(args.device).type == "cuda"
    with tempfile.TemporaryDirectory(prefix="scaling-run-") as run_dir:
        run = scoredistill.trainer.build(config, hooks, Path(run_dir))
        scoredistill.trainer.setup(run)
        params = sum(p.numel() for p in run.models.teacher.parameters())
        trained = sum(p.numel() for net in run.trained.values() for p in net.params)
        baseline = _rss_mib()
        if cuda:
            torch.cuda.synchronize()
            cuda_baseline = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        times, logs = [], {}
        for i in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            logs = scoredistill.trainer.train_iteration(run)
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        peak = _rss_mib()
        run.engine.close()
    sec = statistics.median(times)
    out = {
        "size": args.size, "batch": args.batch, "seconds_per_iteration": sec, "seconds_min": min(times),
        "iteration_seconds": times, "images_per_s": args.batch / sec,
        "peak_rss_mib": peak, "baseline_rss_mib": baseline, "delta_rss_mib": peak - baseline,
        "params": params, "params_trained": trained,
        "losses": {k: float(v) for k, v in logs.items()},
    }
    if cuda:
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_baseline_mib"] = cuda_baseline
        out["cuda_device"] = torch.cuda.get_device_name()
    return out


# --------------------------------------------------------------------------- the sweep


def points(args: argparse.Namespace) -> list[tuple[int, int]]:
    out = []
    for size in args.sizes:
        batches = list(args.batches) + [b for b in args.big_batches if size <= args.big_max_size]
        out += [(size, b) for b in dict.fromkeys(batches)]
    return out


def run_point(args: argparse.Namespace, size: int, batch: int, teacher: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--size", str(size), "--batch", str(batch),
           "--teacher", str(teacher), "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--device", args.device, "--preset", args.preset]
    for o in args.overrides:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"point size={size} batch={batch} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads(lines[-1][len(RESULT_TAG):])


def table(rows: list[dict], cuda: bool) -> str:
    mem = "CUDA peak MiB | CUDA before MiB" if cuda else "peak RSS MiB | delta MiB"
    head = f"| size | batch | s/iter | images/s | {mem} | params |"
    lines = [head, "|---:" * (head.count("|") - 1) + "|"]
    for r in rows:
        m = (f"{r['cuda_peak_mib']:.0f} | {r['cuda_baseline_mib']:.0f}" if cuda
             else f"{r['peak_rss_mib']:.0f} | {r['delta_rss_mib']:.0f}")
        lines.append(f"| {r['size']} | {r['batch']} | {r['seconds_per_iteration']:.3f} | {r['images_per_s']:.1f} | {m} | "
                     f"{r['params'] / 1e6:.2f} M |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64], help="image sizes in pixels (square)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="batch sizes measured at every image size")
    p.add_argument("--big-batches", type=int, nargs="*", default=[128], help="extra batch sizes, only at sizes <= --big-max-size")
    p.add_argument("--big-max-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=3, help="timed iterations per point (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) of each point's process")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--preset", default="digits", help="base preset (its training settings; teacher and networks are replaced)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64], help="UNet block_out_channels")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--attention-levels", type=int, nargs="*", default=[-1],
                   help="levels (0 = full resolution, -1 = lowest) with self-attention; none: no attention")
    p.add_argument("--norm-groups", type=int, default=8, help="GroupNorm groups")
    p.add_argument("--attention-head-dim", type=int, default=8)
    p.add_argument("--in-channels", type=int, default=3, help="image channels")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed for one point's process")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    # one point, in its own process (used by the sweep)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        print(RESULT_TAG + json.dumps(measure_point(args)), flush=True)
        return

    import torch

    down = 2 ** (len(args.channels) - 1)
    bad = [s for s in args.sizes if s % down]
    if bad:
        p.error(f"image sizes {bad} are not divisible by {down} (the UNet halves the resolution {len(args.channels) - 1} times)")
    n = len(args.channels)
    if any(not -n <= lvl < n for lvl in args.attention_levels):
        p.error(f"--attention-levels must lie in [{-n}, {n - 1}] for {n} UNet levels")
    arch = architecture(args)
    cuda = args.device.startswith("cuda")
    print("teacher: diffusers UNet2DModel, random weights, EDM scheduler config; " + json.dumps(arch), flush=True)
    print(f"method: dmd --ablate regression, preset {args.preset}; {args.threads} thread(s); device {args.device}; "
          f"warm-up {args.warmup}, median of {args.iters}", flush=True)
    load_before = os.getloadavg()
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scaling-teachers-") as tmp:
        folders = {s: make_teacher_folder(Path(tmp) / f"unet{s}", s, arch) for s in args.sizes}
        for size, batch in points(args):
            r = run_point(args, size, batch, folders[size])
            rows.append(r)
            mem = (f"CUDA peak {r['cuda_peak_mib']:.0f} MiB" if cuda
                   else f"peak RSS {r['peak_rss_mib']:.0f} MiB (+{r['delta_rss_mib']:.0f})")
            print(f"  {size:>3} px, batch {batch:>4}: {r['seconds_per_iteration']:.3f} s/iter, "
                  f"{r['images_per_s']:.1f} images/s, {mem}", flush=True)
    result = {
        "what": "DMD iteration (dmd --ablate regression: generator step + fake-score step) vs batch and image size",
        "teacher": {"class": "UNet2DModel", "weights": "random", "scheduler": "EDMEulerScheduler", **arch},
        "preset": args.preset, "overrides": args.overrides, "device": args.device, "threads": args.threads,
        "warmup": args.warmup, "iters": args.iters,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "points": rows,
    }
    print()
    print(table(rows, cuda))
    print(f"\nload average (1/5/15 min) before {result['load_average_before']}, after {result['load_average_after']}; "
          f"{result['wall_seconds']} s wall")
    for r in rows:
        assert all(math.isfinite(v) for v in r["losses"].values()), f"non-finite loss at {r['size']} px, batch {r['batch']}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
