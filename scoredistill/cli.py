"""The ``scoredistill`` command line.

    scoredistill run METHOD [--preset P] [--ablate NAME]... [--set key=value]... [--out DIR]
    scoredistill run --resume RUN_DIR [--set train.steps=N]...
    scoredistill sample RUN_DIR --num N --out FILE.npy [--seed S] [--online] [--steps K] [--guidance-scale G]
    scoredistill export RUN_DIR OUT [--online]
    scoredistill compare SPEC [SPEC ...] [--preset P] [--seeds K] [--ablate NAME]... [--out DIR]
    scoredistill list

Results go to stdout; progress, warnings and errors to stderr (plain lines when stderr is
not a terminal). A user mistake prints one line (what is wrong, what is allowed) and exits with 2.
A run stopped by a non-finite loss, or that skipped more than ``train.max_skipped_fraction``
of its updates, exits with 1; one interrupted by SIGINT / SIGTERM (in training: after saving
a checkpoint) prints one line saying how to continue and exits with 130 / 143. Two processes
never work on one run folder at once: the second is refused in one line.

Several processes: ``torchrun --nproc_per_node N -m scoredistill.cli run ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from scoredistill.errors import RunInterrupted, UserError

DEFAULT_PRESET = "digits"  # the embedded image default; toy2d is the 2-D analytic one
TEACHER_PRESET = "teacher"  # the settings --teacher FOLDER starts from (a generic diffusers teacher)
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
MAX_SAMPLES = 10**8


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help=f"problem setting (default: {DEFAULT_PRESET}); see 'scoredistill list'")
    p.add_argument("--ablate", action="append", default=[], metavar="NAME", help="ablation of the method (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. train.steps=500 or teacher.weights=[0.5,0.5] (repeatable)")
    p.add_argument("--teacher", default=None, metavar="FOLDER_OR_HUB_ID",
                   help=f"distil this diffusers model or pipeline (the adapter is picked from the folder); preset "
                        f"default '{TEACHER_PRESET}'; --set still overrides anything")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts for a text-to-image --teacher pipeline: .txt (one a line), .jsonl / .csv / .parquet "
                        "('prompt' field or column); embedded once by the pipeline's text encoders and cached")
    p.add_argument("--data", default=None, metavar="FOLDER",
                   help="real images for the --teacher (teacher.data): a folder of images, with captions (metadata.jsonl / "
                        ".csv with file_name and text, or NAME.txt beside each image) for a text-to-image pipeline; "
                        "the FID reference and dmd2's real data")


def _teacher_option(args) -> tuple[Optional[str], list[str]]:
    """``(preset, overrides)`` with ``--teacher``: the generic teacher preset unless one is named, and the teacher
    component with its path ahead of the user's ``--set`` (which still override them)."""
    prompts = [] if getattr(args, "prompts", None) is None else [f"teacher.prompts={args.prompts}"]
    prompts += [] if getattr(args, "data", None) is None else [f"teacher.data={args.data}"]
    if args.teacher is None:
        if prompts and not any(o.replace(" ", "").startswith("teacher.component=diffusers") for o in args.overrides):
            flag = "--prompts" if getattr(args, "prompts", None) is not None else "--data"
            raise UserError(f"{flag} needs a diffusers teacher (a text-to-image pipeline for --prompts): add --teacher PIPELINE_FOLDER")
        return args.preset, prompts + list(args.overrides)
    if not args.teacher.strip():
        raise UserError("--teacher needs a diffusers model or pipeline folder, or a Hugging Face hub id")
    return args.preset or TEACHER_PRESET, [f"teacher.component=diffusers", f"teacher.path={args.teacher}", *prompts, *args.overrides]


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
                   help="continue RUN_DIR exactly from its newest checkpoint (or from the checkpoint file given), or finish "
                        "it: one stopped before its first checkpoint starts again, one stopped after training redoes its "
                        "evaluation and report; --set may only change train.steps and logging settings")
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
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="the guidance scale g of a generator conditioned on it (LCM's guidance embedding; default: its own)")

    p = sub.add_parser("export", help="write a run's one-step generator as a diffusers model folder (a whole "
                       "pipeline for a text-to-image teacher) with a README; a few-step generator of an image teacher as "
                       "its network, the teacher's scheduler config and its chain")
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


def check_out(path: Path, option: str = "--out", folder: bool = True) -> None:
    """``path`` can be created: it is not an existing file (or folder, for a file), nothing above it is a file,
    and the nearest existing folder above it is writable. Looks only: nothing is created."""
    path = Path(path)
    if path.exists() and folder and not path.is_dir():
        raise UserError(f"{option} '{path}' is an existing file; give a new folder")
    if path.is_dir() and not folder:
        raise UserError(f"{option} '{path}' is an existing folder; give a file name")
    above = path.absolute() if folder and path.is_dir() else path.absolute().parent  # where the files will go
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{option} '{path}' cannot be created: '{above}' is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{option} '{path}' cannot be created: '{above}' is not writable (read-only file system or no permission)")


