#!/usr/bin/env python
"""Check that an interrupted and resumed run ends bit for bit where an uninterrupted one does.

    python scripts/check_resume_exact.py [--method dmd] [--steps 400] [--kills 2] [--nproc 1] [--set KEY=VALUE]...

1. runs METHOD on toy2d for STEPS steps, uninterrupted, into OUT/reference;
2. runs the same command into OUT/interrupted and kills it with SIGKILL (no warning,
   no chance to save) at a random moment after its first checkpoint, KILLS times,
   each time continuing with ``scoredistill run --resume``;
3. compares every tensor of the final weights (generator, fake score) of the two runs.

Exit code 0 and ``resume is exact`` when they are bitwise equal; 1 otherwise. With
``--nproc 2`` both runs use ``torchrun --nproc_per_node 2`` (gloo on CPU).
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def command(args: argparse.Namespace, *cli: str) -> list[str]:
    if args.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                "-m", "scoredistill.cli", *cli]
    return [sys.executable, "-m", "scoredistill.cli", *cli]


def settings(args: argparse.Namespace) -> list[str]:
    out = ["--quiet", "--set", f"train.steps={args.steps}", "--set", f"train.checkpoint_every={args.checkpoint_every}"]
    for item in args.set:
        out += ["--set", item]
    return out


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process it started (torchrun's workers live in their own process groups)."""
    import psutil  # comes with accelerate

    root = psutil.Process(pid)
    victims = root.children(recursive=True) + [root]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)


def kill_after_first_checkpoint(cmd: list[str], run_dir: Path, rng: random.Random, done_before: int) -> bool:
    """Start ``cmd``; once a checkpoint newer than step ``done_before`` exists, wait a random moment and SIGKILL it.

    Returns False when the run finished before it could be killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        steps = [int(p.name.split("-")[-1].split(".")[0]) for p in run_dir.glob("checkpoint-step-*.safetensors")]
        if steps and max(steps) > done_before:
            time.sleep(rng.uniform(0.0, 1.0))
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
                return True
        time.sleep(0.02)
    return False


def newest_step(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[-1].split(".")[0]) for p in run_dir.glob("checkpoint-step-*.safetensors")]
    return max(steps, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="dmd")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--out", type=Path, default=None, help="folder for both runs (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="resume-check-"))
    reference, interrupted = out / "reference", out / "interrupted"
    rng = random.Random(args.seed)

    t0 = time.perf_counter()
    run(command(args, "run", args.method, "--out", str(reference), *settings(args)))
    print(f"reference run: {time.perf_counter() - t0:.1f} s")
    first = command(args, "run", args.method, "--out", str(interrupted), *settings(args))
    killed = 0
    if kill_after_first_checkpoint(first, interrupted, rng, 0):
        killed += 1
        print(f"killed (SIGKILL) after step {newest_step(interrupted)}'s checkpoint")
        while killed < args.kills:
            step = newest_step(interrupted)
            if not kill_after_first_checkpoint(command(args, "run", "--resume", str(interrupted), "--quiet"), interrupted, rng, step):
                break
            killed += 1
            print(f"killed again after step {newest_step(interrupted)}'s checkpoint")
        if not (interrupted / "generator.safetensors").is_file():
            run(command(args, "run", "--resume", str(interrupted), "--quiet"))
    if killed == 0:
        print("the run finished before it could be killed: use more --steps")
        return 1
    same = True
    for name in ("generator.safetensors", "fake_score.safetensors"):
        if not (reference / name).is_file():
            continue
        a, b = load_file(str(reference / name)), load_file(str(interrupted / name))
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(f"{name}: {'bitwise equal' if equal else 'DIFFERENT'} ({len(a)} tensors)")
        same &= equal
    print(f"resume is exact ({killed} kill(s)); runs in {out}" if same else f"resume is NOT exact; runs in {out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
