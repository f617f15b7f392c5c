"""Image evaluation (clean-fid FID, class coverage, grids) and end-to-end image runs on tiny teachers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scoredistill.cli import main
from scoredistill.errors import UserError
from scoredistill.images import metrics
from scoredistill.images.classifier import load_classifier
from scoredistill.images.testing import TINY_TEACHER_OVERRIDES, tiny_classifier_settings, tiny_teacher_folder
from scoredistill.images.training import ENV_DIGITS_TEACHER

FAST = ["--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "pairs.num_pairs=16", "--set", "pairs.steps=3",
        "--set", "eval.num_samples=40", "--set", "runtime.progress=false", "--quiet"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_teacher_folder(tmp_path_factory.mktemp("teacher") / "digits")


@pytest.fixture(autouse=True)
def tiny_classifier(monkeypatch):
    monkeypatch.setattr(metrics, "CLASSIFIER_SETTINGS", tiny_classifier_settings())
    monkeypatch.setattr(metrics, "inception_dir", lambda: None)  # as offline: no Inception weights


def test_frechet_distance_against_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    b = rng.standard_normal((20000, 3)) * 2 + np.array([1.0, 0.0, -2.0])
    # N(0, I) vs N(m, 4I): |m|^2 + tr(I + 4I - 2 * 2I) = 5 + 3 * 1
    assert metrics.frechet(a, b) == pytest.approx(8.0, rel=0.03)
    assert metrics.frechet(a, a) == pytest.approx(0.0, abs=1e-6)


def test_class_metrics():
    pred = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    m = metrics.class_metrics(pred, [0.1] * 10)
    assert m["class_histogram"][:3] == [0.5, 0.3, 0.2] and m["classes_present"] == 3
    assert m["class_coverage"] == 0.3 and m["max_class_share"] == 0.5


def test_classifier_is_cached_and_reports_held_out_accuracy(tmp_path):
    model, info = load_classifier(tiny_classifier_settings(), cache_dir=tmp_path)
    again, info2 = load_classifier(tiny_classifier_settings(), cache_dir=tmp_path)
    assert again is model and 0 <= info["test_accuracy"] <= 1 and info["test_size"] == 297
    assert model.features(torch.rand(5, 1, 8, 8) * 255).shape == (5, 8)


def test_inception_fid_needs_cached_weights():
    with pytest.raises(UserError, match="inception-2015-12-05.pt"):
        metrics.inception_extractor(torch.device("cpu"))


@pytest.fixture(scope="module")
def digits_run(teacher_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV_DIGITS_TEACHER, str(teacher_dir))
    mp.setattr(metrics, "CLASSIFIER_SETTINGS", tiny_classifier_settings())
    mp.setattr(metrics, "inception_dir", lambda: None)
    out = tmp_path_factory.mktemp("runs") / "dmd"
    try:
        sets = [a for o in TINY_TEACHER_OVERRIDES for a in ("--set", o)]
        assert main(["run", "dmd", "--preset", "digits", "--out", str(out), *FAST, *sets]) == 0
    finally:
        mp.undo()
    return out


def test_digits_run_reports_fid_classes_and_pictures(digits_run):
    m = json.loads((digits_run / "metrics.json").read_text())
    for key in ("fid", "fid_train", "fid_ratio_to_teacher", "class_histogram", "class_coverage", "classifier", "fid_protocol"):
        assert key in m, key
    assert m["num_samples"] == 40 and len(m["class_histogram"]) == 10 and abs(sum(m["class_histogram"]) - 1) < 1e-3
    assert m["teacher"]["sampler"] == "heun-3" and m["teacher"]["nfe"] == 5 and "fid" in m["teacher"]
    assert "fid" in m["target"] and m["fid_inception"] is None and "not cached" in m["fid_inception_note"]
    assert 0 <= m["classifier"]["test_accuracy"] <= 1
    for name in ("samples.png", "class_histogram.png", "loss_curves.png"):
        assert (digits_run / name).stat().st_size > 1000, name


def test_eval_command(digits_run, teacher_dir, monkeypatch, capsys):
    monkeypatch.setenv(ENV_DIGITS_TEACHER, str(teacher_dir))
    out = digits_run / "eval_small.json"
    own = {name: (digits_run / name).read_bytes() for name in ("samples.png", "class_histogram.png", "metrics.json")}
    assert main(["eval", str(digits_run), "--num", "30", "--seed", "3", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["num_samples"] == 30 and m["seed"] == 3 and "fid" in m and "fid" in m["teacher"]
    for name in ("eval_small_samples.png", "eval_small_class_histogram.png"):  # its pictures sit beside its metrics
        assert (digits_run / name).stat().st_size > 1000, name
    assert all((digits_run / name).read_bytes() == data for name, data in own.items())  # the run's own are untouched
    assert main(["eval", str(digits_run), "--num", "30", "--inception", "require"]) == 2
    assert "inception-2015-12-05.pt" in capsys.readouterr().err


def test_a_users_diffusers_teacher_runs_end_to_end(tmp_path):
    """A UNet2DModel saved by the user (v-prediction, DDPM schedule) distils with --set teacher.path=FOLDER."""
    import diffusers

    torch.manual_seed(0)
    folder = tmp_path / "my-teacher"
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          norm_num_groups=4).save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(prediction_type="v_prediction").save_pretrained(folder / "scheduler")
    out = tmp_path / "run"
    args = ["run", "dmd", "--preset", "digits", "--out", str(out), *FAST, "--set", "teacher.component=diffusers_unet",
            "--set", f"teacher.path={folder}", "--set", "teacher.data=digits", "--set", "teacher.sampler_steps=3"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "fid" in m and m["teacher"]["nfe"] == 5
    cfg = (out / "config.yaml").read_text()
    assert "diffusers_unet" in cfg and str(folder) in cfg


def test_dmd2_gan_head_sits_on_the_unet_fake_score(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIGITS_TEACHER, str(teacher_dir))
    sets = [a for o in TINY_TEACHER_OVERRIDES for a in ("--set", o)]
    out = tmp_path / "dmd2"
    assert main(["run", "dmd2", "--preset", "digits", "--out", str(out), *FAST, *sets, "--set", "train.fake_updates_per_step=1"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history and "gan" in history[-1]


@pytest.mark.parametrize("args,needle", [
    (["--set", "teacher.component=diffusers_unet", "--set", "teacher.path=/nonexistent/teacher"], "does not exist"),
    (["--set", "generator.component=mlp_generator"], "flat"),
    (["--set", "losses.regression.component=lpips_regression"], "LPIPS"),
])
def test_image_mistakes_are_one_line_errors(args, needle, teacher_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(ENV_DIGITS_TEACHER, str(teacher_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached LPIPS backbone here
    sets = [] if "teacher.component" in args[1] else [a for o in TINY_TEACHER_OVERRIDES for a in ("--set", o)]
    assert main(["run", "dmd", "--preset", "digits", "--out", str(tmp_path / "r"), *FAST, *sets, *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_run_trains_a_missing_digits_teacher_first_and_says_so(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "fresh-teacher"
    monkeypatch.setenv(ENV_DIGITS_TEACHER, str(folder))
    sets = [a for o in TINY_TEACHER_OVERRIDES for a in ("--set", o)]
    assert main(["run", "dmd", "--preset", "digits", "--out", str(tmp_path / "r"), *FAST, *sets]) == 0
    assert "training it now" in capsys.readouterr().err
    assert (folder / "unet" / "config.json").is_file()


def test_speed_benchmark_script_runs(teacher_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    env = {**os.environ, ENV_DIGITS_TEACHER: str(teacher_dir), "SCOREDISTILL_CACHE": str(tmp_path)}
    out = tmp_path / "speed.json"
    sets = [a for o in TINY_TEACHER_OVERRIDES if "sampler_steps" not in o for a in ("--set", o)]  # the tiny teacher's settings
    subprocess.run([sys.executable, str(script), "--batch", "8", "--repeats", "1", *sets, "--out", str(out)], check=True, env=env,
                   capture_output=True)
    result = json.loads(out.read_text())
    assert result["teacher_nfe"] == 35 and result["speedup"] > 1


def test_a_digits_run_exports_a_loadable_one_step_generator(digits_run, teacher_dir, monkeypatch, tmp_path):
    """``scoredistill export`` of a UNet run: the folder loads back and gives the run's own samples."""
    monkeypatch.setenv(ENV_DIGITS_TEACHER, str(teacher_dir))
    from scoredistill.export import export_run
    from scoredistill.images.loading import load_denoiser
    from scoredistill.plugins import Hooks
    from scoredistill.trainer import load_run

    hooks = Hooks()
    export_run(digits_run, tmp_path / "exported", hooks)
    info = json.loads((tmp_path / "exported" / "scoredistill_generator.json").read_text())
    D = load_denoiser(str(tmp_path / "exported")).denoiser.eval()
    run = load_run(digits_run, hooks)
    z = torch.randn((5, *run.models.generator.latent_shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = run.sampling_generator.eval()(z)
        got = D(info["sigma_max"] * z, torch.full((5,), info["sigma_max"]))
    assert torch.allclose(got, want, atol=1e-5)
    assert "load_denoiser" in (tmp_path / "exported" / "README.md").read_text()