def check_seed(seed: int, option: str = "--seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{option} must be an integer from 0 to 2**63-1 (got {seed})")


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def cmd_run(args, hooks) -> int:
    from scoredistill.config import resolve
    from scoredistill.checkpoint import is_checkpoint_path
    from scoredistill.resume import resume_commit, resume_config
    from scoredistill.run_dir import run_dir_lock
    from scoredistill.runner import execute

    if args.resume is not None and args.prompts is not None:
        raise UserError("--prompts cannot be used with --resume: a resumed run keeps its prompts")
    if args.resume is not None and args.data is not None:
        raise UserError("--data cannot be used with --resume: a resumed run keeps its real data")
    if args.resume is not None and args.teacher is not None:
        raise UserError("--teacher cannot be used with --resume: a resumed run keeps its teacher")
    preset, overrides = _teacher_option(args)
    overrides += ["runtime.progress=false"] if args.quiet else []
    checkpoint, held = None, contextlib.nullcontext()
    if args.resume is not None:
        if args.method is not None or args.ablate or args.preset is not None:
            raise UserError("give either METHOD (a new run) or --resume RUN_DIR, not both: a resumed run keeps its method, preset and ablations")
        if args.out is not None:
            raise UserError("--out cannot be used with --resume: the run continues in its own folder")
        config, checkpoint, out = resume_config(hooks, args.resume, overrides)  # checks only: nothing written yet
        if _is_main_process():
            held = run_dir_lock(out)  # held to the end: a second --resume of this folder is refused
    else:
        if args.method is None:
            raise UserError("the following arguments are required: METHOD (see 'scoredistill list'), or --resume RUN_DIR")
        preset = preset or DEFAULT_PRESET
        config = resolve(hooks.registry, args.method, preset, args.ablate, overrides)
        tag = "".join(f"-no-{a}" for a in args.ablate)
        out = args.out or Path("runs") / f"{args.method}{tag}-{preset}-{_timestamp()}"
        check_out(out)
    try:
        with held:
            if args.resume is not None:
                resume_commit(out, config, checkpoint, explicit=is_checkpoint_path(args.resume))
            result = execute(config, hooks, out, resume=checkpoint, again=args.resume is not None and checkpoint is None)
    except RunInterrupted as stop:
        if _is_main_process():
            sys.stderr.write(f"scoredistill: {_interrupted(stop)}; continue with: {_launcher()} run --resume {out}\n")
        return stop.exit_code
    if result is not None:  # the result, on stdout (progress and messages go to stderr)
        print(f"done: {out}  " + _headline(result.metrics), flush=True)
    return 0


