"""Entry point of the baselines plugin: its components, methods and a config check."""

from __future__ import annotations

from pathlib import Path

from scoredistill import hookimpl
from scoredistill.errors import UserError
from scoredistill.registry import Method

from scoredistill_baselines.gan import FakeScoreDenoiseGAN, GANGenerator
from scoredistill_baselines.losses import IKLGradient, SDSGradient

METHOD_DIR = Path(__file__).parent / "methods"


@hookimpl
def scoredistill_add_components() -> list[type]:
    return [SDSGradient, IKLGradient, GANGenerator, FakeScoreDenoiseGAN]


@hookimpl
def scoredistill_add_methods() -> list[Method]:
    return [Method.from_yaml(p) for p in sorted(METHOD_DIR.glob("*.yaml"))]


@hookimpl
def scoredistill_configure(config) -> None:
    gan_terms = [name for name, spec in config.losses.items() if spec.component == "gan_generator"]
    fake_loss = config.fake_score_loss.component if config.fake_score_loss is not None else None
    if gan_terms and fake_loss != "fake_score_denoise_gan":
        raise UserError(
            f"loss term '{gan_terms[0]}' (gan_generator) needs the discriminator that fake_score_loss "
            f"'fake_score_denoise_gan' trains, but fake_score_loss is {fake_loss or 'none'}"
        )
