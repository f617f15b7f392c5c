"""The shape of the code base: the core's import graph has no cycle, plugins import only the core,
the core asks no teacher for its type, files fit a screen or two, and a plugin can be blocked."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from scoredistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "scoredistill"
#: the method plugins under plugins/ (import package -> folder), as pyproject.toml installs them
PLUGIN_PACKAGES = {name: ROOT / folder for name, folder in re.findall(r'"(scoredistill_\w+)" = "(plugins/\w+)"',
                                                                     (ROOT / "pyproject.toml").read_text())}
#: folders under scoredistill/ that are built-in plugins, not core
CORE_PLUGIN_FOLDERS = ("images", "toy2d")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (``TYPE_CHECKING`` blocks and function bodies included).

    ``from a import b`` counts as importing ``a.b`` where that is a module, else ``a``.
    """
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def core_import_graph() -> dict[str, set[str]]:
    """The import graph among the core's modules (``scoredistill`` less its built-in plugin folders)."""
    files = {module_name(p): p for p in CORE.rglob("*.py")
             if p.relative_to(CORE).parts[0] not in CORE_PLUGIN_FOLDERS}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = imported_modules(path, package)
        # ``from scoredistill import x`` names the module scoredistill.x, not the package's __init__
        deps = {d for d in deps if d in files and d != name and not (d == "scoredistill" and any(
            o.startswith("scoredistill.") and o in files for o in deps))}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a list of nodes (first == last), or ``[]`` (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_core_import_graph_has_no_cycle():
    graph = core_import_graph()
    assert {"scoredistill.trainer", "scoredistill.roles", "scoredistill.hookspecs", "scoredistill.plugins"} <= set(graph)
    cycle = find_cycle(graph)
    assert not cycle, "import cycle among core modules: " + " -> ".join(cycle)


def test_no_plugin_imports_another_plugins_modules():
    plugins = {**PLUGIN_PACKAGES, **{f"scoredistill.{f}": CORE / f for f in CORE_PLUGIN_FOLDERS}}
    for name, folder in plugins.items():
        for path in folder.rglob("*.py"):
            if "tests" in path.relative_to(folder).parts:
                continue
            for dep in imported_modules(path, name):
                others = [o for o in plugins if o != name and (dep == o or dep.startswith(o + "."))]
                assert not others, f"{path.relative_to(ROOT)} imports {dep} (plugin {others[0]}): shared code belongs in the core"


def test_the_core_asks_no_teacher_for_its_type():
    teachers = {"GaussianMixtureTeacher", "ImageTeacher", "DigitsTeacher", "DiffusersTeacher"}
    for path in CORE.rglob("*.py"):
        if path.relative_to(CORE).parts[0] in CORE_PLUGIN_FOLDERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} if len(node.args) == 2 else set()
                assert not names & teachers, f"{path.relative_to(ROOT)}:{node.lineno} asks isinstance of {names & teachers}"


def test_the_run_and_the_hooks_are_what_the_views_promise():
    from scoredistill.plugins import Hooks
    from scoredistill.roles import ComponentSource
    from scoredistill.run import Run
    from scoredistill.views import RunView

    def members(protocol: type) -> set[str]:
        return {n for n in vars(protocol) if not n.startswith("_")}

    assert members(RunView) >= {"config", "dir", "models", "history", "step"}
    for name in members(RunView):
        assert name in Run.__dataclass_fields__ or isinstance(getattr(Run, name, None), property), f"Run has no {name}"
    for name in members(ComponentSource):
        assert isinstance(getattr(Hooks, name, None), property), f"Hooks has no {name}"


def test_core_files_fit_a_screen_or_two():
    for path in CORE.glob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 400, f"{path.relative_to(ROOT)} has {lines} lines (at most 400)"


def test_the_contributing_map_matches_the_tree():
    text = (ROOT / "docs" / "contributing.md").read_text()
    table = text[text.index("## Where things are"):text.index("## Tests")]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = {path for cell in first_cells for path in re.findall(r"`([^`]+)`", cell)}
    for path in sorted(named):
        assert (ROOT / path).exists(), f"docs/contributing.md names {path}, which does not exist"
    wanted = {f"scoredistill/{p.name}" for p in CORE.glob("*.py")}
    wanted |= {f"scoredistill/{p.name}/" for p in CORE.iterdir() if (p / "__init__.py").is_file()}
    wanted |= {f"plugins/{p.name}/" for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").is_file()}
    missing = sorted(wanted - named)
    assert not missing, f"docs/contributing.md's map of the code does not name {', '.join(missing)}"


@pytest.mark.slow
def test_baselines_run_with_the_dmd_plugin_blocked(tmp_path):
    out = tmp_path / "sds"
    assert main(["-p", "no:dmd", "run", "sds", "--preset", "toy2d", "--out", str(out), "--quiet", "--set", "train.steps=5",
                 "--set", "eval.num_samples=200"]) == 0
    assert json.loads((out / "metrics.json").read_text())["method"] == "sds"
    assert main(["-p", "no:dmd", "list"]) == 0


def test_a_name_a_blocked_plugin_provides_is_refused_naming_the_blocked_plugin(tmp_path, capsys):
    # regression is a baseline, its l2_regression component is the dmd plugin's
    assert main(["-p", "no:dmd", "run", "regression", "--preset", "toy2d", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown generator_loss component 'l2_regression'" in err[0]
    assert err[0].endswith("blocked plugins, which may provide it: dmd")
    assert not (tmp_path / "r").exists()
    assert main(["run", "nosuchmethod", "--preset", "toy2d", "--out", str(tmp_path / "n"), "--quiet"]) == 2
    assert "blocked" not in capsys.readouterr().err
