"""Entry point of the SiD plugin: its components, the ``sid`` and ``sida`` methods and a config check."""

from __future__ import annotations

from pathlib import Path

from scoredistill import hookimpl
from scoredistill.errors import UserError
from scoredistill.registry import Method

from scoredistill_sid.sid import ScoreIdentity
from scoredistill_sid.sida import SiDAAdversarial, SiDAFakeScore

METHOD_DIR = Path(__file__).parent / "methods"


@hookimpl
def scoredistill_add_components() -> list[type]:
    return [ScoreIdentity, SiDAAdversarial, SiDAFakeScore]


@hookimpl
def scoredistill_add_methods() -> list[Method]:
    return [Method.from_yaml(p) for p in sorted(METHOD_DIR.glob("*.yaml"))]


@hookimpl
def scoredistill_configure(config) -> None:
    terms = [name for name, spec in config.losses.items() if spec.component == "sida_adversarial"]
    fake_loss = config.fake_score_loss.component if config.fake_score_loss is not None else None
    if terms and fake_loss != "sida_fake_score":
        raise UserError(f"loss term '{terms[0]}' (sida_adversarial) needs the discriminator head that fake_score_loss "
                        f"'sida_fake_score' trains, but fake_score_loss is {fake_loss or 'none'}")
