"""Helpers for testing components and plugins (used by scoredistill's own tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher
from scoredistill.plugins import Hooks, make_plugin_manager
from scoredistill.roles import BuildContext, FakeScore


def mixture(means, stds, weights, **kw) -> GaussianMixtureTeacher:
    """An exact Gaussian-mixture teacher, e.g. ``mixture([[0, 0]], [1.0], [1.0])`` for N(0, I)."""
    return GaussianMixtureTeacher(GaussianMixtureTeacher.Config(means=means, stds=stds, weights=weights, **kw))


def gaussian(mean, std: float, **kw) -> GaussianMixtureTeacher:
    """``N(mean, std^2 I)`` as an exact single-component teacher (its denoiser is linear in ``x_s``)."""
    return mixture([list(mean)], [std], [1.0], **kw)


class ExactFakeScore(FakeScore):
    """The exact denoiser of a known generator distribution (an exact teacher), standing in for a trained fake score."""

    def __init__(self, distribution: GaussianMixtureTeacher) -> None:
        super().__init__()
        self.distribution = distribution

    def forward(self, x_noisy, sigma, cond=None, *, x_clean=None):
        return self.distribution(x_noisy, sigma, cond)


def build_context(teacher=None, **kw) -> BuildContext:
    """A :class:`BuildContext` with the installed plugins and no progress bars."""
    kw.setdefault("extra", {"progress": False})
    return BuildContext(hooks=Hooks(make_plugin_manager()), teacher=teacher, **kw)


class WeightCasts(TorchDispatchMode):
    """Within: counts every aten op (``ops``) and the ``_to_copy`` calls whose input is one of ``params`` (``casts``:
    autocast's casts of those weights)."""

    def __init__(self, params) -> None:
        super().__init__()
        self.ptrs, self.casts, self.ops = {p.data_ptr() for p in params}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func.overloadpacket is torch.ops.aten._to_copy and args and args[0].data_ptr() in self.ptrs:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def run_toy2d(method: str, out, sets=(), ablations=()) -> dict:
    """``scoredistill run METHOD --preset toy2d --quiet`` in this process with ``--set`` overrides ``sets``; checks that
    it succeeded with finite exact metrics and no non-finite update, and returns its ``metrics.json``."""
    import json
    import math

    from scoredistill.cli import main

    args = ["run", method, "--preset", "toy2d", "--out", str(out), "--quiet", *[a for ab in ablations for a in ("--ablate", ab)]]
    assert main(args + [a for kv in sets for a in ("--set", kv)]) == 0
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    for key in ("mode_coverage", "max_mass_error", "within_3std", "energy_distance"):
        assert math.isfinite(metrics[key]), key
    assert metrics["non_finite"] == 0
    return metrics


@torch.no_grad()
def central_differences(f, x0: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """The gradient of the scalar function ``f`` at ``x0`` by central differences, one element at a time:
    ``(f(x0 + h e_k) - f(x0 - h e_k)) / 2h`` (use float64 ``x0``). An independent check of autograd's gradient."""
    fd = torch.zeros_like(x0)
    for k in range(x0.numel()):
        e = torch.zeros_like(x0)
        e.view(-1)[k] = h
        fd.view(-1)[k] = (f(x0 + e) - f(x0 - e)) / (2 * h)
    return fd
