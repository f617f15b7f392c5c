"""DMD iterations on a CIFAR-sized diffusers UNet teacher: images/s, peak memory, share of the card's bf16 peak.

    python benchmarks/gpu_dmd.py                      # on a CUDA machine: the issue-7 table
    python benchmarks/gpu_dmd.py --device cpu --tiny  # a smoke test of the script itself

Everything goes through scoredistill's own code path: a ``diffusers_unet`` teacher saved
to a folder (random weights: the speed does not depend on them), ``unet_generator`` and
``unet_denoiser`` copies of it, the DMD method with its ``regression`` ablation (no ODE
pairs), and :func:`scoredistill.trainer.train_iteration` (a generator step through the
distribution-matching gradient, then one fake-score step, fused AdamW on CUDA). No EMA,
as in the reference loop (benchmarks/README.md).

The architecture is the DDPM CIFAR-10 ``UNet2DModel`` (35.7 M parameters), EDM
preconditioning, 32x32x3. For each setting (precision, ``torch.compile``, batch) the
script warms up, then times ``--iters`` iterations between two device synchronisations.
FLOPs per image are counted, not assumed: :class:`torch.utils.flop_counter.FlopCounterMode`
over one iteration (matrix products, convolutions and attention, forward and backward).
The card's bf16 rate is measured here too (an 8192^3 bf16 matrix product), and the top
CUDA kernels of a bf16 iteration are profiled, so the table says where the time goes. The
``bare`` settings time ``benchmarks/overhead.py``'s hand-written iteration on copies of the
same networks instead (``framework_over_bare``: scoredistill's time over it, same machine).
The script keeps to ``--budget`` seconds: compiled settings run in child processes that are
stopped when it ends. Writes ``--out`` (JSON) and ``--profile-out`` (text).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple, Union

import torch

CIFAR_UNET = dict(  # the DDPM CIFAR-10 UNet2DModel (google/ddpm-cifar10-32)
    block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
TINY_UNET = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))


class Setting(NamedTuple):
    name: str
    precision: str  # runtime.mixed_precision
    tf32: bool
    compile: Union[bool, str]  # False, or a torch.compile mode
    channels_last: bool = False
    batch_mult: int = 1
    bare: bool = False  # overhead.py's hand-written loop on the same networks, instead of scoredistill
    teacher_dtype: str = "fp32"  # teacher.dtype: bf16 spares autocast's cast of the frozen teacher's weights per call
    cast_weights: str = "auto"  # runtime.cast_weights: auto is per_update (weight copies) in the eager mixed-precision rows
    cuda_graph: bool = False  # runtime.cuda_graph: the eager iteration's updates replayed as one CUDA graph


#: the compiled settings last: their warm-up is minutes, and the eager rows are kept if the time runs out. The bare
#: rows time the hand-written loop of ``benchmarks/overhead.py`` (the same networks, batch and arithmetic, written
#: out without the framework) on this machine, so the framework's share of the time is measured on the GPU too
SETTINGS = [
    Setting("fp32", "no", False, False),
    Setting("tf32", "no", True, False),
    Setting("bf16", "bf16", True, False),
    Setting("bare:bf16", "bf16", True, False, bare=True),
    Setting("bf16+per_call_casts", "bf16", True, False, cast_weights="per_call"),  # autocast's cast of every weight per call
    Setting("bf16+cuda_graph", "bf16", True, False, cuda_graph=True),
    Setting("bf16+cuda_graph+channels_last", "bf16", True, False, channels_last=True, cuda_graph=True),
    Setting("bf16+cuda_graph+batch_x4", "bf16", True, False, batch_mult=4, cuda_graph=True),
    Setting("bf16+bf16_teacher", "bf16", True, False, teacher_dtype="bf16"),
    Setting("bf16+channels_last", "bf16", True, False, channels_last=True),
    Setting("bf16+batch_x4", "bf16", True, False, batch_mult=4),
    Setting("bf16+compile", "bf16", True, "default"),
    Setting("bf16+compile+cudagraphs", "bf16", True, "reduce-overhead"),
    Setting("bf16+compile+cudagraphs+batch_x4", "bf16", True, "reduce-overhead", batch_mult=4),
    Setting("bare:bf16+compile", "bf16", True, "default", bare=True),
]


def save_teacher(folder: Path, arch: dict, size: int) -> Path:
    """A random-weight UNet2DModel with an EDM scheduler config, saved as a user would."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, **arch)
    unet.save_pretrained(folder / "unet")
    diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5).save_pretrained(folder / "scheduler")
    return folder


