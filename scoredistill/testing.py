"""Helpers for testing components and plugins (used by scoredistill's own tests)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher
from scoredistill.plugins import Hooks, make_plugin_manager
from scoredistill.roles import BuildContext


def mixture(means, stds, weights, **kw) -> GaussianMixtureTeacher:
    """An exact Gaussian-mixture teacher, e.g. ``mixture([[0, 0]], [1.0], [1.0])`` for N(0, I)."""
    return GaussianMixtureTeacher(GaussianMixtureTeacher.Config(means=means, stds=stds, weights=weights, **kw))


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
