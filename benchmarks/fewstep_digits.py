"""digits: few-step generators (DMD2 with backward simulation, CD, sCM, LCM) at 1, 2 and 4 steps: FID and images/s.

Each method trains once per seed as ``scoredistill run METHOD --preset digits`` (a finished run folder
is reused, so an interrupted table resumes); its generator is then sampled with 1, 2 and 4 steps
(DMD2's timesteps of the teacher's grid) from the evaluation noise of the FID protocol (1,500
samples, digits-classifier features, the held-out test split). Beside them: the teacher's own
sampler at the same numbers of network evaluations (Euler on the EDM grid: K steps, K NFE) and its
reference Heun sampler (35 NFE). Images per second are measured in this one process, one after the
other, on the same thread count, after a warm-up call::

    python benchmarks/fewstep_digits.py --out docs/results/digits_fewstep [--seeds 1] [--methods cd,scm]

Writes OUT.md (the table), OUT.json (every value) and OUT-runs/ (the run folders).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from scoredistill.images.metrics import evaluate_images
from scoredistill.plugins import Hooks, make_plugin_manager
from scoredistill.roles import seeded_conditions
from scoredistill.run_dir import load_run
from scoredistill.samples import generate

from fewstep_speed import euler_sample, step_rows  # this folder's sampling-speed script

#: each method's budget on top of the digits preset (``--set`` adds to every run): about half the preset's 1,180 DMD
#: steps for CD, sCM and LCM, and for DMD2's chain (five fake-score updates per step, on backward-simulated batches) 300
METHODS = {
    "cd": ["train.steps=600"],
    "scm": ["train.steps=600"],
    "dmd2_4step": ["train.steps=300"],
    "lcm": ["train.steps=600"],  # an unconditional pixel teacher: CD on the teacher's timesteps with LCM's skipping step
}
STEPS = (1, 2, 4)


def train(method: str, seed: int, folder: Path, overrides: list[str]) -> float:
    """``scoredistill run`` into ``folder`` unless it finished before; its training seconds."""
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        cmd = [sys.executable, "-m", "scoredistill.cli", "run", method, "--preset", "digits", "--out", str(folder), "--quiet",
               "--set", f"seed={seed}", *[a for o in [*METHODS.get(method, []), *overrides] for a in ("--set", o)]]
        if folder.is_dir():
            cmd = [sys.executable, "-m", "scoredistill.cli", "run", "--resume", str(folder), "--quiet"]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    return float(json.loads(metrics.read_text()).get("train_seconds", float("nan")))


def timed(fn: Callable[[], torch.Tensor], n: int) -> tuple[torch.Tensor, float]:
    """``fn()`` and its images per second (after one warm-up call)."""
    fn()
    t0 = time.perf_counter()
    x = fn()
    return x, n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output prefix: OUT.md, OUT.json and OUT-runs/")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="extra --set overrides for every run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hooks = Hooks(make_plugin_manager())
    runs_dir = args.out.parent / (args.out.name + "-runs")
    overrides = [f"runtime.num_threads={args.threads}", *args.set]
    values: dict = {}
    teacher = config = None
    for method in args.methods.split(","):
        for seed in range(args.seeds):
            folder = runs_dir / f"{method}-seed{seed}"
            seconds = train(method, seed, folder, overrides)
            run = load_run(folder, hooks)
            teacher, config = run.models.teacher, run.config
            n, eval_seed = config.eval.num_samples, config.eval.seed
            for k in STEPS:
                x, rate = timed(lambda: generate(run, n, eval_seed, steps=k), n)
                m = evaluate_images(teacher, x, seed=eval_seed, inception="off")
                values.setdefault(method, {}).setdefault(k, []).append(
                    {"fid": m["fid"], "class_coverage": m["class_coverage"], "images_per_s": rate, "train_seconds": seconds})
                print(f"{method} seed {seed} steps {k}: FID {m['fid']:.3f}, {rate:.0f} images/s", file=sys.stderr, flush=True)
    gen = torch.Generator().manual_seed(config.eval.seed)
    n = config.eval.num_samples
    z = torch.randn((n, *teacher.data_shape), generator=gen)
    cond = seeded_conditions(teacher, n, config.eval.seed)
    for k in STEPS:
        x, rate = timed(lambda: euler_sample(teacher, z, k, cond), n)
        m = evaluate_images(teacher, x, seed=config.eval.seed, inception="off")
        values.setdefault("teacher (Euler)", {})[k] = [{"fid": m["fid"], "class_coverage": m["class_coverage"], "images_per_s": rate}]
    x, rate = timed(lambda: teacher.sample(z, cond=cond), n)
    m = evaluate_images(teacher, x, seed=config.eval.seed, inception="off")
    values[f"teacher (heun-{teacher.sampler_steps})"] = {teacher.sampler_nfe: [
        {"fid": m["fid"], "class_coverage": m["class_coverage"], "images_per_s": rate}]}
    values["real train split (floor)"] = {"-": [{"fid": m["target"]["fid"]}]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(values, indent=1) + "\n")
    keys = ("fid", "class_coverage", "images_per_s", "train_seconds")
    rows = ["| sampler | steps (NFE) | FID (test) | class coverage | images/s | train s |", "|---|---|---|---|---|---|"]
    rows += step_rows(values, keys)
    args.out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