def make_run(teacher: Path, batch: int, device: str, precision: str, tf32: bool, compile_: Union[bool, str], channels_last: bool,
             teacher_dtype: str = "fp32", cast_weights: str = "auto", cuda_graph: bool = False):
    from scoredistill.config import resolve
    from scoredistill.plugins import Hooks
    from scoredistill.trainer import build, setup

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    hooks = Hooks()
    overrides = ["teacher.component=diffusers_unet", f"teacher.path={teacher}", "generator.component=unet_generator",
                 "fake_score.component=unet_denoiser", f"train.batch_size={batch}", "train.ema_decay=null",
                 "train.fake_updates_per_step=1",  # the reference iteration: one fake-score step
                 "train.lr_schedule=constant", f"runtime.device={device}", f"runtime.mixed_precision={precision}",
                 f"runtime.tf32={str(tf32).lower()}", f"runtime.compile={str(bool(compile_)).lower()}",
                 f"runtime.channels_last={str(channels_last).lower()}", "runtime.progress=false", "runtime.num_threads=null",
                 f"teacher.dtype={teacher_dtype}", f"runtime.cast_weights={cast_weights}",
                 f"runtime.cuda_graph={str(cuda_graph).lower()}"]
    if compile_ and compile_ != "default":
        overrides.append(f"runtime.compile_mode={compile_}")
    config = resolve(hooks.registry, "dmd", "digits", ["regression"], overrides)
    run = build(config, hooks, Path(tempfile.mkdtemp(prefix="gpu_dmd_")))
    setup(run)
    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_loop(run, compile_: Union[bool, str]) -> Callable[[], dict]:
    """``benchmarks/overhead.py``'s hand-written iteration on deep copies of ``run``'s networks (``torch.compile``d as
    the trainer would, when asked); ``run``'s own networks are then left alone."""
    here = str(Path(__file__).parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from overhead import Bare

    bare = Bare(run)
    if compile_:
        for net in (bare.t_unet, bare.g_net, bare.f_net):
            net.compile(mode=None if compile_ == "default" else compile_, dynamic=False)
    return bare.iteration


def setting_run(teacher: Path, device: str, s: Setting, batch: int):
    """scoredistill's run for setting ``s``; built for a bare row too, which takes uncompiled copies of its networks."""
    return make_run(teacher, batch, device, s.precision, s.tf32, False if s.bare else s.compile, s.channels_last, s.teacher_dtype,
                    s.cast_weights, s.cuda_graph and not s.bare)


def time_setting(teacher: Path, device: str, s: Setting, batch: int, warmup: int, iters: int) -> dict:
    from scoredistill.trainer import train_iteration

    run = setting_run(teacher, device, s, batch)
    copies = not s.bare and run.engine.weight_copies_dtype is not None
    step = bare_loop(run, s.compile) if s.bare else (lambda: train_iteration(run))
    if s.cuda_graph:  # the eager iterations and the capture in the warm-up, not in the timing
        from scoredistill.cuda_graph import WARMUP_ITERATIONS

        warmup = max(warmup, WARMUP_ITERATIONS + 2)
    t0 = time.perf_counter()
    for _ in range(warmup):
        logs = step()
    _sync(device)
    warm = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        logs = step()
    _sync(device)
    sec = (time.perf_counter() - t0) / iters
    cpu = (time.process_time() - c0) / iters  # the host's CPU time (all threads): near `sec` when launch-bound
    finite = all(bool(torch.isfinite(v).all()) for v in logs.values())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    # a CUDA graph's memory pool is reserved at capture: its tensors do not show in the peak allocated after it
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.startswith("cuda") else float("nan")
    del run, step
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"batch": batch, "seconds_per_iteration": sec, "cpu_seconds_per_iteration": cpu, "iterations_per_s": 1 / sec, "images_per_s": batch / sec,
            "peak_gib": peak, "peak_reserved_gib": reserved, "warmup_seconds": warm, "cuda_graph": s.cuda_graph, "losses_finite": finite,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,  # runtime.cudnn_benchmark, set by the run's engine on CUDA
            "weight_copies": copies}  # runtime.cast_weights as resolved: the trained networks' bf16 weight copies


