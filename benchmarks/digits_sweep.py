"""Settings tried for the ``digits`` preset: run variants of DMD side by side, rank them by FID against the train split.

    python benchmarks/digits_sweep.py --out runs/digits-sweep [--parallel 2] [--only base pairs20k ...] [--set key=value ...]

Each variant is ``scoredistill run dmd --preset digits`` with a few ``--set`` overrides
(listed in ``VARIANTS``; the ablations of the base settings are variants too). The runs
are independent processes, ``--parallel`` at a time (on a GPU machine, add
``--set runtime.device=cuda`` and run many at once). A finished run folder is reused.

The ranking uses FID against the **train** split, so that the held-out test split, the
reference of the reported protocol, is not what the settings were chosen on. Writes
``OUT/sweep.json`` and ``OUT/sweep.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "base": [],
    "pairs20k": ["pairs.num_pairs=20000"],
    "steps3000": ["train.steps=3000"],
    "gen_lr2e-4": ["train.generator_lr=2.0e-4"],
    "fake_lr1.2e-3": ["train.fake_score_lr=1.2e-3"],
    "fake_x2": ["train.fake_updates_per_step=2", "train.steps=1250"],
    "fake_warmup200": ["train.fake_score_warmup_steps=200"],
    "ema0.995": ["train.ema_decay=0.995"],
    "batch128": ["train.batch_size=128", "train.steps=900"],
    "reg0.5": ["losses.regression.weight=0.5"],
    "reg2": ["losses.regression.weight=2.0"],
    "constant_lr": ["train.lr_schedule=constant"],
    "no_regression": ["@regression"],
    "no_distribution_matching": ["@distribution_matching"],
    "no_fake_score": ["@fake_score"],
}


def command(name: str, overrides: list[str], folder: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "scoredistill.cli", "run", "dmd", "--preset", "digits", "--out", str(folder), "--quiet"]
    for o in overrides + extra:
        cmd += ["--ablate", o[1:]] if o.startswith("@") else ["--set", o]
    return cmd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/digits-sweep"))
    p.add_argument("--only", nargs="+", default=None, choices=sorted(VARIANTS), metavar="VARIANT")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--timeout", type=float, default=None, help="seconds; unfinished runs are stopped and left out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="applied to every variant")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(VARIANTS)
    todo = [n for n in names if not (args.out / n / "metrics.json").is_file()]
    running: dict[str, subprocess.Popen] = {}
    t0 = time.perf_counter()
    while todo or running:
        while todo and len(running) < args.parallel:
            name = todo.pop(0)
            log = open(args.out / f"{name}.log", "w")
            extra = (["runtime.num_threads=1"] if args.parallel > 1 else []) + args.overrides  # no OpenMP contention
            running[name] = subprocess.Popen(command(name, VARIANTS[name], args.out / name, extra), stdout=log, stderr=log)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                print(f"{name}: exit {proc.returncode} after {time.perf_counter() - t0:.0f} s", flush=True)
                del running[name]
        if args.timeout and time.perf_counter() - t0 > args.timeout:
            for name, proc in running.items():
                proc.kill()
                print(f"{name}: stopped at the timeout", flush=True)
            break
        time.sleep(1)

    rows = []
    for name in names:
        f = args.out / name / "metrics.json"
        if f.is_file():
            m = json.loads(f.read_text())
            rows.append({"variant": name, "overrides": VARIANTS[name], "fid_train": m.get("fid_train"), "fid": m.get("fid"),
                         "fid_ratio_to_teacher": m.get("fid_ratio_to_teacher"), "classes_present": m.get("classes_present"),
                         "train_seconds": m.get("train_seconds"), "teacher_fid": (m.get("teacher") or {}).get("fid")})
    rows.sort(key=lambda r: r["fid_train"] if isinstance(r["fid_train"], (int, float)) else float("inf"))
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| variant | overrides | FID (train) | FID (test) | / teacher | classes | train s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {' '.join(r['overrides']) or '-'} | {r['fid_train']} | {r['fid']} | {r['fid_ratio_to_teacher']} "
              f"| {r['classes_present']} | {r['train_seconds']} |" for r in rows]
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
