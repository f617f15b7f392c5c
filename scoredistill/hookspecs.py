"""Every hook a scoredistill plugin can implement, in one place.

A plugin is a module (or object) with functions named like the hooks below and
marked with :data:`scoredistill.hookimpl`. The built-in methods (``scoredistill_dmd``,
``scoredistill_baselines``) are plugins like any other: they join through the
``scoredistill`` entry-point group, and so does a third-party package::

    [project.entry-points.scoredistill]
    my_method = "my_package.plugin"

Hooks fall into three groups:

* **Registration** (called once, results collected from every plugin): components,
  methods and presets. Registration has no import side effects; a name that two
  plugins register is an error.
* **Roles** (``firstresult``): build the objects a method is made of: the teacher
  (real denoiser), the generator, the fake score, each generator loss term, the
  fake-score loss and the pair source. The core plugin implements each one by
  looking the component up in the registry (``trylast``); a plugin that returns
  something other than ``None`` first replaces that default.
* **Lifecycle**: the trainer's moments (configure, start, step, end) and the
  run's evaluation and report, which every interested plugin contributes to. They
  see the run through :class:`~scoredistill.views.RunView`, not the trainer's state.
* **Pictures** (``firstresult``): drawing a run's samples, by the plugin that knows
  its teacher's data (the core asks no teacher for its type).

All hooks are called with keyword arguments only, through the typed facade
:class:`scoredistill.plugins.Hooks`; nothing in the core calls a hook by string.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from scoredistill.config import ComponentSpec, RunConfig
    from scoredistill.roles import (
        BuildContext,
        FakeScore,
        FakeScoreLoss,
        Generator,
        GeneratorLoss,
        PairSource,
        Teacher,
    )
    from scoredistill.registry import Method, Preset
    from scoredistill.views import RunView

PROJECT = "scoredistill"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- registration


@hookspec
def scoredistill_add_components() -> list[type]:
    """Return the component classes this plugin provides.

    Each class is decorated with :func:`scoredistill.registry.component`, which
    records its registry name and role (``teacher``, ``generator``, ``fake_score``,
    ``generator_loss``, ``fake_score_loss``, ``pair_source``), and has a nested
    pydantic ``Config`` model (``extra="forbid"``) whose fields are its settings.
    A component is built as ``cls(config, ctx)`` with a
    :class:`~scoredistill.roles.BuildContext`.
    """


@hookspec
def scoredistill_add_methods() -> list[Method]:
    """Return the methods this plugin provides.

    A :class:`~scoredistill.registry.Method` is data: a partial run config that
    says which component fills each role (with loss weights and settings), plus
    the ablations the method allows. ``Method.from_yaml`` reads one from a file.
    """


@hookspec
def scoredistill_add_presets() -> list[Preset]:
    """Return the presets (problem settings: teacher, networks, budget) this plugin provides.

    A preset is a partial run config merged under any method. It may retune the
    method's existing loss terms (``losses.regression.component: l2_regression``)
    but never adds a term the method does not have.
    """


@hookspec
def scoredistill_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add command-line commands: ``p = subparsers.add_parser("name", help=...)``.

    Give each command ``p.set_defaults(func=fn)`` with ``fn(args, hooks) -> int``
    (the exit code); raise :class:`scoredistill.errors.UserError` for user mistakes.
    """


# --------------------------------------------------------------------------- configuration


@hookspec
def scoredistill_configure(config: RunConfig) -> None:
    """Check the resolved, validated run config before anything is built.

    Raise :class:`scoredistill.errors.UserError` with a one-line message for a
    combination this plugin knows cannot work (for example an image-only loss on
    2-D data). Called for every ``run`` and ``sample``.
    """


# --------------------------------------------------------------------------- roles


@hookspec(firstresult=True)
def scoredistill_make_teacher(spec: ComponentSpec, ctx: BuildContext) -> Teacher | None:
    """Build the teacher: the frozen *real* denoiser ``D_real(x_s, s, cond)`` and its schedule.

    The returned :class:`~scoredistill.roles.Teacher` follows the sigma convention
    (``x_s = x + s * eps``) whatever the underlying model was trained with.
    """


