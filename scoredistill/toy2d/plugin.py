"""The toy2d plugin: the Gaussian-mixture teacher, MLP networks, preset, exact metrics and scatter pictures.

Registered through the ``scoredistill`` entry-point group (name ``toy2d``), like the
method plugins. Hooks:

* components ``gaussian_mixture`` (teacher), ``mlp_generator``, ``mlp_denoiser``; preset ``toy2d``;
* ``scoredistill_evaluate`` / ``scoredistill_report`` for a mixture teacher: exact metrics
  of the generator's samples, of the teacher's own Heun sampler and of exact samples
  (the floor), and ``samples.png`` (samples over the mixture's density);
* ``scoredistill_draw_samples``: scatter pictures over the density for periodic samples
  and ``scoredistill compare``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from scoredistill.hookspecs import hookimpl
from scoredistill.registry import Preset
from scoredistill.sampling import heun_sample, karras_sigmas
from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher
from scoredistill.toy2d.networks import MLPFakeScore, MLPGenerator

PRESET_DIR = Path(__file__).parent / "presets"
TEACHER_ODE_STEPS = 18


@hookimpl
def scoredistill_add_components() -> list[type]:
    return [GaussianMixtureTeacher, MLPGenerator, MLPFakeScore]


@hookimpl
def scoredistill_add_presets() -> list[Preset]:
    return [Preset.from_yaml(p) for p in sorted(PRESET_DIR.glob("*.yaml"))]


def teacher_ode_samples(teacher, n: int, seed: int, steps: int = TEACHER_ODE_STEPS) -> torch.Tensor:
    """The teacher's own deterministic multi-step samples from seeded noise (Heun, EDM grid)."""
    z = torch.randn((n, *teacher.data_shape), generator=torch.Generator().manual_seed(seed)).to(teacher.sigmas.device)
    return heun_sample(teacher, z * teacher.sigma_max, karras_sigmas(steps, teacher.sigma_min, teacher.sigma_max)).cpu()


@hookimpl
def scoredistill_evaluate(run, samples):
    from scoredistill.toy2d.toy_metrics import mixture_metrics

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
    teacher = run.models.teacher
    if isinstance(teacher, GaussianMixtureTeacher) and teacher.dim == 2:
        from scoredistill.toy2d import plots

        title = f"{run.config.method}" + (f" (ablate {', '.join(run.config.ablations)})" if run.config.ablations else "")
        cov = metrics.get("mode_coverage")
        label = f"{title}\ncoverage {cov:.2f}, energy distance {metrics.get('energy_distance', float('nan')):.4f}"
        plots.scatter_over_density(teacher, samples, run.dir / "samples.png", label)


@hookimpl
def scoredistill_draw_samples(teacher: Any, panels: Sequence[tuple[str, torch.Tensor]], path: Path,
                              title: Optional[str]) -> Optional[bool]:
    if not isinstance(teacher, GaussianMixtureTeacher) or teacher.dim != 2 or any(s.ndim != 2 or s.shape[1] != 2 for _, s in panels):
        return None
    from scoredistill.toy2d import plots

    if len(panels) == 1 and title is None:
        label, samples = panels[0]
        plots.scatter_over_density(teacher, samples, path, label)
    else:
        plots.scatter_panels(teacher, panels, path, title=title)
    return True
