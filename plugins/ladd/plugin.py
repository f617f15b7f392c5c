"""Entry point of the LADD plugin: its components, the ``ladd`` method and a config check."""

from __future__ import annotations

from pathlib import Path

from scoredistill import hookimpl
from scoredistill.errors import UserError
from scoredistill.registry import Method

from scoredistill_ladd.losses import ADDDistillation, LADDAdversarial, LADDDiscriminator

METHOD_DIR = Path(__file__).parent / "methods"


@hookimpl
def scoredistill_add_components() -> list[type]:
    return [LADDAdversarial, LADDDiscriminator, ADDDistillation]


@hookimpl
def scoredistill_add_methods() -> list[Method]:
    return [Method.from_yaml(p) for p in sorted(METHOD_DIR.glob("*.yaml"))]


@hookimpl
def scoredistill_configure(config) -> None:
    terms = {name: spec for name, spec in config.losses.items() if spec.component == "ladd_adversarial"}
    if not terms:
        return
    disc = config.fake_score_loss
    name, spec = next(iter(terms.items()))
    if disc is None or disc.component != "ladd_discriminator":
        raise UserError(f"loss term '{name}' (ladd_adversarial) needs the head that fake_score_loss 'ladd_discriminator' "
                        f"trains, but fake_score_loss is {disc.component if disc is not None else 'none'}")
    if spec.config.loss != disc.config.loss:
        raise UserError(f"losses.{name}.loss is '{spec.config.loss}' but fake_score_loss.loss is '{disc.config.loss}': "
                        "the generator and the discriminator must play the same game (hinge or non_saturating)")
