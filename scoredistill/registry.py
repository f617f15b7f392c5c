"""Named components, methods and presets, collected from plugins.

A *component* is a small class that fills one role, with a typed pydantic config::

    @component("l2_regression", role="generator_loss", paper="Yin et al. 2024, Sec. 3.3")
    class L2Regression(GeneratorLoss):
        class Config(BaseModel, extra="forbid"):
            pass
        needs_pairs = True
        def __init__(self, config, ctx): ...

``@component`` only records metadata on the class; nothing is registered at import.
Plugins return their classes from the ``scoredistill_add_components`` hook and the
:class:`Registry` collects them, refusing a name that two plugins claim.

A *method* is data (:class:`Method`): a partial run config naming the component of
each role, plus the ablations it allows. A *preset* (:class:`Preset`) is a partial
run config describing a problem: teacher, networks, budget.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field

from scoredistill.errors import UserError, one_of

Role = Literal["teacher", "generator", "fake_score", "generator_loss", "fake_score_loss", "pair_source", "target", "curriculum"]


@dataclass(frozen=True)
class RoleInfo:
    """One role a component can fill: its name, the run-config section that names it, its base class, what it is."""

    name: str
    section: str  # ``losses.<term>`` for generator loss terms
    base: str  # the base class in scoredistill.roles
    summary: str


#: the one table of roles, in the order a run builds them
ROLE_TABLE: tuple[RoleInfo, ...] = (
    RoleInfo("teacher", "teacher", "Teacher", "The frozen *real* denoiser `D_real(x_s, s, cond)` and its noise schedule. "
             "Every teacher follows the sigma convention `x_s = x + s * eps`."),
    RoleInfo("generator", "generator", "Generator", "The one-step generator `G(z, cond) -> x` that the run trains."),
    RoleInfo("fake_score", "fake_score", "FakeScore", "The *fake* denoiser `D_fake` of the generator's own distribution, "
             "trained online (or replaced, in ablations)."),
    RoleInfo("generator_loss", "losses.<term>", "GeneratorLoss", "One term of the generator objective, `term(batch, models) "
             "-> scalar`; a method sums `weight * term` over its terms (config section `losses.<term name>`)."),
    RoleInfo("fake_score_loss", "fake_score_loss", "FakeScoreLoss", "The loss that trains the fake score on detached "
             "generator samples (config section `fake_score_loss`)."),
    RoleInfo("pair_source", "pairs", "PairSource", "Noise-to-data pairs `(z_ref, y_ref)` from the teacher, for regression "
             "terms (config section `pairs`)."),
    RoleInfo("target", "losses.<term>.target", "TargetNetwork", "A slowly moving copy of the generator that a consistency "
             "loss regresses towards (setting `target` of the loss term, built by `scoredistill.config.build_part`)."),
    RoleInfo("curriculum", "losses.<term>.curriculum", "Curriculum", "The noise levels a consistency loss draws adjacent "
             "pairs from (setting `curriculum` of the loss term, built by `scoredistill.config.build_part`)."),
)
ROLES: tuple[str, ...] = tuple(r.name for r in ROLE_TABLE)


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    role: str
    paper: Optional[str]
    cls: type

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    @property
    def config_model(self) -> type[BaseModel]:
        return self.cls.Config


def component(name: str, *, role: str, paper: Optional[str] = None) -> Callable[[type], type]:
    """Mark a class as the component ``name`` filling ``role`` (metadata only, no registration)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {ROLES}")

    def mark(cls: type) -> type:
        if not (isinstance(getattr(cls, "Config", None), type) and issubclass(cls.Config, BaseModel)):
            raise TypeError(f"component {name!r} ({cls.__qualname__}) needs a nested pydantic `Config` model")
        cls.component_info = ComponentInfo(name=name, role=role, paper=paper, cls=cls)
        return cls

    return mark


class Ablation(BaseModel):
    """One ablation of a method: config keys to drop and sections to replace whole."""

    model_config = ConfigDict(extra="forbid")
    summary: str
    drop: list[str] = Field(default_factory=list)
    replace: dict[str, Any] = Field(default_factory=dict)


class Method(BaseModel):
    """A method: which component fills each role (``config``), and its ablations."""

    model_config = ConfigDict(extra="forbid")
    name: str
    summary: str
    paper: Optional[str] = None
    config: dict[str, Any]
    ablations: dict[str, Ablation] = Field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: Path | str) -> "Method":
        return cls.model_validate(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


class Preset(BaseModel):
    """A problem setting (teacher, networks, budget) that any method runs on."""

    model_config = ConfigDict(extra="forbid")
    name: str
    summary: str
    config: dict[str, Any]

    @classmethod
    def from_yaml(cls, path: Path | str) -> "Preset":
        return cls.model_validate(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


class Registry:
    """Components by (role, name), methods and presets by name; collisions are errors."""

    def __init__(self, blocked: Iterable[str] = ()) -> None:
        self.components: dict[str, dict[str, ComponentInfo]] = {role: {} for role in ROLES}
        self.methods: dict[str, Method] = {}
        self.presets: dict[str, Preset] = {}
        #: plugins blocked by name (``-p no:NAME``): an unknown name's error says they may be why
        self.blocked = sorted(blocked)

    def _unknown(self, kind: str, name: str, allowed) -> UserError:
        error = one_of(kind, name, allowed)
        if self.blocked:
            error = UserError(f"{error}; blocked plugins, which may provide it: {', '.join(self.blocked)}")
        return error

    def add_components(self, classes: Iterable[type], source: str = "?") -> None:
        for cls in classes:
            info = getattr(cls, "component_info", None)
            if info is None or info.cls is not cls:
                raise TypeError(f"plugin {source}: {cls!r} is not decorated with @component")
            table = self.components[info.role]
            if info.name in table:
                other = table[info.name].cls
                raise UserError(
                    f"component name collision: '{info.name}' ({info.role}) is registered by both "
                    f"{other.__module__}.{other.__qualname__} and {cls.__module__}.{cls.__qualname__}"
                )
            table[info.name] = info

    def add_methods(self, methods: Iterable[Method]) -> None:
        for m in methods:
            if m.name in self.methods:
                raise UserError(f"method name collision: '{m.name}' is registered twice")
            self.methods[m.name] = m

    def add_presets(self, presets: Iterable[Preset]) -> None:
        for p in presets:
            if p.name in self.presets:
                raise UserError(f"preset name collision: '{p.name}' is registered twice")
            self.presets[p.name] = p

    def component(self, role: str, name: str) -> ComponentInfo:
        table = self.components[role]
        if name not in table:
            raise self._unknown(f"{role} component", name, table)
        return table[name]

    def method(self, name: str) -> Method:
        if name not in self.methods:
            raise self._unknown("method", name, self.methods)
        return self.methods[name]

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise self._unknown("preset", name, self.presets)
        return self.presets[name]
