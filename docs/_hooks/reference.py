"""The reference pages, written from the code, and the code the tutorial shows, copied from the example package.

Both are committed, so that the docs read completely as plain Markdown in the repository;
``tests/test_docs.py`` fails when a committed copy is stale, and one command refreshes them::

    python docs/_hooks/reference.py

Generated pages (``docs/reference/``):

* ``reference/components.md``: every registered component, by role, with its
  docstring, paper and config fields (from its pydantic ``Config``);
* ``reference/methods.md``: every method with its components, ablations and the
  config it resolves to on each preset;
* ``reference/presets.md``: every preset;
* ``reference/config.md``: the run config's sections and the shared settings;
* ``reference/cli.md``: every command and option of ``scoredistill``, from the
  argparse parser (``scoredistill.cli.make_parser``).

Code copied into pages: a region ``<!-- include LANG: FILE[:SECTION] -->`` ...
``<!-- end include -->`` holds a fenced ``LANG`` block (no LANG: the text itself) with the
part of FILE between its ``--8<-- [start:SECTION]`` and ``--8<-- [end:SECTION]`` comments
(the whole file without no SECTION; ``FILE:N:`` from line N on; several, comma-separated,
joined by a blank line). See :data:`INCLUDED`.

Only the plugins that ship with scoredistill (its own ``scoredistill`` entry
points) are documented; third-party plugins installed in the same environment
are left out. Hand-written pages hold generated tables in regions
``<!-- generated: NAME -->`` ... ``<!-- end generated -->`` (see ``MARKERS``), refreshed the
same way. As a MkDocs hook this file loads the Sphinx-role extension and checks that the
generated pages exist.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import textwrap
import typing
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

from mkdocs.plugins import event_priority
from mkdocs.structure.files import Files

sys.path.insert(0, str(Path(__file__).parent))
import sphinx_roles  # noqa: E402  (a sibling file, not a package)



# --------------------------------------------------------------------------- the registry


class Project:
    """The built-in plugins, their registry, and which plugin provided what."""

    def __init__(self) -> None:
        from scoredistill.plugins import ENTRY_POINT_GROUP, Hooks, make_plugin_manager

        pm = make_plugin_manager(autoload=False)
        try:
            entry_points = metadata.distribution("scoredistill").entry_points
        except metadata.PackageNotFoundError:
            raise SystemExit("the docs need scoredistill installed (pip install -e '.[docs]')") from None
        for ep in sorted(entry_points, key=lambda e: e.name):
            if ep.group == ENTRY_POINT_GROUP and pm.get_plugin(ep.name) is None:
                pm.register(ep.load(), name=ep.name)
        pm.check_pending()
        self.pm = pm
        self.hooks = Hooks(pm)
        self.registry = self.hooks.registry
        self.method_source = self._sources("scoredistill_add_methods")
        self.preset_source = self._sources("scoredistill_add_presets")

    def _sources(self, hook: str) -> dict[str, str]:
        out = {}
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            for item in impl.function() or []:
                out[item.name] = impl.plugin_name
        return out


@lru_cache(maxsize=1)
def project() -> Project:
    return Project()


# --------------------------------------------------------------------------- formatting helpers


def cell(text: Any) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|") if text not in (None, "") else "—"


def code(text: Any) -> str:
    text = str(text)
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def yaml_block(obj: Any) -> str:
    from omegaconf import OmegaConf

    return "```yaml\n" + OmegaConf.to_yaml(OmegaConf.create(obj)).rstrip() + "\n```"


def admonition(kind: str, title: str, body: str, collapsed: bool = True) -> str:
    marker = "???" if collapsed else "!!!"
    return f'{marker} {kind} "{title}"\n\n' + textwrap.indent(body.strip(), "    ") + "\n"


def type_name(annotation: Any) -> str:
    if annotation is None or annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)  # cell() escapes the pipes, once
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def default_text(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return "**required**"
    if isinstance(value, tuple):
        value = list(value)
    return code(json.dumps(value))


def constraints_text(field: Any) -> str:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "min length", "max_length": "max length"}
    out = []
    for meta in field.metadata:
        for attr, sym in symbols.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sym} {value}")
    return ", ".join(out)


def fields_table(model: Any) -> str:
    fields = getattr(model, "model_fields", {})
    if not fields:
        return "*No settings.*\n"
    rows = ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    for name, field in fields.items():
        rows.append(
            f"| {code(name)} | {cell(type_name(field.annotation))} | {default_text(field)} "
            f"| {cell(constraints_text(field))} | {cell(field.description)} |"
        )
    return "\n".join(rows) + "\n"


def docstring(obj: Any) -> str:
    doc = inspect.cleandoc(obj.__doc__ or "")  # the object's own, never a base class's
    module = getattr(obj, "__module__", None)
    contexts = [f"{module}.{obj.__qualname__}", module] if module and hasattr(obj, "__qualname__") else [module]
    return sphinx_roles.convert(doc, context=[c for c in contexts if c], where=getattr(obj, "__qualname__", ""))


def anchor(role: str, name: str) -> str:
    return f"{role}-{name}".replace("_", "-")


def component_link(role: str, name: str, prefix: str = "") -> str:
    if name in project().registry.components.get(role, {}):
        return f"[{code(name)}]({prefix}components.md#{anchor(role, name)})"
    return code(name) + " (not registered)"


# --------------------------------------------------------------------------- methods: component choices


def method_config(method: str, ablations: tuple[str, ...] = ()) -> dict:
    """The method's own config with ``ablations`` applied (no preset), via the real merge code."""
    from scoredistill.config import merged_config
    from scoredistill.registry import Preset, Registry

    reg = project().registry
    bare = Registry()
    bare.components, bare.methods = reg.components, reg.methods
    bare.add_presets([Preset(name="(none)", summary="", config={})])
    cfg = merged_config(bare, method, "(none)", list(ablations))
    for key in ("method", "preset", "ablations"):
        cfg.pop(key, None)
    return cfg


