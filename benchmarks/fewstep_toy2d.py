"""toy2d: few-step generators (DMD2 with backward simulation, CD, sCM) at 1, 2 and 4 sampling steps, exact metrics.

Each method trains once per seed; its generator is then sampled with 1, 2 and 4 steps (DMD2's
timesteps ``T - 1 - k floor(T / K)`` of the teacher's 1000-step grid) from the evaluation noise, and
the samples are scored with the toy preset's exact mixture metrics. Writes a markdown table (mean ±
sample std over seeds) and a JSON file of every value::

    python benchmarks/fewstep_toy2d.py --out docs/results/toy2d_fewstep --seeds 3

Each method runs with its budget in :data:`METHODS` (``--set`` adds to every run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from scoredistill.config import resolve
from scoredistill.plugins import Hooks, make_plugin_manager
from scoredistill.toy2d.toy_metrics import mixture_metrics
from scoredistill.runner import execute
from scoredistill.samples import generate

from fewstep_speed import step_rows  # this folder's sampling-speed script

#: each method's toy budget (CPU minutes in all): DMD2's iteration costs ~30x CD's (five fake-score updates, each on a
#: backward-simulated batch). sCM: a 10x smaller learning rate than the preset's, the paper's log-normal proposal in
#: units of this data's sigma_data (2.84 against images' 0.5: p_mean -0.8 + log(2.84 / 0.5)), a shorter warm-up.
METHODS = {
    "dmd2_4step": ["train.steps=600"],
    "cd": ["train.steps=1500"],
    "lcm": ["train.steps=1500"],  # an unconditional teacher: CD on its 1,000 timesteps with LCM's skipping step (k = 20)
    "scm": ["train.steps=1500", "train.generator_lr=1.0e-4", "losses.consistency.p_mean=0.94",
            "losses.consistency.warmup_steps=300"],
}
STEPS = (1, 2, 4)
KEYS = ("mode_coverage", "max_mass_error", "within_3std", "energy_distance")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output prefix: OUT.md, OUT.json and OUT-runs/")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--set", action="append", default=[], help="extra --set overrides for every run")
    p.add_argument("--merge", action="store_true", help="keep the other methods' rows of an existing OUT.json (re-run only --methods)")
    args = p.parse_args(argv)
    hooks = Hooks(make_plugin_manager())
    torch.set_num_threads(1)
    runs_dir = args.out.parent / (args.out.name + "-runs")
    values: dict = {}
    if args.merge and args.out.with_suffix(".json").is_file():
        values = json.loads(args.out.with_suffix(".json").read_text())
    for method in args.methods.split(","):
        values[method] = {}
        for seed in range(args.seeds):
            overrides = [f"seed={seed}", "runtime.progress=false", "train.sample_every=null", *METHODS.get(method, []), *args.set]
            config = resolve(hooks.registry, method, "toy2d", [], overrides)
            t0 = time.perf_counter()
            result = execute(config, hooks, runs_dir / f"{method}-seed{seed}")
            seconds = time.perf_counter() - t0
            teacher = result.run.models.teacher
            for k in STEPS:
                samples = generate(result.run, config.eval.num_samples, config.eval.seed, steps=k)
                m = mixture_metrics(teacher.cpu(), samples, seed=config.eval.seed)
                values[method].setdefault(str(k), []).append({**{key: m[key] for key in KEYS}, "train_seconds": seconds})
            print(f"{method} seed {seed}: {seconds:.1f} s", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(values, indent=1) + "\n")
    rows = ["| method | steps | " + " | ".join(KEYS) + " | train_seconds |", "|---|---|" + "---|" * (len(KEYS) + 1)]
    rows += step_rows(values, (*KEYS, "train_seconds"))
    args.out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