def count_flops(teacher: Path, device: str, batch: int) -> float:
    """FLOPs of one training iteration per image, counted by torch's FlopCounterMode (fp32, eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    from scoredistill.trainer import train_iteration

    run = make_run(teacher, batch, device, "no", False, False, False)
    train_iteration(run)  # lazy state (optimiser moments) outside the count
    counter = FlopCounterMode(display=False)
    with counter:
        train_iteration(run)
    return counter.get_total_flops() / batch


def matmul_peak(device: str, n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matrix-product rate (TFLOP/s) on random data: the card's practical ceiling."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def profile_kernels(teacher: Path, device: str, batch: int, top: int = 25) -> str:
    """The top CUDA kernels of three bf16 iterations (eager), by total device time; then the host's side: aten ops by
    self CPU time, and Python functions by own time (cProfile)."""
    from torch.profiler import ProfilerActivity, profile

    from scoredistill.trainer import train_iteration

    run = make_run(teacher, batch, device, "bf16", True, False, False)
    for _ in range(3):
        train_iteration(run)
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            train_iteration(run)
        _sync(device)
    ops = prof.key_averages()
    kernels = ops.table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)
    host = ops.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=70)
    return (f"{kernels}\n\nThe host's side: aten ops by self CPU time (three iterations)\n{host}\n\n"
            f"The host's side: Python functions by own time (cProfile, three iterations, no torch profiler)\n"
            f"{_python_profile(lambda: train_iteration(run), device, top)}")


def _python_profile(step: Callable[[], dict], device: str, top: int) -> str:
    """cProfile of three iterations, by own time: where the host's Python goes (diffusers', torch's, ours)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        step()
    _sync(device)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def sync_check(teacher: Path, device: str, batch: int, iters: int = 2) -> dict:
    """Host-device synchronisations in eager bf16 iterations, found by CUDA's own detector
    (``torch.cuda.set_sync_debug_mode``): each is a warning, recorded here by the Python line that made it."""
    import traceback
    import warnings

    from scoredistill.trainer import train_iteration

    run = make_run(teacher, batch, device, "bf16", True, False, False)
    for _ in range(2):  # lazy state first: the optimisers' moments, the first EMA copy
        train_iteration(run)
    _sync(device)
    seen: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if str(message).startswith("Synchronization debug mode is a prototype"):
            return  # set_sync_debug_mode's own notice, not a synchronisation
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
        key = f"{str(message)[:60]} at " + (f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].line}" if frames else filename)
        seen[key] = seen.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(iters):
                train_iteration(run)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    return {"iterations": iters, "synchronisations": sum(seen.values()), "where": seen}


