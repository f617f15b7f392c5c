"""What a run leaves behind besides its weights: metrics.csv, periodic sample pictures, checkpoint timing;
the diffusers export (loaded back with diffusers, same samples); EMA or online weights; bf16 autocast."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scoredistill.cli import main
from scoredistill.runlog import tensorboard_writer_class

TINY = ["--preset", "toy2d", "--set", "train.steps=30", "--set", "pairs.num_pairs=300", "--set", "eval.num_samples=300",
        "--set", "train.batch_size=64", "--set", "train.fake_score_warmup_steps=10", "--set", "train.log_every=5",
        "--set", "train.checkpoint_every=10", "--quiet"]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("outputs") / "run"
    assert main(["run", "dmd", "--out", str(run_dir), *TINY, "--set", "train.ema_decay=0.9", "--set", "train.sample_every=10",
                 "--set", "train.sample_count=500"]) == 0
    return run_dir


def test_logs_pictures_and_checkpoint_time(ema_run):
    history = json.loads((ema_run / "history.json").read_text())
    rows = list(csv.DictReader((ema_run / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [h["step"] for h in history] == [5, 10, 15, 20, 25, 30]
    assert all(float(r["generator"]) == pytest.approx(h["generator"]) for r, h in zip(rows, history))
    assert {p.name for p in ema_run.glob("samples_step*.png")} == {"samples_step10.png", "samples_step20.png", "samples_step30.png"}
    metrics = json.loads((ema_run / "metrics.json").read_text())
    assert 0 < metrics["trainer"]["checkpoint_seconds"] < metrics["train_seconds"]
    assert any(ema_run.glob("events.out.tfevents.*")) == (tensorboard_writer_class() is not None)


def test_sample_uses_the_ema_or_the_online_weights(ema_run, tmp_path):
    ema, online = tmp_path / "ema.npy", tmp_path / "online.npy"
    assert main(["sample", str(ema_run), "--num", "64", "--out", str(ema)]) == 0
    assert main(["sample", str(ema_run), "--num", "64", "--out", str(online), "--online"]) == 0
    assert not np.array_equal(np.load(ema), np.load(online))
    a, b = load_file(str(ema_run / "generator.safetensors")), load_file(str(ema_run / "generator_online.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_export_loads_back_with_diffusers_and_gives_the_same_samples(ema_run, tmp_path):
    out, reference = tmp_path / "export", tmp_path / "reference.npy"
    assert main(["export", str(ema_run), str(out)]) == 0
    assert {"config.json", "diffusion_pytorch_model.safetensors", "scoredistill_generator.py", "README.md",
            "scoredistill_export.json"} <= {p.name for p in out.iterdir()}
    assert "AutoModel.from_pretrained" in (out / "README.md").read_text()
    assert json.loads((out / "scoredistill_export.json").read_text())["weights"] == "ema"
    assert main(["sample", str(ema_run), "--num", "500", "--seed", "7", "--out", str(reference)]) == 0
    # in a fresh process, with diffusers alone (the model class comes from the folder: trust_remote_code)
    code = ("import sys, numpy as np; from diffusers import AutoModel; "
            "g = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "np.save(sys.argv[2], g.sample(500, seed=7).numpy())")
    got = tmp_path / "diffusers.npy"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(got)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.array_equal(np.load(got), np.load(reference))
    # and through the class itself (diffusers' ModelMixin.from_pretrained)
    from scoredistill.export_models import OneStepMLPGenerator

    g = OneStepMLPGenerator.from_pretrained(str(out))
    assert np.array_equal(g.sample(500, seed=7).numpy(), np.load(reference))


def test_online_weights_export_and_an_unexportable_generator(ema_run, tmp_path):
    assert main(["export", str(ema_run), str(tmp_path / "online"), "--online"]) == 0
    from scoredistill.export_models import OneStepMLPGenerator

    g = OneStepMLPGenerator.from_pretrained(str(tmp_path / "online"))
    online = load_file(str(ema_run / "generator_online.safetensors"))
    assert all(torch.equal(v, online[k]) for k, v in g.state_dict().items())

    from scoredistill.errors import UserError
    from scoredistill.roles import Generator

    with pytest.raises(UserError, match="does not implement Generator.export"):
        Generator().export(tmp_path / "x", {})


def test_bf16_autocast_runs_on_cpu(tmp_path):
    run_dir = tmp_path / "bf16"
    assert main(["run", "dmd", "--out", str(run_dir), *TINY, "--set", "train.steps=10", "--set", "runtime.mixed_precision=bf16"]) == 0
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in load_file(str(run_dir / "generator.safetensors")).values())


def test_periodic_pictures_of_images_are_grids(tmp_path):
    from scoredistill.runlog import sample_picture

    assert sample_picture(None, torch.rand(20, 1, 8, 8) * 2 - 1, tmp_path / "grid.png", "digits")
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert not sample_picture(None, torch.rand(20, 5), tmp_path / "none.png", "5-D points")


def test_the_loss_scaling_path_skips_overflowing_steps(hooks, tmp_path):
    """fp16 needs CUDA; the update's loss-scaling path (GradScaler: scale, unscale, clip, step, update) runs on CPU too."""
    from scoredistill import trainer
    from scoredistill.config import resolve
    from scoredistill.engine import Engine

    config = resolve(hooks.registry, "dmd", "toy2d", [], ["train.steps=10", "pairs.num_pairs=300", "train.batch_size=64",
                                                          "train.fake_score_warmup_steps=5", "runtime.progress=false",
                                                          "train.grad_clip=1.0", "train.sample_every=null"])
    run = trainer.build(config, hooks, tmp_path)
    run.engine = Engine(config.runtime)
    run.engine.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=1e38)  # overflows at first: skipped, then backed off
    before = {k: v.clone() for k, v in run.models.generator.state_dict().items()}
    trainer.train(run)
    assert scaler.get_scale() < 1e38
    after = run.models.generator.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values()) and any(not torch.equal(before[k], after[k]) for k in after)
    assert not run.guard.watch_gradients  # overflow is the scaler's business, not a non-finite stop


def test_a_unet_generator_exports_its_unet_and_sigma_max(tmp_path):
    """The helper for generators that are a copy of a diffusers UNet denoiser: G(z) = D(sigma_max z, sigma_max)."""
    from diffusers import UNet2DModel

    from scoredistill.export import UNET_INFO, save_unet_generator

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    save_unet_generator(tmp_path, unet, sigma_max=80.0, preconditioning={"type": "edm", "sigma_data": 0.5},
                        how_to_sample="# G\n\n`x = D(80 z, 80)`\n")
    again = UNet2DModel.from_pretrained(str(tmp_path / "unet"))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    assert torch.equal(again(x, t).sample, unet(x, t).sample)
    info = json.loads((tmp_path / UNET_INFO).read_text())
    assert info["sigma_max"] == 80.0 and info["preconditioning"]["type"] == "edm"
    assert (tmp_path / "README.md").read_text().startswith("# G")
