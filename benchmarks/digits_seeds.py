"""Run-to-run spread of the digits FID: one setting, several training seeds, several EMA decays per run.

    python benchmarks/digits_seeds.py [--method dmd] [--seeds 0 1 2 3] [--ablate A ...] [--set key=value ...]
                                      [--decays 0.99 0.995 0.998 0.999] [--parallel 2] [--out FILE]
                                      [--eval-at 500 1000 1500]

Each seed trains ``dmd --preset digits`` (or ``--method M``; with ``--ablate`` and ``--set`` applied) through the
public API: ``config.resolve`` -> ``trainer.build`` -> ``trainer.setup`` -> ``train_iteration``
``train.steps`` times. That is the arithmetic and the random stream of ``scoredistill run``
(same seed, same thread count: the same FID to the last digit), without its checkpoints and
logs. Beside the preset's own EMA, the script keeps an EMA per ``--decays`` entry, and at the
end evaluates the online weights and each EMA on the FID protocol (1,500 samples from
``eval.seed``, digits-classifier features, against the held-out test split and the train
split), so that one training answers "which EMA" too.

Writes one JSON line per seed to ``--out`` (default ``benchmarks/results/digits_fid_by_seed.jsonl``;
a seed already there with the same settings is skipped) and prints a table: per weights, the
FID of each seed, the mean and the standard deviation. ``--parallel N`` trains N seeds at once
in child processes, one torch thread each (on 2 cores: 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).parent / "results" / "digits_fid_by_seed.jsonl"
UNDIGESTED_RUNTIME = ("num_threads", "progress", "tensorboard", "debug_weight_hashes")


def _evaluate(run, module, config) -> dict[str, Any]:
    """The FID protocol on ``module`` (a generator): 1,500 samples from ``eval.seed``, digits-classifier features."""
    from scoredistill.images.metrics import evaluate_images
    from scoredistill.roles import seeded_conditions
    from scoredistill.trainer import one_step_samples

    n, seed = config.eval.num_samples, config.eval.seed  # a class-conditional teacher: the labels trainer.generate uses
    samples = one_step_samples(module, n, seed, run.device, cond=seeded_conditions(run.models.teacher, n, seed))
    return evaluate_images(run.models.teacher, samples, seed=config.eval.seed, inception="off")


def train_and_evaluate(seed: int, ablations: list[str], overrides: list[str], decays: list[float],
                       eval_at: tuple[int, ...] = (), method: str = "dmd") -> dict[str, Any]:
    import torch

    from scoredistill import config as config_mod
    from scoredistill import trainer
    from scoredistill.plugins import Hooks

    hooks = Hooks()
    config = config_mod.resolve(hooks.registry, method, "digits", ablations,
                                ["runtime.progress=false", f"seed={seed}", *overrides])
    digest = config_digest(config)
    run = trainer.build(config, hooks, Path(tempfile.mkdtemp(prefix="digits-seed-")))
    trainer.setup(run)
    emas = {d: trainer.EMA(run.models.generator, d) for d in decays}
    t0, during = time.perf_counter(), {}
    for step in range(config.train.steps):
        trainer.train_iteration(run)
        for ema in emas.values():
            ema.update_parameters(run.models.generator)
        if step + 1 in eval_at:  # the online weights' trajectory; the training stream is left as it was
            rng = torch.random.get_rng_state()
            during[step + 1] = round(_evaluate(run, run.models.generator, config)["fid"], 4)
            torch.random.set_rng_state(rng)
        if (step + 1) % 500 == 0:
            print(f"seed {seed}: step {step + 1}, {time.perf_counter() - t0:.0f} s", flush=True)
    result: dict[str, Any] = {"seed": seed, "method": method, "ablations": ablations, "overrides": overrides,
                              "config_digest": digest, "steps": config.train.steps,
                              "threads": torch.get_num_threads(), "train_s": round(time.perf_counter() - t0, 1)}
    weights = {"online": run.models.generator, **{f"ema{d}": e.module for d, e in emas.items()}}
    if during:
        result["online_fid_during"] = during
    for name, module in weights.items():
        m = _evaluate(run, module, config)
        result[name] = {"fid": m["fid"], "fid_train": m["fid_train"], "ratio": m["fid_ratio_to_teacher"],
                        "classes": m["classes_present"], "max_class_share": round(m["max_class_share"], 4)}
        result["teacher"] = {"fid": m["teacher"]["fid"], "fid_train": m["teacher"]["fid_train"]}
    return result


def _key(r: dict[str, Any]) -> tuple:
    """Seed and setting: the digest of the resolved config (the preset as it was then, with the
    run's ablations and overrides). Lines written before the digest was recorded match nothing."""
    return r["seed"], r.get("config_digest")


def config_digest(config) -> str:
    """A digest of a resolved config (the method, every component's settings, train, eval and
    runtime) without the seed and the runtime settings that change no arithmetic (the thread
    count changes only rounding; it is recorded as ``threads``)."""
    from scoredistill.roles import stable_hash

    settings = {k: v for k, v in config.to_dict().items() if k != "seed"}
    settings["runtime"] = {k: v for k, v in settings["runtime"].items() if k not in UNDIGESTED_RUNTIME}
    return stable_hash(json.dumps(settings, sort_keys=True))


def _resolved(method: str, ablations: list[str], overrides: list[str]):
    from scoredistill import config as config_mod
    from scoredistill.plugins import Hooks

    return config_mod.resolve(Hooks().registry, method, "digits", ablations, overrides)


def table(results: list[dict[str, Any]]) -> str:
    names = [k for k in results[0] if isinstance(results[0][k], dict) and "ratio" in results[0][k]]
    head = "| weights | " + " | ".join(f"seed {r['seed']}" for r in results) + " | mean | sd | mean / teacher |"
    rows = [head, "|" + "---|" * (len(results) + 4)]
    teacher = results[0]["teacher"]["fid"]
    for name in names:
        fids = [r[name]["fid"] for r in results]
        sd = statistics.stdev(fids) if len(fids) > 1 else float("nan")
        mean = statistics.fmean(fids)
        rows.append(f"| {name} | " + " | ".join(f"{f:.3f}" for f in fids) + f" | {mean:.3f} | {sd:.3f} | {mean / teacher:.2f} |")
    return "\n".join(rows) + f"\n\nFID against the held-out test split; teacher (Heun, 35 NFE): {teacher:.3f}."


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="dmd", help="the method trained on the digits preset (default: dmd)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--ablate", action="append", default=[], metavar="ABLATION")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--decays", type=float, nargs="*", default=[0.99, 0.995, 0.998, 0.999])
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--eval-at", type=int, nargs="*", default=[], metavar="STEP",
                   help="also evaluate the online weights at these steps (FID trajectory)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.is_file() else []
    digest = config_digest(_resolved(args.method, args.ablate, args.overrides))
    wanted = {(s, digest) for s in args.seeds}
    todo = [s for s in args.seeds if (s, digest) not in {_key(r) for r in done}]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.parallel > 1 and len(todo) > 1:  # children, one thread each; each appends its own line
        base = [sys.executable, __file__, "--method", args.method, "--out", str(args.out), "--decays", *map(str, args.decays),
                "--eval-at", *map(str, args.eval_at)]
        base += [a for x in args.ablate for a in ("--ablate", x)]
        base += [a for x in ["runtime.num_threads=1", *args.overrides] for a in ("--set", x)]
        for i in range(0, len(todo), args.parallel):
            procs = [subprocess.Popen(base + ["--seeds", str(s)]) for s in todo[i : i + args.parallel]]
            if any(proc.wait() for proc in procs):
                raise SystemExit("a seed failed (see its output above)")
    else:
        for seed in todo:
            result = train_and_evaluate(seed, args.ablate, args.overrides, args.decays, tuple(args.eval_at), args.method)
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")
    results = [json.loads(line) for line in args.out.read_text().splitlines()]
    mine = sorted((r for r in results if _key(r) in wanted), key=lambda r: r["seed"])
    print(table(mine))
    return mine


if __name__ == "__main__":
    main()
