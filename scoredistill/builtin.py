"""The core plugin: default role builders, the embedded toy teacher, toy metrics and plots.

It is registered like any plugin (under the name ``core``). Its role hooks run
last (``trylast``) and build the component the config names from the registry,
so another plugin can replace any of them by returning a value first.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from scoredistill.config import ComponentSpec
from scoredistill.gaussian_mixture import GaussianMixtureTeacher
from scoredistill.hookspecs import hookimpl
from scoredistill.networks import MLPFakeScore, MLPGenerator
from scoredistill.pairs import ODEPairs
from scoredistill.registry import Preset
from scoredistill.roles import BuildContext
from scoredistill.sampling import heun_sample, karras_sigmas

PRESET_DIR = Path(__file__).parent / "presets"
TEACHER_ODE_STEPS = 18


@hookimpl
def scoredistill_add_components() -> list[type]:
    return [GaussianMixtureTeacher, MLPGenerator, MLPFakeScore, ODEPairs]


@hookimpl
def scoredistill_add_presets() -> list[Preset]:
    return [Preset.from_yaml(p) for p in sorted(PRESET_DIR.glob("*.yaml"))]


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


# --------------------------------------------------------------------------- toy evaluation


def teacher_ode_samples(teacher, n: int, seed: int, steps: int = TEACHER_ODE_STEPS) -> torch.Tensor:
    """The teacher's own deterministic multi-step samples from seeded noise (Heun, EDM grid)."""
    z = torch.randn((n, *teacher.data_shape), generator=torch.Generator().manual_seed(seed)).to(teacher.sigmas.device)
    return heun_sample(teacher, z * teacher.sigma_max, karras_sigmas(steps, teacher.sigma_min, teacher.sigma_max)).cpu()


@hookimpl
def scoredistill_evaluate(run, samples):
    from scoredistill.toy_metrics import mixture_metrics

    teacher = run.models.teacher
    if not isinstance(teacher, GaussianMixtureTeacher):
        return None
    seed = run.config.eval.seed
    n = len(samples)
    host = copy.deepcopy(teacher).cpu()  # the metrics are computed on the host, whatever the run's device
    exact = host.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    return {
        **mixture_metrics(host, samples.cpu(), seed=seed),
        "teacher": {"sampler": f"heun-{TEACHER_ODE_STEPS}", **mixture_metrics(host, teacher_ode_samples(teacher, n, seed), seed=seed)},
        "target": {"sampler": "exact", **mixture_metrics(host, exact, seed=seed)},
    }


@hookimpl
def scoredistill_report(run, samples, metrics):
    from scoredistill import plots

    title = f"{run.config.method}" + (f" (ablate {', '.join(run.config.ablations)})" if run.config.ablations else "")
    if run.history:
        plots.loss_curves(run.history, run.dir / "loss_curves.png", title)
    teacher = run.models.teacher
    if isinstance(teacher, GaussianMixtureTeacher) and teacher.dim == 2:
        cov = metrics.get("mode_coverage")
        label = f"{title}\ncoverage {cov:.2f}, energy distance {metrics.get('energy_distance', float('nan')):.4f}"
        plots.scatter_over_density(teacher, samples, run.dir / "samples.png", label)
