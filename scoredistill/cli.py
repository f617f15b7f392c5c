"""The ``scoredistill`` command line.

    scoredistill run METHOD [--preset P] [--ablate NAME]... [--set key=value]... [--out DIR]
    scoredistill run --resume RUN_DIR [--set train.steps=N]...
    scoredistill sample RUN_DIR --num N --out FILE.npy [--seed S] [--online] [--steps K]
    scoredistill export RUN_DIR OUT [--online]
    scoredistill compare SPEC [SPEC ...] [--preset P] [--seeds K] [--ablate NAME]... [--out DIR]
    scoredistill list

A user mistake prints one line (what is wrong, what is allowed) and exits with 2.
A run stopped by a non-finite loss exits with 1; one interrupted by SIGINT / SIGTERM
saves a checkpoint, prints one line and exits with 130 / 143.

Several processes: ``torchrun --nproc_per_node N -m scoredistill.cli run ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from scoredistill.errors import UserError

DEFAULT_PRESET = "digits"  # the embedded image default (issue 3); toy2d is the 2-D analytic one


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help=f"problem setting (default: {DEFAULT_PRESET}); see 'scoredistill list'")
    p.add_argument("--ablate", action="append", default=[], metavar="NAME", help="ablation of the method (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. train.steps=500 or teacher.weights=[0.5,0.5] (repeatable)")


def _plugin_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", dest="plugins", action="append", default=[], metavar="MODULE",
                        help="load a plugin module by name; '-p no:NAME' blocks plugin NAME (repeatable)")


def make_parser(hooks=None) -> argparse.ArgumentParser:
    """The full parser: the core commands plus those plugins add (``scoredistill_add_commands``)."""
    parser = _Parser(prog="scoredistill", description="Distil diffusion models into one-step generators by score distillation.")
    _plugin_option(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="train a one-step generator with a method (or continue a run: --resume RUN_DIR)")
    p.set_defaults(func=cmd_run)
    p.add_argument("method", nargs="?", default=None, help="method name; see 'scoredistill list' (not with --resume)")
    _add_run_options(p)
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/METHOD-PRESET-TIME)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR exactly from its newest checkpoint (or from the checkpoint file given); "
                        "--set may only change train.steps and logging settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("sample", help="draw samples from a trained run's generator")
    p.set_defaults(func=cmd_sample)
    p.add_argument("run_dir", type=Path, help="a finished run folder (from 'scoredistill run')")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--out", type=Path, required=True, help="output .npy file (float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise z (default: 0)")
    p.add_argument("--online", action="store_true", help="use the online weights of a run trained with EMA")
    p.add_argument("--steps", type=int, default=None,
                   help="generator steps per sample (a few-step generator's chain; default: the run's own, 1 for one-step)")

    p = sub.add_parser("export", help="write a run's one-step generator as a diffusers model folder with a README")
    p.set_defaults(func=cmd_export)
    p.add_argument("run_dir", type=Path, help="a finished run folder (from 'scoredistill run')")
    p.add_argument("out", type=Path, help="new folder for the model (must not exist, or be empty)")
    p.add_argument("--online", action="store_true", help="export the online weights of a run trained with EMA")

    p = sub.add_parser("compare", help="run several methods (or ablations) on one preset and tabulate them")
    p.set_defaults(func=cmd_compare)
    p.add_argument("specs", nargs="+", metavar="SPEC", help="METHOD or METHOD:ABLATION[,ABLATION...], e.g. dmd:fake_score,regression")
    _add_run_options(p)
    p.add_argument("--seeds", type=int, default=1, help="seeds per spec (0..K-1)")
    p.add_argument("--out", type=Path, default=None, help="comparison folder (default: runs/compare-PRESET-TIME)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("list", help="list methods, components by role, presets and plugins").set_defaults(func=cmd_list)
    (hooks if hooks is not None else _hooks([])).add_commands(subparsers=sub)
    return parser


def _hooks(plugins: Sequence[str]):
    from scoredistill.plugins import Hooks, make_plugin_manager

    blocked = [p[3:] for p in plugins if p.startswith("no:")]
    modules = [p for p in plugins if not p.startswith("no:")]
    return Hooks(make_plugin_manager(plugins=modules, blocked=blocked))


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def cmd_run(args, hooks) -> int:
    from scoredistill.config import resolve
    from scoredistill.trainer import RunInterrupted, execute, resume_config

    overrides = list(args.overrides) + (["runtime.progress=false"] if args.quiet else [])
    checkpoint = None
    if args.resume is not None:
        if args.method is not None or args.ablate or args.preset is not None:
            raise UserError("give either METHOD (a new run) or --resume RUN_DIR, not both: a resumed run keeps its method, preset and ablations")
        if args.out is not None:
            raise UserError("--out cannot be used with --resume: the run continues in its own folder")
        config, checkpoint, out = resume_config(hooks, args.resume, overrides)
    else:
        if args.method is None:
            raise UserError("the following arguments are required: METHOD (see 'scoredistill list'), or --resume RUN_DIR")
        preset = args.preset or DEFAULT_PRESET
        config = resolve(hooks.registry, args.method, preset, args.ablate, overrides)
        tag = "".join(f"-no-{a}" for a in args.ablate)
        out = args.out or Path("runs") / f"{args.method}{tag}-{preset}-{_timestamp()}"
    try:
        result = execute(config, hooks, out, resume=checkpoint)
    except RunInterrupted as stop:
        if _is_main_process():
            sys.stderr.write(f"scoredistill: interrupted by {stop} at step {stop.step}; checkpoint saved: {stop.checkpoint}; "
                             f"continue with: scoredistill run --resume {out}\n")
        return stop.exit_code
    if result is not None:
        from rich.console import Console

        Console(stderr=True).print(f"[green]done[/green]: {out}  " + _headline(result.metrics))
    return 0


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _headline(metrics: dict) -> str:
    keys = ("mode_coverage", "max_mass_error", "within_3std", "energy_distance",  # toy2d
            "fid", "fid_ratio_to_teacher", "classes_present", "train_seconds")  # images
    return "  ".join(f"{k}={metrics[k]}" for k in keys if k in metrics)


def cmd_sample(args, hooks) -> int:
    import numpy as np

    from scoredistill.io import atomic_write
    from scoredistill.roles import seeded_conditions
    from scoredistill.trainer import generate, load_run

    if args.num < 1:
        raise UserError(f"--num must be a positive integer (got {args.num})")
    if args.out.suffix != ".npy":
        raise UserError(f"--out must be a .npy file (got '{args.out}')")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be a positive integer (got {args.steps})")
    run = load_run(args.run_dir, hooks, online=args.online)
    samples = generate(run, args.num, args.seed, steps=args.steps).numpy().astype("float32")
    atomic_write(args.out, lambda p: np.save(open(p, "wb"), samples))
    print(f"wrote {args.out}: {samples.shape[0]} samples of shape {tuple(samples.shape[1:])}")
    labels = seeded_conditions(run.models.teacher, args.num, args.seed)  # the conditions generate() used, if any
    if labels is not None:
        path = args.out.with_name(args.out.stem + "_labels.npy")
        atomic_write(path, lambda p: np.save(open(p, "wb"), labels.cpu().numpy()))
        what = "class label" if run.models.teacher.num_classes is not None else "condition (prompt index)"
        print(f"wrote {path}: the {what} of each sample (the teacher is conditional)")
    return 0


def cmd_export(args, hooks) -> int:
    from scoredistill.export import export_run

    info = export_run(args.run_dir, args.out, hooks, online=args.online)
    print(f"wrote {args.out}: {info['generator']} ({info['weights']} weights) as a diffusers model; see {args.out / 'README.md'}")
    return 0


def cmd_compare(args, hooks) -> int:
    from scoredistill.compare import compare, parse_spec

    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1 (got {args.seeds})")
    specs = [parse_spec(s, extra_ablations=args.ablate) for s in args.specs]
    overrides = list(args.overrides) + (["runtime.progress=false"] if args.quiet else [])
    preset = args.preset or DEFAULT_PRESET
    out = args.out or Path("runs") / f"compare-{preset}-{_timestamp()}"
    table = compare(hooks, specs, preset, args.seeds, overrides, out)
    print(table)
    return 0


def cmd_list(args, hooks) -> int:
    from rich.console import Console
    from rich.table import Table

    reg = hooks.registry
    console = Console()

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left")
        for i, col in enumerate(columns):
            t.add_column(col, no_wrap=i < len(columns) - 1)
        return t

    t = table("methods", "method", "summary")
    for m in sorted(reg.methods.values(), key=lambda m: m.name):
        t.add_row(m.name, m.summary)
    console.print(t)
    t = table("ablations (--ablate NAME)", "method", "ablation", "what changes")
    for m in sorted(reg.methods.values(), key=lambda m: m.name):
        for name, ab in m.ablations.items():
            t.add_row(m.name, name, ab.summary)
    console.print(t)
    t = table("components by role", "role", "component", "summary")
    for role, entries in reg.components.items():
        for name, info in sorted(entries.items()):
            t.add_row(role, name, info.summary)
    console.print(t)
    t = table("presets (--preset)", "preset", "summary")
    for p in sorted(reg.presets.values(), key=lambda p: p.name):
        t.add_row(p.name, p.summary)
    console.print(t)
    console.print("plugins: " + ", ".join(hooks.plugin_names()))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _Parser(prog="scoredistill", add_help=False)
    _plugin_option(pre)
    try:
        hooks = _hooks(pre.parse_known_args(argv)[0].plugins)
        args = make_parser(hooks).parse_args(argv)
        return args.func(args, hooks)
    except UserError as exc:
        sys.stderr.write(f"scoredistill: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("scoredistill: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
