"""A new teacher family, added by a plugin in tests/ (``tests/plugins/tiny_family.py``), runs the stock methods.

The plugin registers the teacher component ``tiny_x0`` and nothing else: no core file knows its
name, its network class or its parameterisation. ``dmd``, ``regression`` and ``dmd2`` then run on it
from the command line with the stock generator (``unet_generator``) and fake score (``unet_denoiser``),
which start from the teacher's own trainable copies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scoredistill.cli import main

PLUGIN_DIR = Path(__file__).parent / "plugins"
RUN = ["teacher.component=tiny_x0", "generator.component=unet_generator", "fake_score.component=unet_denoiser",
       "pairs.num_pairs=8", "pairs.steps=3", "pairs.batch_size=8", "train.batch_size=4", "train.pair_batch_size=4",
       "train.steps=2", "train.fake_score_warmup_steps=0", "eval.num_samples=8", "runtime.progress=false"]


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    return "tiny_family"


@pytest.mark.parametrize("method", ["dmd", "regression", "dmd2"])
def test_a_plugin_teacher_family_runs_the_stock_methods(plugin, method, tmp_path, capsys):
    out = tmp_path / method
    sets = [a for o in RUN + (["train.fake_updates_per_step=2"] if method == "dmd2" else []) for a in ("--set", o)]
    assert main(["-p", plugin, "run", method, "--preset", "digits", "--out", str(out), "--quiet", *sets]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["non_finite"] == 0 and metrics["num_samples"] == 8
    assert metrics["teacher"]["nfe"] == 5  # the teacher's own sampler (3 Heun steps), through the Teacher defaults


def test_the_copies_are_the_teachers_network_and_train_apart(plugin, hooks, tmp_path):
    from scoredistill.config import resolve
    from scoredistill.plugins import Hooks, make_plugin_manager
    from scoredistill.roles import BuildContext

    hooks = Hooks(make_plugin_manager(plugins=[plugin]))
    config = resolve(hooks.registry, "dmd", "digits", [], RUN)
    ctx = BuildContext(hooks=hooks, cache_dir=tmp_path)
    teacher = ctx.teacher = hooks.make_teacher(spec=config.teacher, ctx=ctx)
    generator = hooks.make_generator(spec=config.generator, ctx=ctx)
    fake = hooks.make_fake_score(spec=config.fake_score, ctx=ctx)
    z, s = torch.randn(3, 1, 8, 8), torch.full((3,), teacher.sigma_max)
    with torch.no_grad():
        assert torch.allclose(generator(z), teacher(z * teacher.sigma_max, s), atol=1e-6)  # G(z) = D(s_max z, s_max)
    assert all(p.requires_grad for p in fake.parameters()) and not any(p.requires_grad for p in teacher.parameters())
    next(fake.parameters()).data.add_(1.0)
    assert not torch.equal(next(fake.parameters()), next(teacher.parameters()))
    assert fake.features(z, s).shape == (3, 8)


def test_a_flat_network_on_the_plugin_teacher_is_refused_before_it_is_built(plugin):
    assert main(["-p", plugin, "run", "dmd", "--preset", "digits", "--set", "teacher.component=tiny_x0",
                 "--set", "generator.component=mlp_generator"]) == 2
