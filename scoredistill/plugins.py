"""The plugin manager and the typed facade through which the core calls hooks.

Plugins are found the way pytest finds them:

* the core's own plugins (:data:`CORE_PLUGINS`, e.g. :mod:`scoredistill.builtin`) are always registered;
* installed packages join through the ``scoredistill`` entry-point group (the
  built-in ``toy2d``, ``dmd`` and ``baselines`` plugins too), unless
  ``SCOREDISTILL_DISABLE_PLUGIN_AUTOLOAD`` is set;
* ``SCOREDISTILL_PLUGINS=mod.a,mod.b`` (or ``-p mod.a`` on the command line)
  imports and registers modules by name;
* ``SCOREDISTILL_BLOCK_PLUGINS=dmd`` (or ``-p no:dmd``) blocks a plugin by its
  entry-point name.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, Iterable, Optional

import pluggy

from scoredistill import hookspecs
from scoredistill.errors import UserError
from scoredistill.registry import Registry

if TYPE_CHECKING:
    import torch

    from scoredistill.config import ComponentSpec, RunConfig
    from scoredistill.roles import BuildContext, FakeScore, FakeScoreLoss, Generator, GeneratorLoss, PairSource, Teacher
    from scoredistill.views import RunView

ENTRY_POINT_GROUP = "scoredistill"
#: parts of the core that are plugins themselves, always registered (name -> module)
CORE_PLUGINS: dict[str, str] = {"core": "scoredistill.builtin", "images": "scoredistill.images.plugin"}
ENV_DISABLE_AUTOLOAD = "SCOREDISTILL_DISABLE_PLUGIN_AUTOLOAD"
ENV_PLUGINS = "SCOREDISTILL_PLUGINS"
ENV_BLOCK = "SCOREDISTILL_BLOCK_PLUGINS"


def _split(value: Optional[str]) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def make_plugin_manager(plugins: Iterable[str] = (), blocked: Iterable[str] = (), autoload: Optional[bool] = None) -> pluggy.PluginManager:
    """A plugin manager with the core plugin, entry-point plugins and the named modules."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in [*_split(os.environ.get(ENV_BLOCK)), *blocked]:
        pm.set_blocked(name)

    for name, modname in CORE_PLUGINS.items():
        pm.register(importlib.import_module(modname), name=name)
    if autoload is None:
        autoload = not os.environ.get(ENV_DISABLE_AUTOLOAD)
    if autoload:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for modname in [*_split(os.environ.get(ENV_PLUGINS)), *plugins]:
        if pm.is_blocked(modname) or pm.get_plugin(modname) is not None:
            continue
        try:
            module = importlib.import_module(modname)
        except ImportError as exc:
            raise UserError(f"cannot import plugin module '{modname}': {exc}") from None
        if module not in pm.get_plugins():
            pm.register(module, name=modname)
    pm.check_pending()
    return pm


class Hooks:
    """Typed, keyword-only calls of every hook, plus the registry built from them."""

    def __init__(self, pm: Optional[pluggy.PluginManager] = None) -> None:
        self.pm = pm if pm is not None else make_plugin_manager()
        self._registry: Optional[Registry] = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            reg = Registry(blocked=[name for name, plugin in self.pm.list_name_plugin() if plugin is None])
            hook = self.pm.hook
            for impl in hook.scoredistill_add_components.get_hookimpls():
                reg.add_components(impl.function() or [], source=impl.plugin_name)
            for methods in hook.scoredistill_add_methods():
                reg.add_methods(methods or [])
            for presets in hook.scoredistill_add_presets():
                reg.add_presets(presets or [])
            self._registry = reg
        return self._registry

    def plugin_names(self) -> list[str]:
        return sorted(name for name, plugin in self.pm.list_name_plugin() if plugin is not None)

    def add_commands(self, *, subparsers: Any) -> None:
        self.pm.hook.scoredistill_add_commands(subparsers=subparsers)

    # -- configuration
    def configure(self, *, config: "RunConfig") -> None:
        self.pm.hook.scoredistill_configure(config=config)

    # -- roles
    def make_teacher(self, *, spec: "ComponentSpec", ctx: "BuildContext") -> "Teacher":
        return self._required(self.pm.hook.scoredistill_make_teacher(spec=spec, ctx=ctx), "teacher", spec)

    def make_generator(self, *, spec: "ComponentSpec", ctx: "BuildContext") -> "Generator":
        return self._required(self.pm.hook.scoredistill_make_generator(spec=spec, ctx=ctx), "generator", spec)

    def make_fake_score(self, *, spec: "ComponentSpec", ctx: "BuildContext") -> "FakeScore":
        return self._required(self.pm.hook.scoredistill_make_fake_score(spec=spec, ctx=ctx), "fake_score", spec)

    def make_generator_loss(self, *, name: str, spec: "ComponentSpec", ctx: "BuildContext") -> "GeneratorLoss":
        return self._required(self.pm.hook.scoredistill_make_generator_loss(name=name, spec=spec, ctx=ctx), "generator_loss", spec)

    def make_fake_score_loss(self, *, spec: "ComponentSpec", ctx: "BuildContext") -> "FakeScoreLoss":
        return self._required(self.pm.hook.scoredistill_make_fake_score_loss(spec=spec, ctx=ctx), "fake_score_loss", spec)

    def make_pair_source(self, *, spec: "ComponentSpec", ctx: "BuildContext") -> "PairSource":
        return self._required(self.pm.hook.scoredistill_make_pair_source(spec=spec, ctx=ctx), "pair_source", spec)

    # -- lifecycle
    def train_start(self, *, run: "RunView") -> None:
        self.pm.hook.scoredistill_train_start(run=run)

    def train_step_end(self, *, run: "RunView", step: int, logs: dict[str, float]) -> None:
        self.pm.hook.scoredistill_train_step_end(run=run, step=step, logs=logs)

    def train_end(self, *, run: "RunView") -> None:
        self.pm.hook.scoredistill_train_end(run=run)

    def evaluate(self, *, run: "RunView", samples: "torch.Tensor") -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in self.pm.hook.scoredistill_evaluate(run=run, samples=samples):
            for key, value in (part or {}).items():
                if key in merged:
                    raise RuntimeError(f"two plugins report the metric '{key}'")
                merged[key] = value
        return merged

    def report(self, *, run: "RunView", samples: "torch.Tensor", metrics: dict[str, Any]) -> None:
        self.pm.hook.scoredistill_report(run=run, samples=samples, metrics=metrics)

    def draw_samples(self, *, teacher: "Teacher", panels: list[tuple[str, "torch.Tensor"]], path: Any,
                     title: Optional[str] = None) -> bool:
        """True when a plugin drew the panels (:func:`~scoredistill.hookspecs.scoredistill_draw_samples`)."""
        return bool(self.pm.hook.scoredistill_draw_samples(teacher=teacher, panels=panels, path=path, title=title))

    @staticmethod
    def _required(result: Any, role: str, spec: "ComponentSpec") -> Any:
        if result is None:
            raise UserError(f"no plugin built the {role} '{spec.component}'")
        return result
