"""The documentation site builds with ``mkdocs build --strict`` and covers the code.

The reference pages are written from the code and committed (docs/_hooks/reference.py), and
so is the code the tutorial shows; these tests check that the committed copies are current,
that the build passes, that the pages name every registered component, method, preset, hook
and command, and that the hand-written run-folder page describes every file and metric the
code writes.
"""

from __future__ import annotations

import importlib.util
from html import unescape
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

for _module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
    if importlib.util.find_spec(_module.split(".")[0]) is None or importlib.util.find_spec(_module) is None:
        pytest.skip(
            f"the docs toolchain is not installed ({_module} is missing): pip install -e '.[docs]'",
            allow_module_level=True,
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return out


@pytest.fixture(scope="module")
def project():
    """The docs hook's view of the built-in plugins (the same registry the pages came from)."""
    spec = importlib.util.spec_from_file_location("scoredistill_docs_reference", DOCS / "_hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.project()


def page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text()


def test_every_registered_component_has_a_section_with_its_docstring(site, project):
    html = page(site, "reference/components")
    for role, table in project.registry.components.items():
        for name, info in table.items():
            anchor = f"{role}-{name}".replace("_", "-")
            assert f'id="{anchor}"' in html, f"component {role}/{name} is missing from the reference"
            assert info.summary and _plain(info.summary) in _text(html), f"docstring of {name} is missing"
            for field in info.config_model.model_fields:
                assert f"<code>{field}</code>" in html, f"setting {name}.{field} is missing"


def test_every_method_ablation_and_preset_is_documented(site, project):
    methods, presets, concepts = page(site, "reference/methods"), page(site, "reference/presets"), page(site, "concepts")
    for name, method in project.registry.methods.items():
        assert f"<code>{name}</code>" in methods and f"<code>{name}</code>" in concepts
        for ablation in method.ablations:
            assert f"--ablate {ablation}" in methods, f"ablation {name}:{ablation} is missing"
    for name in project.registry.presets:
        assert f'id="{name.replace("_", "-")}"' in presets


def test_every_hook_is_documented_with_its_docstring(site):
    from scoredistill import hookspecs

    html = page(site, "reference/hooks")
    for name in dir(hookspecs):
        if name.startswith("scoredistill_"):
            assert f'id="scoredistill.hookspecs.{name}"' in html, f"hook {name} is missing"
            first_line = getattr(hookspecs, name).__doc__.strip().splitlines()[0]
            assert _plain(first_line)[:40] in _text(html), f"docstring of hook {name} is missing"


def test_every_command_and_option_is_documented(site):
    import argparse

    from scoredistill.cli import make_parser

    html = page(site, "reference/cli")
    parser = make_parser()

    def commands(p: argparse.ArgumentParser, prefix: str = ""):  # nested ones too: 'teacher train'
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{prefix}{name}", sub
                    yield from commands(sub, f"{prefix}{name} ")

    found = list(commands(parser))
    assert "teacher train" in dict(found)
    for command, subparser in found:
        assert f'id="{command.replace(" ", "-")}"' in html, f"command {command} is missing"
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert f"<code>{option}</code>" in html, f"option {command} {option} is missing"


def test_the_run_folder_page_describes_every_file_and_metric():
    import torch

    from scoredistill import run_dir
    from scoredistill.testing import mixture
    from scoredistill.toy2d.toy_metrics import mixture_metrics

    text = (DOCS / "reference" / "run-folder.md").read_text()
    text = text.replace("<!-- generated: run-files -->", "")
    for constant, filename in vars(run_dir).items():
        if constant.endswith("_FILE") and isinstance(filename, str):
            assert f"`{filename}`" in text, f"{filename} ({constant}) is not described in docs/reference/run-folder.md"
    teacher = mixture([[1.0, 0.0], [-1.0, 0.0]], [0.3, 0.3], [0.5, 0.5])
    metrics = mixture_metrics(teacher, teacher.sample(50, generator=torch.Generator().manual_seed(0)))
    for key in metrics:
        assert f"`{key}`" in text, f"metric {key} is not described in docs/reference/run-folder.md"


def test_the_tutorial_shows_every_file_of_the_example_package():
    tutorial = (DOCS / "tutorial.md").read_text()
    example = DOCS / "examples" / "scoredistill-example"
    for path in sorted(example.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".toml", ".yaml") and path.name != "__init__.py":
            rel = path.relative_to(ROOT).as_posix()
            assert re.search(rf"<!-- include \w+: (.*, )?{re.escape(rel)}", tutorial), f"the tutorial does not show {rel}"


def test_the_committed_reference_pages_and_listings_are_current(project):
    import scoredistill_docs_reference as reference

    assert reference.stale() == [], f"stale: refresh them with: {reference.REFRESH}"
    for name in reference.INCLUDED:  # plain Markdown: no include line is left for a build to expand
        assert "--8<-- \"" not in (DOCS / name).read_text()


def test_a_stale_copy_is_found_and_refreshed(project, tmp_path, monkeypatch):
    import scoredistill_docs_reference as reference

    page = DOCS / "reference" / "presets.md"
    tutorial = DOCS / "tutorial.md"
    saved = {p: p.read_text() for p in (page, tutorial)}
    try:
        page.write_text(saved[page].replace("# Presets", "# Presets (edited by hand)"))
        tutorial.write_text(saved[tutorial].replace("class Config(BaseModel):", "class Config(Base):", 1))
        assert reference.stale() == ["docs/reference/presets.md", "docs/tutorial.md"]
        assert reference.refresh() == ["docs/reference/presets.md", "docs/tutorial.md"]
        assert {p: p.read_text() for p in saved} == saved
    finally:
        for p, text in saved.items():
            p.write_text(text)


def test_settings_tables_keep_their_columns_where_a_type_is_a_choice_or_optional():
    text = (DOCS / "reference" / "components.md").read_text() + (DOCS / "reference" / "config.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert any('"stop" \\| "skip"' in row for row in rows) and any("int \\| None" in row for row in rows)
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row)[1:-1]
        assert len(cells) in (2, 3, 5), row


def _text(html: str) -> str:
    """Visible text, whitespace-normalised (for comparing docstrings with rendered HTML)."""
    return " ".join(unescape(re.sub(r"<[^>]+>", "", html)).split())


def _plain(markup: str) -> str:
    """A docstring line without its inline markup (code spans, emphasis)."""
    return " ".join(markup.replace("`", "").replace("*", "").split())


def test_sphinx_roles_become_links_and_a_broken_one_is_a_warning(caplog):
    spec = importlib.util.spec_from_file_location("scoredistill_docs_roles", DOCS / "_hooks" / "sphinx_roles.py")
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)

    out = roles.convert("Built with :class:`~scoredistill.roles.BuildContext` and a package::", context="scoredistill.hookspecs")
    assert '<autoref identifier="scoredistill.roles.BuildContext" optional><code>BuildContext</code></autoref>' in out
    assert out.endswith("a package:")
    assert "identifier=\"scoredistill.roles.Teacher.forward\"" in roles.convert(":meth:`forward`", context=["scoredistill.roles.Teacher"])
    with caplog.at_level("WARNING", logger="mkdocs.plugins.scoredistill_docs"):
        assert roles.convert(":func:`scoredistill.nothing_here`") == "`scoredistill.nothing_here`"
    assert "broken cross-reference" in caplog.text