def _choice(section: Any, role: str, prefix: str, missing: str) -> str:
    if section is None:
        return "none"
    if isinstance(section, dict) and "component" in section:
        return component_link(role, section["component"], prefix)
    return missing


def _settings(spec: Any) -> str:
    """A component section's explicit settings (besides its name and weight), e.g. `` (alpha=1.2)``."""
    if not isinstance(spec, dict):
        return ""
    items = [f"{k}={json.dumps(v)}" for k, v in spec.items() if k not in ("component", "weight")]
    return f" ({cell(', '.join(items))})" if items else ""


def method_row(name: str, ablations: tuple[str, ...], prefix: str) -> str:
    from scoredistill.errors import UserError

    label = f"↳ `--ablate {' '.join(ablations)}`" if ablations else f"**{code(name)}**"
    try:
        cfg = method_config(name, ablations)
    except UserError as exc:
        return f"| {label} | {cell(str(exc))} | | |"
    terms = []
    for term, spec in (cfg.get("losses") or {}).items():
        if not isinstance(spec, dict):
            terms.append(f"{term}: ?")
            continue
        comp = component_link("generator_loss", spec.get("component", "?"), prefix)
        terms.append(f"{term}: {comp} × {spec.get('weight', 1.0)}{_settings(spec)}")
    fake = (_choice(cfg.get("fake_score"), "fake_score", prefix, "?") + _settings(cfg.get("fake_score"))) if "fake_score" in cfg else "preset's"
    fake_loss = cfg.get("fake_score_loss")
    if fake_loss is None:
        fake = "unused" if "fake_score" not in cfg else f"{fake}, not trained"
    else:
        fake = f"{fake}, trained by {_choice(fake_loss, 'fake_score_loss', prefix, '?')}{_settings(fake_loss)}"
    loss_components = project().registry.components["generator_loss"]
    needs_pairs = any(
        isinstance(spec, dict) and getattr(getattr(loss_components.get(spec.get("component")), "cls", None), "needs_pairs", False)
        for spec in (cfg.get("losses") or {}).values()
    )
    other = [f"pairs: {_choice(cfg.get('pairs'), 'pair_source', prefix, '?')}"] if needs_pairs else []
    other += [f"train.{k}={json.dumps(v)}" for k, v in (cfg.get("train") or {}).items()]
    return f"| {label} | {'<br>'.join(terms)} | {fake} | {'<br>'.join(other) or '—'} |"


