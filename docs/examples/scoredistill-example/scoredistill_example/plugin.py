"""Entry point of the example plugin: the hooks scoredistill calls.

The entry point in ``pyproject.toml`` names this module. scoredistill imports it,
registers it with its plugin manager and calls the hooks it implements. Only
functions marked with ``@hookimpl`` and named like a hook in
``scoredistill.hookspecs`` count; everything else here is ignored.
"""

from __future__ import annotations

from pathlib import Path

from scoredistill import hookimpl
from scoredistill.registry import Method

from scoredistill_example.losses import ScoreIdentityFisher

METHOD_DIR = Path(__file__).parent / "methods"


@hookimpl
def scoredistill_add_components() -> list[type]:
    # The classes, not instances: scoredistill builds them when a run needs them.
    return [ScoreIdentityFisher]


@hookimpl
def scoredistill_add_methods() -> list[Method]:
    # A method is data; each YAML file in methods/ is one method.
    return [Method.from_yaml(path) for path in sorted(METHOD_DIR.glob("*.yaml"))]
