"""Class-conditional distillation: a teacher with a class embedding gives a run labels, and every network sees them.

DMD distils a class-conditional teacher into ``G(z, c)`` (the paper's ImageNet-64 runs): for
each batch the trainer draws labels ``c`` from the teacher (uniform over its classes, its
"no class" label left out), and the same ``c`` goes to ``G``, to ``D_real`` (guided on the
real score) and to ``D_fake``; regression pairs are solved with their own seeded labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scoredistill import trainer
from scoredistill.cli import main
from scoredistill.config import resolve
from scoredistill.images import metrics
from scoredistill.images.pairs import ShardedODEPairs
from scoredistill.images.testing import tiny_classifier_settings, tiny_diffusers_teacher_folder
from scoredistill.roles import BuildContext, seeded_conditions
from scoredistill.sampling import heun_sample, karras_sigmas

NULL = 10  # labels 0..9 are the digits, 10 is "no class" (label dropout's extra label)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    return tiny_diffusers_teacher_folder(tmp_path_factory.mktemp("cc") / "teacher", num_class_embeds=11)


def _overrides(path: Path, guidance: float = 2.0) -> list[str]:
    return ["teacher.component=diffusers_unet", f"teacher.path={path}", f"teacher.null_class={NULL}",
            f"teacher.guidance_scale={guidance}", "teacher.data=digits", "teacher.sampler_steps=3", "pairs.num_pairs=16",
            "pairs.steps=3", "pairs.batch_size=8", "train.batch_size=6", "train.pair_batch_size=4", "runtime.progress=false",
            "train.fake_score_warmup_steps=0"]


def _teacher(hooks, path: Path, tmp_path: Path, **extra):
    config = resolve(hooks.registry, "dmd", "digits", [], _overrides(path, **extra))
    return hooks.make_teacher(spec=config.teacher, ctx=BuildContext(hooks=hooks, cache_dir=tmp_path))


def test_the_teacher_draws_its_classes_uniformly_without_the_null_label(hooks, teacher_path, tmp_path):
    teacher = _teacher(hooks, teacher_path, tmp_path)
    labels = teacher.sample_conditions(20_000)
    assert labels.dtype == torch.long and set(labels.tolist()) == set(range(10))
    share = torch.bincount(labels, minlength=10).double() / len(labels)
    assert (share - 0.1).abs().max() < 0.01  # uniform: 10 classes, sd of a share about 0.002
    a, b = seeded_conditions(teacher, 50, 3), seeded_conditions(teacher, 50, 3)
    assert torch.equal(a, b) and not torch.equal(a, seeded_conditions(teacher, 50, 4))


def test_an_unconditional_teacher_draws_no_conditions(hooks, tmp_path):
    teacher = _teacher(hooks, tiny_diffusers_teacher_folder(tmp_path / "uncond"), tmp_path)
    assert teacher.sample_conditions(8) is None and seeded_conditions(teacher, 8, 0) is None


def test_pairs_are_heun_solutions_with_their_own_labels(hooks, teacher_path, tmp_path):
    teacher = _teacher(hooks, teacher_path, tmp_path)
    config = resolve(hooks.registry, "dmd", "digits", [], _overrides(teacher_path)).pairs
    pairs = ShardedODEPairs(config.config, BuildContext(hooks=hooks, cache_dir=tmp_path, teacher=teacher))
    assert pairs.c is not None and len(pairs.c) == len(pairs.z) == 16
    grid = karras_sigmas(3, teacher.sigma_min, teacher.sigma_max)
    for i in (0, 9):  # solved independently, one pair at a time
        want = heun_sample(teacher, pairs.z[i : i + 1] * teacher.sigma_max, grid, pairs.c[i : i + 1])
        torch.testing.assert_close(pairs.y[i : i + 1], want, rtol=1e-4, atol=1e-5)
        other = heun_sample(teacher, pairs.z[i : i + 1] * teacher.sigma_max, grid, (pairs.c[i : i + 1] + 1) % 10)
        assert not torch.allclose(pairs.y[i : i + 1], other, atol=1e-4)  # the label matters
    z, y, c = pairs.sample(32)
    for zi, ci in zip(z, c):  # each drawn pair keeps its own label
        (row,) = [k for k in range(len(pairs.z)) if torch.equal(pairs.z[k], zi)]
        assert ci == pairs.c[row]


def _record_labels(module: torch.nn.Module, calls: list) -> None:
    module.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["class_labels"].clone()), with_kwargs=True)


def test_one_iteration_gives_generator_teacher_and_fake_score_the_same_labels(hooks, teacher_path, tmp_path):
    # two fake-score updates, so that the second one's fresh labels are checked too
    config = resolve(hooks.registry, "dmd", "digits", [], [*_overrides(teacher_path, guidance=2.0), "train.fake_updates_per_step=2"])
    run = trainer.build(config, hooks, tmp_path / "run")
    trainer.setup(run)
    g_calls, t_calls, f_calls = [], [], []
    _record_labels(run.models.generator.denoiser.unet, g_calls)
    _record_labels(run.models.teacher.denoiser.unet, t_calls)
    _record_labels(run.models.fake_score.denoiser.unet, f_calls)
    trainer.train_iteration(run)

    # generator step: G once on cat(z, z_ref), with the batch's labels, then the pairs' labels (pairs.c)
    g, g_fresh = g_calls
    cond, c_ref = g[:6], g[6:]
    assert len(c_ref) == 4 and set(c_ref.tolist()) <= set(run.pairs.c.tolist()) and cond.max() < NULL
    # D_real guided: both branches in one call, the null label first, then the batch's labels
    (t,) = t_calls
    assert torch.equal(t, torch.cat([torch.full((6,), NULL), cond]))
    # D_fake: in the KL gradient and its first update (on sg(G(z, c))) the batch's labels; its second update on
    # fresh samples G(z', c') with the fresh labels c'
    f_kl, f_first, f_second = f_calls
    assert torch.equal(f_kl, cond) and torch.equal(f_first, cond) and torch.equal(f_second, g_fresh)


def test_a_class_conditional_run_reports_label_accuracy_and_exports_labels(teacher_path, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "CLASSIFIER_SETTINGS", tiny_classifier_settings())
    monkeypatch.setattr(metrics, "inception_dir", lambda: None)
    out = tmp_path / "run"
    sets = [a for o in _overrides(teacher_path) + ["train.steps=2", "eval.num_samples=40"] for a in ("--set", o)]
    assert main(["run", "dmd", "--preset", "digits", "--out", str(out), "--quiet", *sets]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for who in (m, m["teacher"]):
        assert 0 <= who["label_accuracy"] <= 1 and "fid" in who
    assert main(["sample", str(out), "--num", "12", "--seed", "5", "--out", str(tmp_path / "s.npy")]) == 0
    import numpy as np

    labels = np.load(tmp_path / "s_labels.npy")
    assert labels.shape == (12,) and labels.max() < NULL and np.load(tmp_path / "s.npy").shape == (12, 1, 8, 8)
    assert main(["export", str(out), str(tmp_path / "export")]) == 0
    readme = (tmp_path / "export" / "README.md").read_text()
    assert "class-conditional" in readme and f"label {NULL}" in readme


def test_dmd2_trains_a_class_conditional_projection_head(hooks, teacher_path, tmp_path):
    """The discriminator takes the class (DMD2 with a projection head, Miyato & Koyama 2018 eq. 3): real digits with
    their own labels against G(z, c); one iteration trains the class embedding."""
    from scoredistill.distill import HEAD_NAME, GANHead

    head = GANHead(16, 8, 1.0, num_classes=11)
    torch.nn.init.normal_(head.class_embedding.weight)
    feats, c = torch.randn(4, 16), torch.tensor([0, 3, 3, 9])
    with torch.no_grad():
        h = torch.nn.functional.silu(feats @ head.net[0].weight.T + head.net[0].bias)
        want = h @ head.net[2].weight[0] + head.net[2].bias[0] + (head.class_embedding.weight[c] * h).sum(-1)
        assert torch.allclose(head(feats, c), want, atol=1e-5)

    config = resolve(hooks.registry, "dmd2", "digits", [], [*_overrides(teacher_path), "train.fake_updates_per_step=1"])
    run = trainer.build(config, hooks, tmp_path / "run")
    trainer.setup(run)
    head = getattr(run.models.fake_score, HEAD_NAME)
    assert head.class_embedding.num_embeddings == 11 and head.class_embedding.weight.abs().sum() == 0
    trainer.train_iteration(run)
    assert head.class_embedding.weight.abs().sum() > 0  # trained on labelled real and generated samples


# --------------------------------------------------------------------------- the analytic toy: a learning-level check


def _toy_teacher(**kw):
    from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher

    base = dict(means=[[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0]], stds=[0.3, 0.5, 0.3], weights=[0.5, 0.25, 0.25])
    return GaussianMixtureTeacher(GaussianMixtureTeacher.Config(**{**base, **kw}))


@pytest.mark.parametrize("g", [1.0, 3.0])
def test_the_conditional_mixture_denoiser_is_one_components_denoiser_guided(g):
    """``D(x, s, k)`` against an independent computation: the denoiser of a mixture of component ``k`` alone,
    guided by hand as ``D_u + g (D_k - D_u)``."""
    teacher = _toy_teacher(class_conditional=True, guidance_scale=g)
    plain = _toy_teacher()
    x = torch.randn(64, 2, dtype=torch.float64) * 3
    sigma = torch.rand(64, dtype=torch.float64) * 5 + 0.01
    labels = torch.randint(0, 3, (64,))
    want = torch.empty_like(x)
    for k in range(3):
        alone = _toy_teacher(means=[plain.config.means[k]], stds=[plain.config.stds[k]], weights=[1.0])
        rows = labels == k
        d_u, d_k = plain(x[rows], sigma[rows]), alone(x[rows], sigma[rows])
        want[rows] = d_u + g * (d_k - d_u)
    torch.testing.assert_close(teacher(x, sigma, labels), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(teacher(x, sigma), plain(x, sigma))  # no labels: the whole mixture
    drawn = teacher.sample_conditions(40_000)
    assert (torch.bincount(drawn, minlength=3) / 40_000 - torch.tensor([0.5, 0.25, 0.25])).abs().max() < 0.015


@pytest.mark.slow
def test_dmd_learns_a_class_conditional_generator_on_the_toy(hooks, tmp_path):
    """toy2d with labels (component k = class k): after training, G(z, k) lands in component k, judged by the exact
    Bayes posterior of the mixture, and the samples over labels still cover the whole mixture."""
    from scoredistill.runner import execute
    from scoredistill.samples import one_step_samples

    overrides = ["teacher.class_conditional=true", "train.steps=1500", "pairs.num_pairs=20000", "runtime.progress=false",
                 "eval.num_samples=2000"]
    config = resolve(hooks.registry, "dmd", "toy2d", [], overrides)
    result = execute(config, hooks, tmp_path / "run")
    run, teacher = result.run, result.run.models.teacher
    assert result.metrics["mode_coverage"] == 1.0
    for k in range(8):
        x = one_step_samples(run.sampling_generator, 512, seed=k, cond=torch.full((512,), k))
        owner = teacher.responsibilities(x).argmax(1)  # the exact posterior over components at sigma = 0
        assert (owner == k).double().mean() > 0.95, (k, torch.bincount(owner, minlength=8))