def main() -> None:
    started = time.monotonic()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a tiny UNet at 8x8 (smoke test)")
    p.add_argument("--only", nargs="*", default=None, help="setting names to run, in this order (default: all, in the table order)")
    p.add_argument("--budget", type=float, default=290.0,
                   help="seconds for the whole script (default 290: under 5 minutes); a setting still running at the end "
                        "is stopped and recorded as such, and settings with no time left are skipped")
    p.add_argument("--isolate", choices=("compiled", "all", "none"), default="compiled",
                   help="settings run in a child process, stopped at the budget (default: the compiled ones, whose "
                        "warm-up is minutes); a crash there is recorded with its exit status")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_dmd_throughput.json"))
    p.add_argument("--profile-out", type=Path, default=None)
    p.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)  # one setting, in a child process
    p.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    unknown = sorted(set(args.only or ()) - {s.name for s in SETTINGS})
    if unknown:
        sys.exit(f"gpu_dmd: no setting named {', '.join(unknown)}; the settings: {', '.join(s.name for s in SETTINGS)}")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("gpu_dmd: no CUDA device here; use --device cpu --tiny for a smoke test")
    if args.child:
        return run_child(args)

    def left() -> float:
        return args.budget - (time.monotonic() - started)

    # inductor's cache: empty at the start (the warm-up a new machine sees), then shared by the rows
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu_dmd_inductor_")
    arch, size = (TINY_UNET, 8) if args.tiny else (CIFAR_UNET, 32)
    teacher = save_teacher(Path(tempfile.mkdtemp(prefix="gpu_dmd_teacher_")), arch, size)

    import diffusers

    n_params = sum(p.numel() for p in diffusers.UNet2DModel.from_pretrained(str(teacher / "unet")).parameters())
    card = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    result = {"device": card, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "unet": {**{k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}, "image": [3, size, size],
                       "parameters": n_params},
              "budget_seconds": args.budget, "settings": {}}
    flops = count_flops(teacher, args.device, min(args.batch, 8))
    result["gflop_per_image"] = flops / 1e9
    result["measured_bf16_tflops"] = matmul_peak(args.device) if cuda else None
    print(f"{card}: UNet {n_params / 1e6:.1f} M parameters, {size}x{size}x3; one DMD iteration = "
          f"{flops / 1e9:.1f} GFLOP per image; bf16 matrix peak {result['measured_bf16_tflops'] or float('nan'):.0f} TFLOP/s",
          flush=True)

    profiled = False
    chosen = SETTINGS if args.only is None else [next(s for s in SETTINGS if s.name == name) for name in dict.fromkeys(args.only)]
    for s in chosen:  # --only's order: the rows that matter most first, while device time lasts
        name = s.name
        if s.compile and cuda and not profiled and left() > 60:  # the sync check and profile before the long compile warm-up
            diagnose(teacher, args, result)
            profiled = True
        # a compiled row's warm-up is minutes; a failed graph capture can leave the CUDA context unusable
        isolate = args.isolate == "all" or (args.isolate == "compiled" and (bool(s.compile) or s.cuda_graph))
        if left() < 10:
            r = {"skipped": f"no time left in the budget of {args.budget:.0f} s"}
        elif isolate:
            # an eager row isolated for safety gets two minutes at most: a hang must not cost the compiled rows
            r = run_isolated(s, teacher, args, left() - 5 if s.compile else min(left() - 5, 120))
        else:
            r = run_here(s, teacher, args)
        result["settings"][name] = r
        if "images_per_s" in r:
            if result["measured_bf16_tflops"]:
                r["share_of_bf16_peak"] = r["images_per_s"] * flops / (result["measured_bf16_tflops"] * 1e12)
            _framework_over_bare(result["settings"])
        print(_row_line(name, r), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each setting: partial results survive

    if cuda and not profiled and left() > 30:
        diagnose(teacher, args, result)
    result["wall_seconds"] = time.monotonic() - started
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def run_here(s: Setting, teacher: Path, args: argparse.Namespace) -> dict:
    """One setting in this process; an exception (a compile mode, memory) is recorded, not raised."""
    if s.compile:
        torch._dynamo.reset()  # each compiled setting from a clean cache, its recompilations counted alone
    try:
        r = time_setting(teacher, args.device, s, args.batch * s.batch_mult, args.warmup, args.iters)
    except Exception as exc:  # one setting failing must not lose the others
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    if s.compile:
        r["dynamo"] = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in ("stats", "graph_break", "recompiles")}
    return r


