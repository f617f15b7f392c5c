"""Samples of a run's generator (one step, or a few-step generator's chain): seeded, in eval mode, outside the compiled graphs."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from scoredistill.roles import seeded_conditions
from scoredistill.run import Run


def generate(run: Run, n: int, seed: int, batch_size: int = 4096, steps: Optional[int] = None,
             guidance: Optional[float] = None) -> torch.Tensor:
    """``n`` samples of the run's generator (EMA weights where kept) from a fixed seed, in ``steps`` steps
    (default: the generator's ``sampling_steps``, 1 for a one-step generator), at the guidance scale ``guidance`` of a
    generator conditioned on it (default: its own).

    A conditional teacher's runs sample with :func:`~scoredistill.roles.seeded_conditions` (the
    same conditions the evaluation gives the teacher's own sampler).
    """
    cond = seeded_conditions(run.models.teacher, n, seed)
    with eager(run.config.runtime.compile):
        return one_step_samples(run.sampling_generator, n, seed, run.device, batch_size, cond, steps, guidance)


@contextlib.contextmanager
def eager(compiled: bool = True) -> Iterator[None]:
    """Within: networks compiled by ``runtime.compile`` run eagerly (torch 2.6+; a no-op before).

    The compiled graphs are for the training step's shapes. Samples and evaluation come in other
    batch sizes, and each new shape would cost another compile (minutes on a GPU) for a few calls.
    ``compiled=False`` (nothing was compiled) skips the stance change, which costs about 0.4 ms.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or not compiled:
        yield
        return
    with set_stance("force_eager"):
        yield


@torch.no_grad()
def one_step_samples(generator: nn.Module, n: int, seed: int, device: Optional[torch.device] = None,
                     batch_size: int = 4096, cond: Optional[Tensor] = None, steps: Optional[int] = None,
                     guidance: Optional[float] = None) -> torch.Tensor:
    """``G(z, cond)`` for ``n`` noises from ``seed`` (independent of the training RNG), in eval mode; float32 on the CPU.

    ``cond``: ``n`` conditions (``None``: unconditional). ``steps``: a few-step generator's chain length
    (:meth:`~scoredistill.roles.Generator.sample`; its re-noising noise is drawn from the same seed). ``guidance``: the
    guidance scale of a generator that takes one (``takes_guidance_scale``).
    """
    extra = {} if guidance is None else {"guidance": guidance}  # only a generator that takes one is given it
    was_training = generator.training
    if was_training:  # (train() walks every submodule: skipped for the EMA copy, which stays in eval mode)
        generator.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        z = torch.randn((min(batch_size, n - start), *generator.latent_shape), generator=gen).to(device or "cpu")
        c = cond[start : start + len(z)].to(z.device) if cond is not None else None
        noise = (lambda shape=z.shape, where=z.device: torch.randn(shape, generator=gen).to(where))
        out.append(generator.sample(z, c, steps, noise, **extra).float().cpu())
    if was_training:
        generator.train()
    return out[0] if len(out) == 1 else torch.cat(out)
