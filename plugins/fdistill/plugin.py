"""Entry point of the f-distill plugin: its component, the ``fdistill`` method and a config check."""

from __future__ import annotations

from pathlib import Path

from scoredistill import hookimpl
from scoredistill.errors import UserError
from scoredistill.registry import Method

from scoredistill_fdistill.losses import FDivergenceGradient

METHOD_DIR = Path(__file__).parent / "methods"


@hookimpl
def scoredistill_add_components() -> list[type]:
    return [FDivergenceGradient]


@hookimpl
def scoredistill_add_methods() -> list[Method]:
    return [Method.from_yaml(p) for p in sorted(METHOD_DIR.glob("*.yaml"))]


@hookimpl
def scoredistill_configure(config) -> None:
    terms = [name for name, spec in config.losses.items() if spec.component == "f_divergence_gradient"]
    fake_loss = config.fake_score_loss.component if config.fake_score_loss is not None else None
    if terms and fake_loss != "fake_score_denoise_gan":
        raise UserError(f"loss term '{terms[0]}' (f_divergence_gradient) reads the density ratio from the discriminator "
                        f"that fake_score_loss 'fake_score_denoise_gan' trains, but fake_score_loss is {fake_loss or 'none'}")
