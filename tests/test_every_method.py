"""Every registered method and each of its ablations trains on toy2d (timm-style: over the registry)."""

from __future__ import annotations

import math

import pytest

from scoredistill.config import resolve
from scoredistill.errors import UserError
from scoredistill.plugins import Hooks, make_plugin_manager
from scoredistill.runner import execute

TINY = ["train.steps=6", "train.fake_score_warmup_steps=2", "train.batch_size=32", "train.log_every=2",
        "pairs.num_pairs=64", "eval.num_samples=200", "runtime.progress=false"]


def _variants():
    reg = Hooks(make_plugin_manager()).registry
    for name, method in sorted(reg.methods.items()):
        yield name, ()
        for ablation in method.ablations:
            yield name, (ablation,)


@pytest.mark.parametrize("method, ablations", list(_variants()), ids=lambda v: ",".join(v) if isinstance(v, tuple) else v)
def test_method_trains_on_toy2d(hooks, tmp_path, method, ablations):
    try:
        config = resolve(hooks.registry, method, "toy2d", list(ablations), TINY)
    except UserError as exc:  # an ablation may leave nothing to train: that must be said, not crash
        assert "nothing would train the generator" in str(exc)
        return
    result = execute(config, hooks, tmp_path / "run")
    assert result is not None
    history = result.run.history
    assert history and all(math.isfinite(v) for record in history for v in record.values())
    assert set(config.losses) <= set(history[-1])
    assert result.metrics["non_finite"] == 0
