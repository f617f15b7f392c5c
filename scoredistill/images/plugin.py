"""The images plugin: image teachers, UNet generator / fake score, sharded ODE pairs, image metrics, commands.

Registered by the core (``CORE_PLUGINS["images"]``). Hooks:

* components: ``diffusers`` (alias ``diffusers_unet``) and ``digits_unet`` (teachers),
  ``unet_generator``, ``unet_denoiser`` (fake score); presets ``digits`` and ``teacher``
  (the settings ``--teacher FOLDER`` starts from);
* ``scoredistill_make_pair_source``: ``ode_pairs`` for a teacher of images (any family
  whose ``data_space`` is ``pixels`` or ``latents``) is built as resumable safetensors
  shards (:mod:`scoredistill.images.pairs`);
* ``scoredistill_evaluate`` / ``scoredistill_report`` for teachers of images: FID (digits
  classifier; Inception where cached), class histogram, ``samples.png`` (teacher vs
  generator on the same noise) and ``class_histogram.png``;
* commands ``scoredistill teacher train`` and ``scoredistill eval RUN_DIR``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from pydantic import ValidationError

from scoredistill.errors import UserError
from scoredistill.hookspecs import hookimpl
from scoredistill.registry import Preset

from scoredistill.roles import Teacher

from scoredistill.images.networks import UNetFakeScore, UNetGenerator
from scoredistill.images.teachers import DiffusersTeacher, DiffusersUNetTeacher, DigitsTeacher

PRESET_DIR = Path(__file__).parent / "presets"
COPY_NETWORKS = {"generator": ("unet_generator",), "fake_score": ("unet_denoiser",)}  # this plugin's: copies of the teacher
FLAT_NETWORKS = {"generator": ("mlp_generator",), "fake_score": ("mlp_denoiser",)}
EVAL_FILE = "eval.json"


def makes_images(teacher) -> bool:
    """A teacher (or teacher class) of images or latents, ``C x H x W``, as it says itself."""
    return getattr(teacher, "data_space", "flat") in ("pixels", "latents")


def makes_copies(teacher_cls: type) -> bool:
    """Whether a teacher class makes trainable copies of its network (the stock generator and fake score need them)."""
    return getattr(teacher_cls, "trainable_copy", Teacher.trainable_copy) is not Teacher.trainable_copy


def _log(msg: str) -> None:
    print(f"scoredistill: {msg}", file=sys.stderr)


@hookimpl
def scoredistill_add_components() -> list[type]:
    return [DiffusersTeacher, DiffusersUNetTeacher, DigitsTeacher, UNetGenerator, UNetFakeScore]


@hookimpl
def scoredistill_add_presets() -> list[Preset]:
    return [Preset.from_yaml(p) for p in sorted(PRESET_DIR.glob("*.yaml"))]


def _component_class(spec) -> Optional[type]:
    """The component class whose ``Config`` validated ``spec.config`` (the class that defines that nested ``Config``)."""
    cfg = type(spec.config)
    owner, _, _ = cfg.__qualname__.rpartition(".")
    module = sys.modules.get(cfg.__module__)
    cls = getattr(module, owner, None) if owner and module is not None and "." not in owner else None
    return cls if isinstance(cls, type) else None


@hookimpl
def scoredistill_configure(config) -> None:
    """Refuse teacher / network combinations that cannot work, before a teacher is trained or loaded: what a teacher
    family can do is read from its component class (its ``data_space``, whether it makes trainable copies); and an
    ``eval.clip_model`` that is not a model folder."""
    from scoredistill.images.clip_score import check_clip_folder

    check_clip_folder(getattr(config.eval, "clip_model", None))
    teacher_cls = _component_class(config.teacher)
    if teacher_cls is None:
        return  # checked where the networks are built
    teacher_name = config.teacher.component
    for role in ("generator", "fake_score"):
        name = getattr(config, role).component
        if name in COPY_NETWORKS[role] and not makes_copies(teacher_cls):
            raise UserError(f"{role} '{name}' is a trainable copy of the teacher's network, but teacher '{teacher_name}' makes "
                            "no copies (Teacher.trainable_copy): choose a generator and fake score of its own family")
        if name in FLAT_NETWORKS[role] and makes_images(teacher_cls):
            raise UserError(f"{role} '{name}' is for flat (2-D) data but the teacher '{teacher_name}' makes images: "
                            f"use {role}.component={COPY_NETWORKS[role][0]}")


@hookimpl
def scoredistill_make_pair_source(spec, ctx):
    if spec.component == "ode_pairs" and makes_images(ctx.teacher):
        from scoredistill.images.pairs import ShardedODEPairs

        return ShardedODEPairs(spec.config, ctx)
    return None


# --------------------------------------------------------------------------- evaluation and report


@hookimpl
def scoredistill_evaluate(run, samples):
    teacher = run.models.teacher
    if not makes_images(teacher):
        return None
    from scoredistill.images.metrics import evaluate_images, option

    clip_model = option("clip_model", getattr(run.config.eval, "clip_model", None))
    return evaluate_images(teacher, samples, seed=option("seed", run.config.eval.seed), inception=option("inception", "auto"),
                           clip_model=clip_model, log=_log)


@hookimpl
def scoredistill_report(run, samples, metrics):
    teacher = run.models.teacher
    if not makes_images(teacher):
        return
    from scoredistill.images import plots
    from scoredistill.images.metrics import option, teacher_samples
    from scoredistill.roles import seeded_conditions

    seed = option("seed", run.config.eval.seed)
    t_samples = teacher_samples(teacher, len(samples), seed)
    tm = metrics.get("teacher") or {}
    # a run's own pictures, or (scoredistill eval) PREFIX_samples.png next to its metrics file: never the run's
    folder, prefix = Path(option("pictures_dir", run.dir)), option("pictures_prefix", "")

    def scores(m: dict) -> str:
        named = [(name, m.get(key)) for name, key in (("FID", "fid"), ("Inception FID", "fid_inception"), ("CLIP", "clip_score"))]
        shown = [f"{name} {v:.3g}" for name, v in named if isinstance(v, (int, float))]
        return f": {', '.join(shown)}" if shown else ""

    title = run.config.method + (f" (ablate {', '.join(run.config.ablations)})" if run.config.ablations else "")
    steps = getattr(run.models.generator, "sampling_steps", 1)
    panels = [(f"teacher (Heun, {teacher.sampler_nfe} NFE){scores(tm)}", t_samples), (f"generator ({steps} NFE){scores(metrics)}", samples)]
    if teacher.data_space == "latents":  # decoded by the pipeline's VAE: images, not latents
        panels = [(label, decoded(teacher, x)) for label, x in panels]
    prompts = getattr(teacher, "prompts", None)
    if prompts:
        cond = seeded_conditions(teacher, len(samples), seed)
        plots.captioned_grids(panels, [prompts[int(i)] for i in cond], folder / f"{prefix}samples.png", f"{title} (same noise, same prompts)")
    else:
        plots.sample_grids(panels, folder / f"{prefix}samples.png", f"{title} (same noise)")
    if "class_histogram" in metrics:
        series = [("generator", metrics["class_histogram"])]
        if "class_histogram" in tm:
            series.append(("teacher", tm["class_histogram"]))
        if "class_histogram" in (metrics.get("target") or {}):
            series.append(("real train split", metrics["target"]["class_histogram"]))
        plots.class_histogram(series, folder / f"{prefix}class_histogram.png", title)


def decoded(teacher, x, batch_size: int = 16):
    """``teacher.decode`` of samples ``x`` in batches, on the teacher's device, back on the CPU."""
    import torch

    device = teacher.sigmas.device
    with torch.no_grad():
        return torch.cat([teacher.decode(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


# --------------------------------------------------------------------------- commands


@hookimpl
def scoredistill_add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("teacher", help="train the embedded digits teacher (cached, resumable)")
    actions = p.add_subparsers(dest="teacher_command", required=True, metavar="ACTION")
    t = actions.add_parser("train", help="train a preset's digits teacher into its cache folder (resumes if interrupted)")
    t.set_defaults(func=cmd_teacher_train)
    t.add_argument("--preset", default="digits", help="preset whose teacher to train (default: digits)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a teacher setting, e.g. teacher.train_steps=3000 (repeatable)")
    t.add_argument("--out", type=Path, default=None, help="teacher folder (default: $SCOREDISTILL_DIGITS_TEACHER or the cache)")
    t.add_argument("--threads", type=int, default=None, help="torch threads")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = subparsers.add_parser("eval", help="evaluate a finished image run: FID, class coverage, sample grid")
    e.set_defaults(func=cmd_eval)
    e.add_argument("run_dir", type=Path, help="a finished run folder (from 'scoredistill run')")
    e.add_argument("--num", type=int, default=None, help="generated samples (default: the run's eval.num_samples)")
    e.add_argument("--seed", type=int, default=None, help="noise seed (default: the run's eval.seed)")
    e.add_argument("--inception", choices=("auto", "require", "off"), default="auto",
                   help="Inception FID: where its weights are cached (auto), or fail without them (require), or never")
    e.add_argument("--out", type=Path, default=None, help=f"metrics file (default: RUN_DIR/{EVAL_FILE})")
    e.add_argument("--clip", default=None, metavar="FOLDER",
                   help="a local CLIP model folder for the CLIP score of a text-to-image run (default: the run's eval.clip_model)")


def _teacher_config(hooks, preset: str, overrides: list[str]) -> DigitsTeacher.Config:
    from scoredistill.config import check_strict_numbers, parse_overrides

    section = dict(hooks.registry.preset(preset).config.get("teacher") or {})
    if section.get("component") != "digits_unet":
        raise UserError(f"preset '{preset}' has teacher '{section.get('component')}'; 'teacher train' trains digits_unet "
                        "teachers only (bring other teachers as diffusers folders: teacher.path=FOLDER)")
    extra = parse_overrides(overrides)
    unknown = [k for k in extra if k != "teacher"]
    if unknown:
        raise UserError(f"'teacher train' takes teacher.KEY=VALUE overrides only (got '{unknown[0]}')")
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(section), OmegaConf.create(extra.get("teacher") or {})))
    merged.pop("component")
    check_strict_numbers(DigitsTeacher.Config, merged, "teacher")
    try:
        return DigitsTeacher.Config.model_validate(merged)
    except ValidationError as err:
        e = err.errors()[0]
        raise UserError(f"invalid teacher setting 'teacher.{'.'.join(map(str, e['loc']))}': {e['msg']}") from None


def cmd_teacher_train(args, hooks) -> int:
    import torch

    from scoredistill.images.training import is_complete, train_digits_teacher

    from scoredistill.cli import check_out

    if args.threads is not None and not 1 <= args.threads <= 4096:
        raise UserError(f"--threads must be a positive integer (got {args.threads})")
    config = _teacher_config(hooks, args.preset, args.overrides)
    folder = args.out or DigitsTeacher.folder(config)
    check_out(folder)
    if args.out is not None and folder.is_dir() and any(folder.iterdir()) and not is_complete(folder):
        raise UserError(f"--out '{folder}' is a folder that holds something else than a trained teacher; give a new folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    if is_complete(folder):
        print(f"digits teacher already trained: {folder}")
        return 0
    t0 = time.perf_counter()
    train_digits_teacher(DigitsTeacher.settings(config), folder, progress=not args.quiet, log=_log)
    print(f"digits teacher trained in {time.perf_counter() - t0:.0f} s: {folder}")
    return 0


def cmd_eval(args, hooks) -> int:
    from scoredistill.io import write_json
    from scoredistill.images.metrics import EVAL_OPTIONS
    from scoredistill.trainer import generate, load_run

    from scoredistill.cli import MAX_SAMPLES, check_out, check_seed

    if args.num is not None and not 2 <= args.num <= MAX_SAMPLES:
        raise UserError(f"--num must be an integer from 2 to {MAX_SAMPLES:,} (got {args.num})")
    if args.seed is not None:
        check_seed(args.seed)
    if args.out is not None:
        check_out(args.out, folder=False)
    run = load_run(args.run_dir, hooks)
    if not makes_images(run.models.teacher):
        raise UserError(f"'scoredistill eval' evaluates image runs; the teacher of '{args.run_dir}' is "
                        f"'{run.config.teacher.component}' (its metrics are in metrics.json)")
    n = args.num or run.config.eval.num_samples
    seed = run.config.eval.seed if args.seed is None else args.seed
    out = args.out or Path(args.run_dir) / EVAL_FILE
    from scoredistill.images.clip_score import check_clip_folder

    check_clip_folder(args.clip)
    clip = {"clip_model": args.clip} if args.clip is not None else {}
    token = EVAL_OPTIONS.set({"inception": args.inception, "seed": seed, "pictures_dir": out.parent,
                              "pictures_prefix": f"{out.stem}_", **clip})
    try:
        samples = generate(run, n, seed)
        metrics = {"run": str(args.run_dir), "num_samples": n, "seed": seed, **hooks.evaluate(run=run, samples=samples)}
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, metrics)
        hooks.report(run=run, samples=samples, metrics=metrics)
    finally:
        EVAL_OPTIONS.reset(token)
    tm = metrics.get("teacher") or {}
    keys = ("fid", "fid_train", "fid_inception", "clip_score", "class_coverage", "classes_present")
    line = "  ".join(f"{k}={metrics[k]}" for k in keys if k in metrics and metrics[k] is not None)
    tline = "  ".join(f"{k}={tm[k]}" for k in keys if k in tm and tm[k] is not None)
    print(f"evaluated {args.run_dir} -> {out} (pictures: {out.stem}_*.png)\n  generator (1 NFE): {line}\n"
          f"  teacher ({tm.get('sampler', '?')}): {tline}")  # the result, on stdout
    return 0