def method_table(prefix: str = "") -> str:
    """Every method and each of its ablations, as component choices (one row each)."""
    reg = project().registry
    rows = [
        "| method | generator loss terms: component × weight | fake score | other |",
        "|---|---|---|---|",
    ]
    for name in sorted(reg.methods):
        rows.append(method_row(name, (), prefix))
        for ablation in reg.methods[name].ablations:
            rows.append(method_row(name, (ablation,), prefix))
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------- pages


def components_page() -> str:
    from scoredistill import roles
    from scoredistill.registry import ROLE_TABLE

    reg = project().registry
    section_of = {r.name: f"`{r.section}`" for r in ROLE_TABLE}
    out = [
        "# Components",
        "",
        "Every component registered by the plugins that ship with scoredistill, by role. "
        "A config section selects one with `component: NAME`; the other keys of the section are "
        "its settings, checked against the table below (unknown keys are an error). "
        "Generated from the registry by `python docs/_hooks/reference.py`; `scoredistill list` prints the same names "
        "for whatever plugins are installed.",
        "",
        "| role | config section | components |",
        "|---|---|---|",
    ]
    for role, table in reg.components.items():
        links = ", ".join(f"[{code(n)}](#{anchor(role, n)})" for n in sorted(table)) or "—"
        out.append(f"| [{role}](#role-{role.replace('_', '-')}) | {section_of.get(role, '—')} | {links} |")
    out.append("")
    base_class = {r.name: getattr(roles, r.base) for r in ROLE_TABLE}
    role_doc = {r.name: r.summary for r in ROLE_TABLE}
    for role, table in reg.components.items():
        out += [f"## Role `{role}` {{ #role-{role.replace('_', '-')} }}", "", role_doc.get(role, ""), ""]
        base = base_class.get(role)
        if base is not None:
            out += [f"Base class: [`{base.__name__}`][{base.__module__}.{base.__name__}]. Config section: {section_of.get(role, '—')}.", ""]
        if not table:
            out += ["*No component of this role is registered.*", ""]
        for name in sorted(table):
            info = table[name]
            cls = info.cls
            section = next((r.section for r in ROLE_TABLE if r.name == role), role)
            example = {"component": name}
            if role == "generator_loss":
                example["weight"] = 1.0
            out += [
                f"### `{name}` {{ #{anchor(role, name)} }}",
                "",
                docstring(cls),
                "",
                f"- **class**: `{cls.__module__}.{cls.__qualname__}`",
                f"- **paper**: {cell(info.paper)}",
                f"- **select it**: `{section}: {{component: {name}}}`"
                + (" (weight defaults to 1.0)" if role == "generator_loss" else ""),
            ]
            if getattr(cls, "needs_pairs", False):
                out.append("- **needs pairs**: yes: the run builds the `pairs` section's source and passes `batch.z_ref`, `batch.y_ref`")
            out += ["", "**Settings**", "", fields_table(info.config_model)]
    return "\n".join(out)


