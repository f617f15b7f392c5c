"""Entry point of the consistency plugin: the few-step generator, the CD/LCM and sCM losses, and their methods."""

from __future__ import annotations

from pathlib import Path

from scoredistill import hookimpl
from scoredistill.registry import Method

from scoredistill_consistency.generator import FewStepGenerator
from scoredistill_consistency.losses import ConsistencyDistillation, ContinuousConsistency
from scoredistill_consistency.parts import EMATarget, KarrasGrid, TeacherGrid

METHOD_DIR = Path(__file__).parent / "methods"


@hookimpl
def scoredistill_add_components() -> list[type]:
    return [FewStepGenerator, ConsistencyDistillation, ContinuousConsistency, EMATarget, KarrasGrid, TeacherGrid]


@hookimpl
def scoredistill_add_methods() -> list[Method]:
    return [Method.from_yaml(p) for p in sorted(METHOD_DIR.glob("*.yaml"))]
