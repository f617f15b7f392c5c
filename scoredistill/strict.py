"""Strict reading of user-given config values, and pydantic's errors as one line.

Pydantic's lax mode takes YAML's ``true`` as 1 and ``1e30`` as an integer; a typo of that kind
would run one step or forever. :func:`check_strict_numbers` refuses both before validation, and
:func:`format_validation_error` turns a validation error into the one line a user sees (an unknown
key lists the keys allowed there).
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ValidationError

from scoredistill.errors import UserError


def format_validation_error(err: ValidationError, prefix: str, model: type[BaseModel]) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in (prefix, *e["loc"]) if str(p))
    if e["type"] == "extra_forbidden":
        node: Any = model
        for part in e["loc"][:-1]:
            field = getattr(node, "model_fields", {}).get(part)
            node = getattr(field, "annotation", None)
        fields = sorted(getattr(node, "model_fields", {}) or [])
        return f"unknown config key '{loc}'; allowed here: {', '.join(fields) or '(none)'}"
    given = e.get("input")
    shown = f" (got {given!r})" if not isinstance(given, dict) and e["type"] != "missing" else ""
    return f"invalid config value '{loc}': {e['msg']}{shown}"


def number_kind(annotation: Any) -> Optional[type]:
    """``int`` or ``float`` for a field typed ``int`` / ``float`` (also inside ``Optional``/``Annotated``), else None."""
    args = typing.get_args(annotation)
    if annotation in (int, float):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, Annotated):
        kinds = {number_kind(a) for a in args if a is not type(None)} - {None}
        return kinds.pop() if len(kinds) == 1 else None
    return None


def check_strict_numbers(model: type[BaseModel], raw: Any, prefix: str) -> None:
    """Strict numbers in ``raw`` for ``model``: no boolean where a number goes (YAML's ``true`` is not 1), no
    fractional or huge float (``1e30``) where an integer goes. Pydantic's lax mode would take both."""
    if not isinstance(raw, dict):
        return
    for key, value in raw.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue
        where = f"{prefix}.{key}" if prefix else key
        nested = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        if nested is not None:
            check_strict_numbers(nested, value, where)
            continue
        kind = number_kind(field.annotation)
        if kind is not None and isinstance(value, bool):
            raise UserError(f"invalid config value '{where}': expected a number, not a boolean (got {value!r})")
        if kind is int and isinstance(value, float):
            raise UserError(f"invalid config value '{where}': expected an integer (got {value!r})")
