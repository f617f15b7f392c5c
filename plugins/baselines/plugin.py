"""Entry point of the baselines plugin: its components and methods."""

from __future__ import annotations

from pathlib import Path

from scoredistill import hookimpl
from scoredistill.registry import Method

METHOD_DIR = Path(__file__).parent / "methods"


@hookimpl
def scoredistill_add_methods() -> list[Method]:
    return [Method.from_yaml(p) for p in sorted(METHOD_DIR.glob("*.yaml"))]