@hookspec(firstresult=True)
def scoredistill_make_generator(spec: ComponentSpec, ctx: BuildContext) -> Generator | None:
    """Build the one-step generator ``G(z) -> x``; ``ctx.teacher`` is already built.

    Where the teacher is a network, DMD initialises ``G`` from it:
    ``G(z) = D_gen(s_max * z, s_max)`` with ``D_gen`` a trainable copy.
    """


@hookspec(firstresult=True)
def scoredistill_make_fake_score(spec: ComponentSpec, ctx: BuildContext) -> FakeScore | None:
    """Build the fake score ``D_fake``: a denoiser of the generator's own distribution.

    It is called as ``fake(x_s, sigma, cond, x_clean=x)``: a trained denoiser
    ignores ``x_clean``; the ``sample_itself`` ablation returns it, which turns
    DMD's gradient into SDS's.
    """


@hookspec(firstresult=True)
def scoredistill_make_generator_loss(name: str, spec: ComponentSpec, ctx: BuildContext) -> GeneratorLoss | None:
    """Build the generator loss term ``name`` (``distribution_matching``, ``regression``, ...).

    The trainer sums ``spec.weight * term(batch, models)`` over the method's terms.
    """


@hookspec(firstresult=True)
def scoredistill_make_fake_score_loss(spec: ComponentSpec, ctx: BuildContext) -> FakeScoreLoss | None:
    """Build the loss that trains the fake score on the generator's (detached) samples."""


@hookspec(firstresult=True)
def scoredistill_make_pair_source(spec: ComponentSpec, ctx: BuildContext) -> PairSource | None:
    """Build the source of ``(z_ref, y_ref)`` pairs for regression terms.

    Built only when some generator loss term declares ``needs_pairs``.
    """


# --------------------------------------------------------------------------- lifecycle


@hookspec
def scoredistill_train_start(run: RunView) -> None:
    """Called once the models are built, before the first optimisation step.

    Weights set here in place (an initialisation of the plugin's own) are the ones the first
    step uses: the trainer refreshes its low-precision weight copies after this hook.
    """


@hookspec
def scoredistill_train_step_end(run: RunView, step: int, logs: dict[str, float]) -> None:
    """Called every ``train.log_every`` generator steps (and after the last) with the scalar losses.

    ``logs`` is a fresh dict of Python floats; plugins may read it, not change
    the step. Keep implementations cheap: this is the hot path.
    """


@hookspec
def scoredistill_train_end(run: RunView) -> None:
    """Called after the last step, before evaluation."""


@hookspec
def scoredistill_evaluate(run: RunView, samples: torch.Tensor) -> dict[str, Any] | None:
    """Return metrics for the generator's ``samples`` (or ``None`` if not applicable).

    Every plugin's dict is merged into ``metrics.json``; two plugins reporting
    the same key is an error.
    """


@hookspec
def scoredistill_report(run: RunView, samples: torch.Tensor, metrics: dict[str, Any]) -> None:
    """Write pictures into ``run.dir`` (sample grids, scatter plots, curves)."""


@hookspec(firstresult=True)
def scoredistill_draw_samples(teacher: Teacher, panels: list[tuple[str, torch.Tensor]], path: Path,
                              title: str | None) -> bool | None:
    """Draw generator samples as a picture at ``path``: one panel, or several side by side, each ``(label, samples)``.

    Return ``True`` once drawn, ``None`` to leave it to another plugin (``samples`` this plugin
    does not know how to show, e.g. of another teacher). One panel with ``title=None``: the label is
    the picture's title. Used for the periodic sample pictures (``train.sample_every``) and
    ``scoredistill compare``'s ``comparison.png``; where no plugin draws, the core shows 2-D points
    as a plain scatter and images as a grid.
    """
