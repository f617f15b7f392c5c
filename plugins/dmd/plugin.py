"""Entry point of the DMD plugin: its components and the ``dmd`` method."""

from __future__ import annotations

from pathlib import Path

from scoredistill import hookimpl
from scoredistill.registry import Method

from scoredistill_dmd.losses import FakeScoreDenoise, KLGradient, L2Regression, PseudoHuberRegression
from scoredistill_dmd.lpips_regression import LPIPSRegression

METHOD_DIR = Path(__file__).parent / "methods"


@hookimpl
def scoredistill_add_components() -> list[type]:
    return [KLGradient, FakeScoreDenoise, L2Regression, PseudoHuberRegression, LPIPSRegression]


@hookimpl
def scoredistill_add_methods() -> list[Method]:
    return [Method.from_yaml(p) for p in sorted(METHOD_DIR.glob("*.yaml"))]
