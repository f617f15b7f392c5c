"""The core plugin: default role builders, the components methods share and the loss curves of every run.

It is registered like any plugin (under the name ``core``). Its role hooks run
last (``trylast``) and build the component the config names from the registry,
so another plugin can replace any of them by returning a value first.
"""

from __future__ import annotations

from typing import Any

from scoredistill.config import ComponentSpec
from scoredistill.fake_scores import SampleItself
from scoredistill.hookspecs import hookimpl
from scoredistill.pairs import ODEPairs
from scoredistill.roles import BuildContext


@hookimpl
def scoredistill_add_components() -> list[type]:
    return [ODEPairs, SampleItself]


# One implementation per role hook, alike on purpose: pluggy matches an implementation to its hook by name.
def _build(role: str, spec: ComponentSpec, ctx: BuildContext) -> Any:
    return ctx.hooks.registry.component(role, spec.component).cls(spec.config, ctx)


@hookimpl(trylast=True)
def scoredistill_make_teacher(spec, ctx):
    return _build("teacher", spec, ctx)


@hookimpl(trylast=True)
def scoredistill_make_generator(spec, ctx):
    return _build("generator", spec, ctx)


@hookimpl(trylast=True)
def scoredistill_make_fake_score(spec, ctx):
    return _build("fake_score", spec, ctx)


@hookimpl(trylast=True)
def scoredistill_make_generator_loss(name, spec, ctx):
    return _build("generator_loss", spec, ctx)


@hookimpl(trylast=True)
def scoredistill_make_fake_score_loss(spec, ctx):
    return _build("fake_score_loss", spec, ctx)


@hookimpl(trylast=True)
def scoredistill_make_pair_source(spec, ctx):
    return _build("pair_source", spec, ctx)


# --------------------------------------------------------------------------- pictures


@hookimpl
def scoredistill_report(run, samples, metrics):
    from scoredistill import pictures

    title = f"{run.config.method}" + (f" (ablate {', '.join(run.config.ablations)})" if run.config.ablations else "")
    if run.history:
        pictures.loss_curves(run.history, run.dir / "loss_curves.png", title)
