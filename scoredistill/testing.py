"""Helpers for testing components and plugins (used by scoredistill's own tests)."""

from __future__ import annotations

from scoredistill.gaussian_mixture import GaussianMixtureTeacher
from scoredistill.plugins import Hooks, make_plugin_manager
from scoredistill.roles import BuildContext


def mixture(means, stds, weights, **kw) -> GaussianMixtureTeacher:
    """An exact Gaussian-mixture teacher, e.g. ``mixture([[0, 0]], [1.0], [1.0])`` for N(0, I)."""
    return GaussianMixtureTeacher(GaussianMixtureTeacher.Config(means=means, stds=stds, weights=weights, **kw))


def build_context(teacher=None, **kw) -> BuildContext:
    """A :class:`BuildContext` with the installed plugins and no progress bars."""
    kw.setdefault("extra", {"progress": False})
    return BuildContext(hooks=Hooks(make_plugin_manager()), teacher=teacher, **kw)