def _interrupted(stop) -> str:
    """What an interrupted run has, by the phase the signal came in."""
    if stop.phase == "training":
        return f"interrupted by {stop} at step {stop.step}; checkpoint saved: {stop.checkpoint}"
    if stop.phase == "finishing":
        return (f"interrupted by {stop} after training (step {stop.step}, checkpoint {stop.checkpoint}), during its evaluation "
                "and report, which a resume makes again")
    if stop.checkpoint is None:
        return f"interrupted by {stop} before its first checkpoint (a resume starts the run again from the beginning)"
    return f"interrupted by {stop} while building, before training on from {stop.checkpoint} (step {stop.step})"


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _launcher() -> str:
    """How this process was started, for a command to repeat: ``scoredistill``, or torchrun with as many processes."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return "scoredistill"
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1)
    per_node = os.environ.get("LOCAL_WORLD_SIZE", str(world))
    where = f" --nnodes {nodes}" if nodes > 1 else ""
    return f"torchrun{where} --nproc_per_node {per_node} -m scoredistill.cli"


def _headline(metrics: dict) -> str:
    keys = ("mode_coverage", "max_mass_error", "within_3std", "energy_distance",  # toy2d
            "fid", "fid_ratio_to_teacher", "classes_present", "train_seconds")  # images
    return "  ".join(f"{k}={metrics[k]}" for k in keys if k in metrics)


def cmd_sample(args, hooks) -> int:
    import math

    import numpy as np

    from scoredistill.io import atomic_write
    from scoredistill.roles import seeded_conditions
    from scoredistill.trainer import generate, load_run

    if not 1 <= args.num <= MAX_SAMPLES:
        raise UserError(f"--num must be an integer from 1 to {MAX_SAMPLES:,} (got {args.num})")
    check_seed(args.seed)
    if args.out.suffix != ".npy":
        raise UserError(f"--out must be a .npy file (got '{args.out}')")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be a positive integer (got {args.steps})")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise UserError(f"--guidance-scale must be a finite number (got {args.guidance_scale})")
    check_out(args.out, folder=False)
    run = load_run(args.run_dir, hooks, online=args.online)
    if args.guidance_scale is not None and not getattr(run.sampling_generator, "takes_guidance_scale", False):
        raise UserError(f"--guidance-scale: the run's generator is not conditioned on a guidance scale (it takes one with "
                        "method lcm and a conditional teacher: generator.guidance_embedding > 0); leave it out")
    _check_fits(args.out, args.num, run.models.teacher.data_shape)
    samples = generate(run, args.num, args.seed, steps=args.steps, guidance=args.guidance_scale).numpy().astype("float32")
    atomic_write(args.out, lambda p: np.save(open(p, "wb"), samples))
    print(f"wrote {args.out}: {samples.shape[0]} samples of shape {tuple(samples.shape[1:])}")
    labels = seeded_conditions(run.models.teacher, args.num, args.seed)  # the conditions generate() used, if any
    if labels is not None:
        path = args.out.with_name(args.out.stem + "_labels.npy")
        atomic_write(path, lambda p: np.save(open(p, "wb"), labels.cpu().numpy()))
        what = "class label" if run.models.teacher.num_classes is not None else "condition (prompt index)"
        print(f"wrote {path}: the {what} of each sample (the teacher is conditional)")
    return 0


def _check_fits(out: Path, num: int, shape: Sequence[int]) -> None:
    """``num`` float32 samples of ``shape`` must fit on the disk that holds ``out`` (and so, in all likelihood, in memory)."""
    import math
    import shutil

    need = num * math.prod(shape) * 4
    above = out.absolute().parent
    while not above.exists():
        above = above.parent
    free = shutil.disk_usage(above).free
    if need > free:
        raise UserError(f"--num {num} samples of shape {tuple(shape)} need {need / 1e9:.3g} GB, more than the "
                        f"{free / 1e9:.3g} GB free at '{above}'; ask for fewer")


def cmd_export(args, hooks) -> int:
    from scoredistill.export import export_run

    check_out(args.out, option="OUT")
    info = export_run(args.run_dir, args.out, hooks, online=args.online)
    what = "pipeline" if (Path(args.out) / "model_index.json").is_file() else "model"
    print(f"wrote {args.out}: {info['generator']} ({info['weights']} weights) as a diffusers {what}; see {args.out / 'README.md'}")
    return 0


def cmd_compare(args, hooks) -> int:
    from scoredistill.compare import compare, parse_spec

    if not 1 <= args.seeds <= 1000:
        raise UserError(f"--seeds must be an integer from 1 to 1000 (got {args.seeds})")
    specs = [parse_spec(s, extra_ablations=args.ablate) for s in args.specs]
    preset, overrides = _teacher_option(args)
    overrides += ["runtime.progress=false"] if args.quiet else []
    preset = preset or DEFAULT_PRESET
    out = args.out or Path("runs") / f"compare-{preset}-{_timestamp()}"
    check_out(out)
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


#: faults of the file system that a user fixes (space, permissions, paths): one line, not a traceback
_OS_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
              errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG, errno.EMFILE, errno.ENFILE}


def _os_fault(exc: OSError) -> str:
    what = f"cannot write '{exc.filename}'" if exc.filename else "a file operation failed"
    hint = {errno.ENOSPC: "free some space (a run keeps its last good checkpoint: continue it with --resume)",
            errno.EDQUOT: "free some space or raise the quota", errno.EROFS: "choose a writable --out"}.get(exc.errno, "check the path")
    return f"{what}: {exc.strerror or exc}; {hint}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _Parser(prog="scoredistill", add_help=False)
    _plugin_option(pre)
    try:
        hooks = _hooks(pre.parse_known_args(argv)[0].plugins)
        args = make_parser(hooks).parse_args(argv)
        return args.func(args, hooks)
    except UserError as exc:
        if _is_main_process():  # under torchrun every process finds the same mistake: one line, from rank 0
            sys.stderr.write(f"scoredistill: error: {exc}\n")
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in _OS_FAULTS:
            raise
        if _is_main_process():
            sys.stderr.write(f"scoredistill: error: {_os_fault(exc)}\n")
        return UserError.exit_code
    except RunInterrupted as stop:  # e.g. a run of 'compare' (a run's own command says how to resume it)
        if _is_main_process():
            sys.stderr.write(f"scoredistill: {_interrupted(stop)}; run the same command again to go on\n")
        return stop.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("scoredistill: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