def run_child(args: argparse.Namespace) -> None:
    """``--child NAME``: one setting, its row written to ``--out`` (the parent reads it)."""
    s = next(s for s in SETTINGS if s.name == args.child)
    args.out.write_text(json.dumps(run_here(s, args.teacher, args)) + "\n")


def run_isolated(s: Setting, teacher: Path, args: argparse.Namespace, seconds: float) -> dict:
    """One setting in a child process (its own session), killed with its compile workers after ``seconds``.

    Its output goes to this process's (a crash's Python stack too: ``-X faulthandler``).
    """
    import signal
    import subprocess

    out = Path(tempfile.mkdtemp(prefix="gpu_dmd_child_")) / "row.json"
    cmd = [sys.executable, "-X", "faulthandler", __file__, "--child", s.name, "--teacher", str(teacher), "--out", str(out),
           "--device", args.device, "--batch", str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True)
    rc = None
    try:
        rc = proc.wait(timeout=max(seconds, 1))
    except subprocess.TimeoutExpired:
        pass
    finally:  # at the budget, on an interrupt, and after a normal end: no compile worker outlives its row
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if rc is None:
        # a compile killed midway can leave a truncated kernel in inductor's cache, which a later row would load
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu_dmd_inductor_")
        return {"error": f"stopped at the time budget, after {time.monotonic() - t0:.0f} s (--budget {args.budget:.0f})"}
    if rc != 0 or not out.is_file():
        how = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
        return {"error": f"the child process ended with {how} after {time.monotonic() - t0:.0f} s (its output is above)"}
    return json.loads(out.read_text())


def _row_line(name: str, r: dict) -> str:
    if "images_per_s" not in r:
        return f"  {name:<23} {r.get('error') or r.get('skipped')}"[:400]
    return (f"  {name:<23} batch {r['batch']:>4}: {r['images_per_s']:8.1f} images/s  {r['iterations_per_s']:6.2f} it/s  "
            f"CPU {r['cpu_seconds_per_iteration'] / r['seconds_per_iteration']:4.0%} of wall  peak {r['peak_gib']:5.1f} GiB  "
            f"share of bf16 peak {r.get('share_of_bf16_peak', float('nan')):.1%}  (warm-up {r['warmup_seconds']:.0f} s)"
            + (f"  framework / bare {r['framework_over_bare']:.3f}" if "framework_over_bare" in r else ""))


def _framework_over_bare(rows: dict) -> None:
    """``framework_over_bare`` on each bare row whose scoredistill row is timed too (same machine, either order)."""
    for name, r in rows.items():
        framework = rows.get(name.removeprefix("bare:")) if name.startswith("bare:") else None
        if framework and "seconds_per_iteration" in framework and "seconds_per_iteration" in r:
            r["framework_over_bare"] = framework["seconds_per_iteration"] / r["seconds_per_iteration"]


def diagnose(teacher: Path, args: argparse.Namespace, result: dict) -> None:
    """The sync check (into the JSON) and, unless ``--no-profile``, the kernel profile (printed, ``--profile-out``)."""
    try:
        check = result["sync_check"] = sync_check(teacher, args.device, args.batch)
    except Exception as exc:  # a diagnostic: the timings matter more
        check = result["sync_check"] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "synchronisations": None,
                                        "iterations": 0, "where": {}}
    print(f"  sync check: {check['synchronisations']} host-device synchronisations in {check['iterations']} eager bf16 "
          "iterations" + "".join(f"\n    {n} x {where}" for where, n in check["where"].items()), flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.no_profile:
        return
    try:
        table = profile_kernels(teacher, args.device, args.batch)
    except Exception as exc:
        table = f"profile failed: {type(exc).__name__}: {exc}"
    if args.profile_out:
        args.profile_out.write_text(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
