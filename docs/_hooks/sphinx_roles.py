"""Render the Sphinx-style cross-references of scoredistill's docstrings in MkDocs.

The code's docstrings use reStructuredText roles (``:class:`~scoredistill.roles.Teacher```)
and literal-block markers (``a package::``). mkdocstrings renders Markdown, so this
module rewrites both:

* a role becomes a link to the object's API entry where the site documents it,
  and plain code otherwise (an *optional* mkdocs-autorefs reference);
* a role naming an object that does not exist is a broken reference: it is
  logged as a warning, which fails ``mkdocs build --strict``;
* ``text::`` before an indented block becomes ``text:`` (the block itself is
  already a Markdown code block).

It is used twice: as a Griffe extension (for the pages mkdocstrings renders) and
by the reference hook (for the component docstrings it writes itself).
"""

from __future__ import annotations

import html
import importlib
import logging
import re
from functools import lru_cache
from typing import Any, Optional, Sequence, Union

import griffe

log = logging.getLogger("mkdocs.plugins.scoredistill_docs")

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|data|attr|mod|exc|obj|const):`(?P<target>[^`]+)`")
LITERAL_MARKER = re.compile(r"(?<=\S)::[ \t]*$", flags=re.MULTILINE)


@lru_cache(maxsize=None)
def exists(path: str) -> bool:
    """Whether the dotted ``path`` names an importable module or something inside one."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if hasattr(obj, attr):
                obj = getattr(obj, attr)
            elif attr == parts[-1] and attr in getattr(obj, "__annotations__", {}):
                return True  # an attribute declared by annotation only
            else:
                return False
        return True
    return False


def resolve(target: str, context: Union[str, Sequence[str], None]) -> Optional[str]:
    """The full dotted path a role's target refers to, or ``None`` if nothing exists there.

    ``target`` is tried as given, then relative to each ``context`` (a dotted path,
    innermost first: a class, then its module) and the context's parent.
    """
    contexts = [context] if isinstance(context, str) else list(context or [])
    candidates = [target]
    for ctx in contexts:
        candidates += [f"{ctx}.{target}", f"{ctx.rsplit('.', 1)[0]}.{target}"]
    for candidate in candidates:
        if exists(candidate):
            return candidate
    return None


def convert(text: str, context: Union[str, Sequence[str], None] = None, where: str = "") -> str:
    """Rewrite Sphinx roles and literal-block markers in ``text`` (a docstring) as Markdown."""

    def role(match: re.Match) -> str:
        raw = match["target"].strip()
        short = raw.startswith("~")
        target = raw.lstrip("~").rstrip("()")
        full = resolve(target, context)
        title = target.rsplit(".", 1)[-1] if short else target
        if full is None:
            log.warning("broken cross-reference %s in the docstring of %s", match.group(0), where or context)
            return f"`{title}`"
        return f'<autoref identifier="{html.escape(full)}" optional><code>{html.escape(title)}</code></autoref>'

    return LITERAL_MARKER.sub(":", ROLE.sub(role, text))


class SphinxRoles(griffe.Extension):
    """Griffe extension: convert every loaded docstring with :func:`convert`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        contexts = [obj.path] if obj.is_class or obj.is_module else []
        contexts += [p.path for p in _parents(obj)]
        obj.docstring.value = convert(obj.docstring.value, context=contexts, where=obj.path)


def _parents(obj: griffe.Object) -> list[griffe.Object]:
    out = []
    while obj.parent is not None:
        obj = obj.parent
        out.append(obj)
    return out