def methods_page() -> str:
    from scoredistill.config import resolve
    from scoredistill.errors import UserError

    p = project()
    reg = p.registry
    out = [
        "# Methods",
        "",
        "A method is data: which component fills each role, with loss weights and settings, "
        "plus the ablations it allows (`--ablate NAME`, each a swap or removal of a component). "
        "The table shows every method and ablation as component choices; "
        "\"preset's\" means the method leaves that role to the preset, \"unused\" that nothing trains or calls it. "
        "Generated from the registry by `python docs/_hooks/reference.py`.",
        "",
        method_table(),
    ]
    for name in sorted(reg.methods):
        m = reg.methods[name]
        out += [
            f"## `{name}`",
            "",
            m.summary,
            "",
            f"- **paper**: {cell(m.paper)}",
            f"- **plugin**: `{p.method_source.get(name, '?')}`",
            f"- **run it**: `scoredistill run {name} --preset toy2d`",
            "",
            "**Method config** (merged over the preset's problem settings, then the preset retunes its loss terms, then ablations, then `--set`):",
            "",
            yaml_block(m.config),
            "",
        ]
        if m.ablations:
            out += ["**Ablations**", "", "| `--ablate` | what it does | drops | replaces |", "|---|---|---|---|"]
            for ab_name, ab in m.ablations.items():
                drops = ", ".join(code(k) for k in ab.drop) or "—"
                repl = "<br>".join(f"{code(k)} → {code(json.dumps(v))}" for k, v in ab.replace.items()) or "—"
                out.append(f"| {code(ab_name)} | {cell(ab.summary)} | {drops} | {repl} |")
            out.append("")
        else:
            out += ["*No ablations.*", ""]
        for preset in sorted(reg.presets):
            try:
                resolved = resolve(reg, name, preset).to_yaml()
                body = f"`scoredistill run {name} --preset {preset}` runs with exactly this config (it is what `config.yaml` records):\n\n```yaml\n{resolved.rstrip()}\n```"
            except UserError as exc:
                body = f"Does not resolve on this preset: {exc}"
            out.append(admonition("example", f"Resolved config on preset {preset}", body))
    return "\n".join(out)


def presets_page() -> str:
    p = project()
    reg = p.registry
    out = [
        "# Presets",
        "",
        "A preset is a problem setting (teacher, networks, budget) that any method runs on: "
        "`--preset NAME`. The method's config is merged over it (the method's role choices and "
        "training settings win), then the preset retunes the loss terms the method has (for example "
        "the regression distance) but never adds one. "
        "Generated from the registry by `python docs/_hooks/reference.py`.",
        "",
        "| preset | summary | plugin |",
        "|---|---|---|",
    ]
    for name in sorted(reg.presets):
        out.append(f"| [`{name}`](#{name.replace('_', '-')}) | {cell(reg.presets[name].summary)} | `{p.preset_source.get(name, '?')}` |")
    out.append("")
    for name in sorted(reg.presets):
        pr = reg.presets[name]
        out += [f"## `{name}` {{ #{name.replace('_', '-')} }}", "", pr.summary, "", yaml_block(pr.config), ""]
    return "\n".join(out)


def config_page() -> str:
    from scoredistill import config as cfgmod

    rc = cfgmod.RunConfig
    out = [
        "# Run config",
        "",
        "Every run is described by one resolved config, validated by pydantic and written to the "
        "run folder as `config.yaml`. Generated from `scoredistill.config` by `python docs/_hooks/reference.py`.",
        "",
        "## How it is assembled",
        "",
        sphinx_roles.convert(inspect.getdoc(cfgmod) or "", context="scoredistill.config"),
        "",
        "## Top-level keys",
        "",
        "| key | what it holds |",
        "|---|---|",
    ]
    component_sections = cfgmod.COMPONENT_SECTIONS
    for key, field in rc.model_fields.items():
        if key in component_sections:
            what = f"a component of role [`{component_sections[key]}`](components.md#role-{component_sections[key].replace('_', '-')}): `component: NAME` plus its settings"
            if not field.is_required():
                what += " (optional: `null` when the method has none)"
        elif key == cfgmod.LOSS_SECTION:
            what = "term name → a component of role [`generator_loss`](components.md#role-generator-loss) with `weight` (default 1.0) and its settings"
        elif key in ("train", "eval", "runtime"):
            what = f"shared settings, see [`{key}`](#{key})"
        else:
            what = f"{type_name(field.annotation)}" + (f"; {field.description}" if field.description else "")
        out.append(f"| {code(key)} | {cell(what)} |")
    out.append("")
    for key in ("train", "eval", "runtime"):
        model = rc.model_fields[key].annotation
        out += [f"## `{key}` {{ #{key} }}", "", docstring(model), "", fields_table(model)]
    out += [
        "## Overriding from the command line",
        "",
        "`--set key=value` reaches any key above, with YAML-typed values, for example "
        "`--set train.steps=500`, `--set losses.regression.weight=0.5`, "
        "`--set teacher.weights=[0.5,0.5]`, `--set fake_score_loss=null`. "
        "An unknown key fails at once with the keys allowed there.",
        "",
    ]
    return "\n".join(out)


