"""Plugin discovery, blocking, collisions and replacing a default role builder."""

from __future__ import annotations

import types

import pytest
from pydantic import BaseModel, ConfigDict

from scoredistill import hookimpl
from scoredistill.config import resolve
from scoredistill.errors import UserError
from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher
from scoredistill.plugins import CORE_PLUGINS, Hooks, make_plugin_manager
from scoredistill.registry import ROLES, component
from scoredistill.roles import GeneratorLoss
from scoredistill.trainer import build


def test_builtin_plugins_join_through_entry_points(hooks):
    assert {"core", "dmd", "baselines"} <= set(hooks.plugin_names())
    assert "dmd" in hooks.registry.methods
    assert "kl_gradient" in hooks.registry.components["generator_loss"]


def test_autoload_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SCOREDISTILL_DISABLE_PLUGIN_AUTOLOAD", "1")
    hooks = Hooks(make_plugin_manager())
    assert hooks.plugin_names() == sorted(CORE_PLUGINS)
    assert "dmd" not in hooks.registry.methods
    # ... and a module can still be loaded by name
    monkeypatch.setenv("SCOREDISTILL_PLUGINS", "scoredistill_dmd.plugin")
    assert "dmd" in Hooks(make_plugin_manager()).registry.methods


def test_a_plugin_can_be_blocked_by_name(monkeypatch):
    monkeypatch.setenv("SCOREDISTILL_BLOCK_PLUGINS", "dmd")
    hooks = Hooks(make_plugin_manager())
    assert "dmd" not in hooks.plugin_names() and "dmd" not in hooks.registry.methods
    with pytest.raises(UserError, match="unknown method 'dmd'"):
        resolve(hooks.registry, "dmd", "toy2d")


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**hooks)


@component("kl_gradient", role="generator_loss")
class Impostor(GeneratorLoss):
    """Claims a name DMD already has."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")


def test_component_name_collision_is_an_error():
    pm = make_plugin_manager()
    pm.register(_plugin(scoredistill_add_components=hookimpl(lambda: [Impostor])), name="impostor")
    with pytest.raises(UserError, match="component name collision: 'kl_gradient'"):
        Hooks(pm).registry


def test_component_decorator_requires_a_config_model():
    with pytest.raises(TypeError, match="Config"):
        component("nameless", role="generator_loss")(type("NoConfig", (), {}))
    with pytest.raises(ValueError, match="unknown role"):
        component("x", role="critic")


def test_registry_entries_are_complete(hooks):
    """Every registered component fills a known role, has a docstring and a forbid-extra config."""
    for role, table in hooks.registry.components.items():
        assert role in ROLES
        for name, info in table.items():
            assert info.summary, f"{name} has no docstring"
            assert info.config_model.model_config.get("extra") == "forbid", name
            info.config_model.model_json_schema()
    for method in hooks.registry.methods.values():
        for preset in hooks.registry.presets:
            resolve(hooks.registry, method.name, preset)
            for ablation in method.ablations:
                try:
                    resolve(hooks.registry, method.name, preset, [ablation])
                except UserError as exc:
                    assert "nothing would train the generator" in str(exc)


def test_firstresult_role_hook_replaces_the_default_builder(tmp_path):
    """A plugin returning a teacher first wins over the registry lookup of the core plugin."""
    made = []

    def scoredistill_make_teacher(spec, ctx):
        cfg = GaussianMixtureTeacher.Config(means=[[0.0, 0.0]], stds=[1.0], weights=[1.0])
        made.append(spec.component)
        return GaussianMixtureTeacher(cfg, ctx)

    pm = make_plugin_manager()
    pm.register(_plugin(scoredistill_make_teacher=hookimpl(scoredistill_make_teacher)), name="my_teacher")
    hooks = Hooks(pm)
    cfg = resolve(hooks.registry, "dmd", "toy2d", ["regression"], ["runtime.progress=false"])
    run = build(cfg, hooks, tmp_path)
    assert made == ["gaussian_mixture"]
    assert run.models.teacher.means.shape == (1, 2)
