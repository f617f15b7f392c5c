"""Config layering (method <- preset <- ablations <- --set) and its validation."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from scoredistill.config import load_run_config, resolve
from scoredistill.errors import UserError
from scoredistill.registry import Method, Preset


def test_dmd_on_toy2d_takes_components_from_method_and_preset(hooks):
    cfg = resolve(hooks.registry, "dmd", "toy2d")
    assert cfg.teacher.component == "gaussian_mixture"
    assert set(cfg.losses) == {"distribution_matching", "regression"}
    assert cfg.losses["distribution_matching"].component == "kl_gradient"
    # the method says LPIPS at 0.25; the preset swaps the distance (and its weight) for 2-D points
    assert cfg.losses["regression"].component == "l2_regression"
    assert cfg.losses["regression"].weight == 1.0
    assert cfg.fake_score_loss.component == "fake_score_denoise"


def test_preset_never_adds_a_loss_term(hooks):
    reg = hooks.registry
    reg.add_methods([Method(name="dm_only", summary="test", config={"losses": {"distribution_matching": {"component": "kl_gradient"}}})])
    cfg = resolve(reg, "dm_only", "toy2d")
    assert set(cfg.losses) == {"distribution_matching"}


@pytest.mark.parametrize(
    "ablations, losses, fake, trains_fake",
    [
        (["regression"], {"distribution_matching"}, "mlp_denoiser", True),
        (["distribution_matching"], {"regression"}, "mlp_denoiser", False),
        (["fake_score"], {"distribution_matching", "regression"}, "sample_itself", False),
        (["fake_score", "regression"], {"distribution_matching"}, "sample_itself", False),
    ],
)
def test_ablations_swap_or_drop_components(hooks, ablations, losses, fake, trains_fake):
    cfg = resolve(hooks.registry, "dmd", "toy2d", ablations)
    assert set(cfg.losses) == losses
    assert cfg.fake_score.component == fake
    assert (cfg.fake_score_loss is not None) == trains_fake
    assert cfg.ablations == ablations


def test_set_overrides_any_field_with_yaml_types(hooks):
    cfg = resolve(hooks.registry, "dmd", "toy2d", overrides=[
        "train.steps=7", "teacher.weights=[0.5,0.5]", "teacher.means=[[0,0],[3,3]]", "teacher.stds=[1,2]",
        "losses.regression.component=pseudo_huber_regression", "losses.regression.c=0.1", "seed=3"])
    assert cfg.train.steps == 7 and cfg.seed == 3
    assert cfg.teacher.config.weights == [0.5, 0.5] and cfg.teacher.config.stds == [1.0, 2.0]
    assert cfg.losses["regression"].component == "pseudo_huber_regression"
    assert cfg.losses["regression"].config.c == 0.1


def test_resolved_config_round_trips_through_yaml(hooks, tmp_path):
    cfg = resolve(hooks.registry, "dmd", "toy2d", ["fake_score"], ["train.steps=11"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    raw = OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml"))
    assert raw["teacher"]["weights"] == [0.125] * 8 and len(raw["teacher"]["means"]) == 8
    again = load_run_config(hooks.registry, tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_model_dump_keeps_every_components_settings(hooks):
    cfg = resolve(hooks.registry, "dmd", "toy2d", overrides=["losses.regression.component=pseudo_huber_regression",
                                                              "losses.regression.c=0.1", "teacher.stds=[1,2]",
                                                              "teacher.weights=[0.5,0.5]", "teacher.means=[[0,0],[3,3]]"])
    for mode in ("python", "json"):
        dumped = cfg.model_dump(mode=mode)
        assert dumped["losses"]["regression"]["config"]["c"] == 0.1
        assert dumped["teacher"]["config"]["stds"] == [1.0, 2.0]
        for section in ("teacher", "generator", "fake_score", "fake_score_loss", "pairs"):
            spec = getattr(cfg, section)
            assert dumped[section]["config"] == spec.config.model_dump(mode=mode), section


@pytest.mark.parametrize(
    "method, preset, ablations, overrides, message",
    [
        ("dmdx", "toy2d", [], [], "unknown method 'dmdx'; allowed: "),
        ("dmd", "toy3d", [], [], "unknown preset 'toy3d'; allowed: "),
        ("dmd", "toy2d", ["gan"], [], "unknown ablation 'gan' for method 'dmd'; allowed: distribution_matching, fake_score, regression"),
        ("dmd", "toy2d", [], ["generator.component=resnet"], "unknown generator component 'resnet'; allowed: "),
        ("dmd", "toy2d", [], ["train.stepz=3"], "unknown config key 'train.stepz'; allowed here: "),
        ("dmd", "toy2d", [], ["teacher.colour=red"], "unknown config key 'teacher.colour'; allowed here: class_conditional, guidance_scale, means, "),
        ("dmd", "toy2d", [], ["nonsense=1"], "unknown config key 'nonsense'"),
        ("dmd", "toy2d", [], ["train.steps=many"], "invalid config value 'train.steps'"),
        ("dmd", "toy2d", [], ["teacher.weights=[0.5,0.1,0.1,0.1,0.1,0.1,0.1,0.1]"], "sum to 1"),
        ("dmd", "toy2d", [], ["losses.regression.weight=heavy"], "invalid config value 'losses.regression.weight'"),
        ("dmd", "toy2d", ["regression", "distribution_matching"], [], "nothing would train the generator"),
        ("dmd", "toy2d", [], ["train.steps"], "--set expects key=value"),
    ],
)
def test_bad_input_is_one_clear_line(hooks, method, preset, ablations, overrides, message):
    with pytest.raises(UserError) as info:
        resolve(hooks.registry, method, preset, ablations, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_changing_a_component_replaces_its_settings_but_keeps_the_weight(hooks):
    cfg = resolve(hooks.registry, "dmd", "toy2d", overrides=[
        "losses.regression.component=lpips_regression", "losses.regression.net=alex", "losses.regression.backbone=random"])
    assert cfg.losses["regression"].config.net == "alex"
    # the method's sample_itself fake score wins over the preset's MLP, without its MLP settings
    reg = hooks.registry
    reg.add_methods([Method(name="sds_like", summary="test", config={
        "losses": {"distribution_matching": {"component": "kl_gradient"}}, "fake_score": {"component": "sample_itself"}})])
    cfg = resolve(reg, "sds_like", "toy2d", overrides=["fake_score.component=sample_itself"])
    assert cfg.fake_score.component == "sample_itself"
    toy = reg.preset("toy2d")
    reg.add_presets([Preset(name="toy2d_bare", summary="toy2d without loss retuning",
                            config={k: v for k, v in toy.config.items() if k != "losses"})])
    cfg = resolve(reg, "dmd", "toy2d_bare", overrides=["losses.regression.component=pseudo_huber_regression"])
    assert cfg.losses["regression"].weight == 0.25
