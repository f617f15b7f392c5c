"""The generator step's one batched call ``G(cat(z, z_ref))`` computes what two separate passes compute."""

from __future__ import annotations

import copy

import pytest
import torch

from scoredistill import trainer
from scoredistill.config import resolve

SMALL = ["train.steps=10", "pairs.num_pairs=300", "train.batch_size=64", "train.pair_batch_size=32",
         "runtime.progress=false", "train.sample_every=null", "train.grad_clip=null"]


@pytest.mark.parametrize("ablations", [[], ["distribution_matching"]])
def test_regression_term_and_gradient_equal_a_separate_pass_of_g_on_z_ref(hooks, tmp_path, ablations):
    config = resolve(hooks.registry, "dmd", "toy2d", ablations, SMALL)
    run = trainer.build(config, hooks, tmp_path)
    trainer.setup(run)
    g0 = copy.deepcopy(run.models.generator)
    rng = torch.get_rng_state()
    _, _, terms = trainer.generator_step(run)

    torch.set_rng_state(rng)  # the trainer's draws, in its order: z, then the pairs' indices
    z = torch.randn((run.batch_size, *g0.latent_shape))
    z_ref, y_ref, _ = run.pairs.sample(run.pair_batch_size)
    assert len(z) == 64 and len(z_ref) == 32
    regression = ((g0(z_ref) - y_ref) ** 2).mean()  # DMD eq. 9 with L2, by hand on a copy of the pre-step weights
    assert terms["regression"].item() == pytest.approx(regression.item(), rel=1e-5)
    if ablations:  # regression alone: the step's gradient is the weighted regression gradient, nothing else
        weight = run.config.losses["regression"].weight
        expected = torch.autograd.grad(weight * regression, list(g0.parameters()))
        for got, want in zip((p.grad for p in run.models.generator.parameters()), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