def _action_row(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(code(o) for o in action.option_strings)
        if action.nargs != 0:
            names += f" {code(action.metavar or action.dest.upper())}"
    else:
        names = code(action.metavar or action.dest)
    default = action.default
    if isinstance(action, argparse._AppendAction) or action.nargs == 0 or default in (None, argparse.SUPPRESS) or action.required:
        default_s = "required" if action.required else "—"
    else:
        default_s = code(default)
    repeat = " (repeatable)" if isinstance(action, argparse._AppendAction) and "repeatable" not in (action.help or "") else ""
    return f"| {names} | {cell((action.help or '') + repeat)} | {default_s} |"


def _usage(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return parser.format_usage().strip()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _command_sections(sub_action: argparse._SubParsersAction, prefix: str) -> list[str]:
    """A section per command, and per action of a command that has its own (``teacher train``)."""
    out: list[str] = []
    helps = {a.dest: a.help for a in sub_action._choices_actions}
    for name, sub in sub_action.choices.items():
        out += [f"## `{prefix}{name}`", "", (helps.get(name) or "").rstrip(".") + ".", "", "```text", _usage(sub), "```", ""]
        actions = [a for a in sub._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if actions:
            out += ["| argument | meaning | default |", "|---|---|---|", *map(_action_row, actions), ""]
        for nested in (a for a in sub._actions if isinstance(a, argparse._SubParsersAction)):
            out += _command_sections(nested, f"{prefix}{name} ")
    return out


def cli_page() -> str:
    from scoredistill import cli

    parser = cli.make_parser()
    out = [
        "# Command line",
        "",
        sphinx_roles.convert(inspect.getdoc(cli) or "", context="scoredistill.cli").split("\n\n", 1)[0],
        "",
        "Generated from `scoredistill.cli.make_parser()` by `python docs/_hooks/reference.py`.",
        "",
        "```text",
        _usage(parser),
        "```",
        "",
        "## Global options",
        "",
        "Given before the command, e.g. `scoredistill -p my_plugin run ...`.",
        "",
        "| option | meaning | default |",
        "|---|---|---|",
    ]
    sub_action = None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub_action = action
        elif not isinstance(action, argparse._HelpAction):
            out.append(_action_row(action))
    out.append("")
    assert sub_action is not None
    out += _command_sections(sub_action, "")
    out += [
        "## Exit status",
        "",
        "`0` on success; `2` for a user mistake (unknown method, bad `--set` key or value, a run folder that "
        "already exists, ...) or a fault of the file system that the user fixes (a full disk, a read-only "
        "`--out`), printed as one line `scoredistill: error: ...` without a traceback, before anything is "
        "written; `1` for a run stopped by a non-finite loss; `130` / `143` when interrupted by SIGINT / SIGTERM "
        "(after saving a checkpoint). Under torchrun, rank 0 prints the line.",
        "",
        "Results (the `done:` line, `compare`'s table, `sample`'s and `export`'s summaries) go to stdout; "
        "progress, warnings and errors to stderr. When stderr is not a terminal, progress is a plain line "
        "at most every ten seconds.",
        "",
    ]
    return "\n".join(out)


def hook_table() -> str:
    """Every hook: kind, arguments, which built-in plugins implement it, first docstring line."""
    from scoredistill import hookspecs

    p = project()
    rows = ["| hook | kind | arguments | implemented by (built-in) | purpose |", "|---|---|---|---|---|"]
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if not name.startswith("scoredistill_"):
            continue
        caller = getattr(p.pm.hook, name)
        opts = caller.spec.opts if caller.spec else {}
        if name.startswith("scoredistill_add_"):
            kind = "registration"
        elif opts.get("firstresult"):
            kind = "role (first result)" if name.startswith("scoredistill_make_") else "picture (first result)"
        else:
            kind = "lifecycle" if name != "scoredistill_configure" else "configuration"
        args = ", ".join(code(a) for a in inspect.signature(fn).parameters)
        impls = ", ".join(sorted({i.plugin_name for i in caller.get_hookimpls()})) or "—"
        summary = (inspect.getdoc(fn) or "").split("\n\n")[0]
        rows.append(f"| [{code(name)}][scoredistill.hookspecs.{name}] | {kind} | {args or '—'} | {impls} | {cell(sphinx_roles.convert(summary, 'scoredistill.hookspecs'))} |")
    order = {"registration": 0, "configuration": 1, "role (first result)": 2, "lifecycle": 3, "picture (first result)": 4}
    head, body = rows[:2], rows[2:]
    body.sort(key=lambda r: order.get(r.split("|")[2].strip(), 9))
    return "\n".join(head + body) + "\n"


def run_files() -> str:
    """The run folder's file names, as the run folder's module defines them."""
    from scoredistill import run_dir

    names = {k: v for k, v in vars(run_dir).items() if k.endswith("_FILE") and isinstance(v, str)}
    return ", ".join(code(v) for v in names.values()) + "\n"


GENERATED: dict[str, Callable[[], str]] = {
    "reference/components.md": components_page,
    "reference/methods.md": methods_page,
    "reference/presets.md": presets_page,
    "reference/config.md": config_page,
    "reference/cli.md": cli_page,
}

MARKERS: dict[str, Callable[[str], str]] = {
    "method-table": lambda page: method_table(prefix=_prefix(page)),
    "hook-table": lambda page: hook_table(),
    "run-files": lambda page: run_files(),
}
#: ``<!-- generated: NAME -->`` then the generated text then ``<!-- end generated -->`` (the end is added if missing)
MARKER = re.compile(r"^<!-- generated: (?P<name>[\w-]+) -->$(?:(?:(?!<!-- generated:).)*?^<!-- end generated -->$)?",
                    flags=re.MULTILINE | re.DOTALL)


def _prefix(src_uri: str) -> str:
    """Relative path from the page ``src_uri`` (e.g. ``reference/hooks.md``) to the reference folder."""
    depth = src_uri.count("/")
    here = src_uri.rsplit("/", 1)[0] if depth else ""
    return "" if here == "reference" else "../" * depth + "reference/"


# --------------------------------------------------------------------------- MkDocs events


@event_priority(100)  # before mkdocstrings reads its handler options
def on_config(config: Any) -> Any:
    """Load the Sphinx-role Griffe extension (an absolute path: mkdocs may run from any folder)."""
    plugin = config.plugins.get("mkdocstrings")
    if plugin is not None:
        python = plugin.config.handlers.setdefault("python", {})
        extensions = python.setdefault("options", {}).setdefault("extensions", [])
        path = str(Path(__file__).with_name("sphinx_roles.py"))
        if path not in extensions:
            extensions.append(path)
    return config


def on_files(files: Files, config: Any) -> Files:
    for path in GENERATED:
        if files.get_file_from_path(path) is None:
            raise SystemExit(f"docs/{path} is missing; write it with: {REFRESH}")
    return files


# --------------------------------------------------------------------------- committed copies

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REFRESH = "python docs/_hooks/reference.py"
#: pages with ``<!-- include ... -->`` regions
INCLUDED = ("tutorial.md", "results.md")
HEADER = "<!-- Generated from the code by {refresh}: do not edit; run it again after changing the code. -->\n\n"
INCLUDE = re.compile(r"^(?P<indent>[ ]*)<!-- include(?: (?P<lang>\w+))?: (?P<refs>[^>]+?) -->\n.*?^(?P=indent)<!-- end include -->$",
                     flags=re.MULTILINE | re.DOTALL)


def snippet(ref: str) -> str:
    """The text ``ref`` names: ``FILE``, ``FILE:SECTION`` (between ``--8<-- [start:SECTION]`` and ``[end:SECTION]``),
    or ``FILE:N:`` / ``FILE:N:M`` (lines N to M, from 1); the ``--8<--`` marker lines left out."""
    path, _, rest = ref.strip().partition(":")
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    if rest and re.fullmatch(r"\d+:\d*", rest):
        start, end = rest.split(":")
        lines = lines[int(start) - 1: int(end) if end else None]
    elif rest:
        marks = [i for i, line in enumerate(lines) if f"--8<-- [start:{rest}]" in line or f"--8<-- [end:{rest}]" in line]
        if len(marks) != 2:
            raise SystemExit(f"{path} has no section '{rest}' (--8<-- [start:{rest}] ... [end:{rest}])")
        lines = lines[marks[0] + 1: marks[1]]
    return "\n".join(line for line in lines if "--8<-- [" not in line).strip("\n")


def with_includes(markdown: str) -> str:
    """``markdown`` with every include region filled from the files it names."""

    def fill(m: re.Match) -> str:
        indent, lang, refs = m["indent"], m["lang"], m["refs"]
        body = "\n\n".join(snippet(r) for r in refs.split(","))
        if lang:
            body = f"```{lang}\n{body}\n```"
        body = "\n".join(indent + line if line.strip() else "" for line in body.splitlines())
        head = f"{indent}<!-- include{' ' + lang if lang else ''}: {refs} -->"
        return f"{head}\n\n{body}\n\n{indent}<!-- end include -->"  # blank lines: an HTML comment ends at one

    return INCLUDE.sub(fill, markdown)


def with_generated(markdown: str, src_uri: str) -> str:
    """``markdown`` (the page ``src_uri``) with every ``<!-- generated: NAME -->`` region filled."""

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in MARKERS:
            raise SystemExit(f"docs/{src_uri}: unknown generated marker '{name}'; known: {', '.join(MARKERS)}")
        return f"<!-- generated: {name} -->\n\n{MARKERS[name](src_uri).strip()}\n\n<!-- end generated -->"

    return MARKER.sub(fill, markdown)


def committed_copies() -> dict[Path, str]:
    """What every generated or included file must hold, by path."""
    out = {DOCS / path: HEADER.format(refresh=REFRESH) + make().rstrip("\n") + "\n" for path, make in GENERATED.items()}
    for name in INCLUDED:
        out[DOCS / name] = with_includes((DOCS / name).read_text(encoding="utf-8"))
    for path in sorted(DOCS.rglob("*.md")):
        rel = path.relative_to(DOCS).as_posix()
        if rel.split("/")[0] in ("_hooks", "examples", "results") or rel in GENERATED:
            continue
        text = out.get(path) or path.read_text(encoding="utf-8")
        if MARKER.search(text):
            out[path] = with_generated(text, rel)
    return out


def stale() -> list[str]:
    """The committed copies that differ from what the code gives now."""
    return [str(path.relative_to(ROOT)) for path, text in committed_copies().items()
            if not path.is_file() or path.read_text(encoding="utf-8") != text]


def refresh() -> list[str]:
    """Write every committed copy that is stale; returns their paths."""
    changed = stale()
    for path, text in committed_copies().items():
        if str(path.relative_to(ROOT)) in changed:
            path.write_text(text, encoding="utf-8")
    return changed


if __name__ == "__main__":
    changed = refresh()
    print("\n".join(f"wrote {c}" for c in changed) or "the reference pages and the included code are current")
