"""The benchmark scripts run (at a tiny size); their speed targets live in benchmarks/README.md, not here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scoredistill.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_overhead_script_runs(tmp_path):
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--presets", "toy2d", "--iters", "3", "--warmup", "1",
           "--sample-batch", "64", "--breakdown", "2", "--set", "pairs.num_pairs=256", "--set", "train.batch_size=64",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "SCOREDISTILL_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"machine", "torch", "load_average_before", "malloc", "presets"} <= result.keys()
    toy = result["presets"]["toy2d"]
    for what in ("train", "sample", "generate"):
        m = toy[what]
        for key in ("framework_ms", "bare_ms", "ratio", "ratio_paired"):
            assert _positive_finite(m[key]), (what, key, m[key])
        assert m["iters"] == 3
    # the hand-written loop computes what the framework computes (one iteration from the same weights and seed)
    check = toy["check"]
    assert check["generator_loss_rel_diff"] < 1e-4 and check["fake_score_loss_rel_diff"] < 1e-4, check
    assert all(math.isfinite(v) for v in check.values()), check
    assert _positive_finite(toy["breakdown"]["train_iteration_us"]) and toy["breakdown"]["pieces_us"]
    assert "toy2d    train" in proc.stdout


def _load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kl_gradient_snr_is_zero_when_the_fake_score_is_the_teacher(tmp_path):
    """DMD's gradient is D_fake - D_real: with the teacher in both places it vanishes at every level."""
    from types import SimpleNamespace

    from scoredistill.cli import main as cli_main
    from scoredistill.plugins import Hooks
    from scoredistill.trainer import load_run

    snr = _load_benchmark("kl_gradient_snr")
    run_dir = tmp_path / "run"
    assert cli_main(["run", "dmd", "--preset", "toy2d", "--set", "train.steps=15", "--set", "train.fake_score_warmup_steps=5",
                     "--set", "train.batch_size=64", "--set", "pairs.num_pairs=200", "--set", "eval.num_samples=300",
                     "--quiet", "--out", str(run_dir)]) == 0
    teacher = load_run(run_dir, Hooks()).models.teacher
    same = SimpleNamespace(teacher=teacher, fake_score=lambda x_s, sigma, cond, x_clean=None: teacher(x_s, sigma, cond))
    x = torch.randn(32, 2)
    for row in snr.gradient_by_level(same, x, (0.1, 0.5, 0.9), draws=3):
        assert row["signal"] == 0 and row["noise"] == 0, row
    # the run's own trained fake score differs from the teacher: a finite, positive gradient at every level
    rows = snr.main([str(run_dir), "--samples", "32", "--draws", "3", "--ratios", "0.1", "0.5", "0.9", "--out", str(tmp_path / "snr.json")])
    assert all(_positive_finite(r["signal"]) and _positive_finite(r["noise"]) for r in rows), rows
    assert abs(sum(r["share"] for r in rows) - 1) < 1e-6
    assert json.loads((tmp_path / "snr.json").read_text())["levels"][0]["ratio"] == 0.1


def test_mean_bias_is_zero_for_the_exact_mixture_denoiser():
    """E[D(x + s eps)] = E[x] for the exact posterior mean; a denoiser off by 0.5 shows a bias of 0.5."""
    from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher

    snr = _load_benchmark("kl_gradient_snr")
    gmm = GaussianMixtureTeacher(GaussianMixtureTeacher.Config(means=[[-2.0, 0.0], [2.0, 1.0]], stds=[0.3, 0.5], weights=[0.4, 0.6]))
    torch.manual_seed(0)
    x = gmm.real_samples(20000)
    gen = torch.Generator().manual_seed(1)
    for s in (0.05, 1.0, 20.0):
        sigma = torch.full((len(x),), s)
        exact = snr.mean_bias(lambda x_s, sig: gmm(x_s, sig), x, sigma, 4, gen)
        off = snr.mean_bias(lambda x_s, sig: gmm(x_s, sig) + 0.5, x, sigma, 4, gen)
        assert exact < 0.05 and abs(off - 0.5) < 0.05, (s, exact, off)


def test_gpu_script_runs_on_cpu_and_times_the_reference_iteration(tmp_path):
    """gpu_dmd.py runs where device time is scarce, so its tiny CPU mode is run here; its FLOP count must be
    the reference iteration: one generator step (G forward and backward, D_real and D_fake forwards) and
    one fake-score step (D_fake forward and backward), about 8 forwards of the UNet, counted independently."""
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_dmd.py"), "--device", "cpu", "--tiny", "--batch", "8",
           "--iters", "1", "--warmup", "1", "--only", "bare:bf16", "fp32", "bf16", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "SCOREDISTILL_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["settings"]) == ["bare:bf16", "fp32", "bf16"]  # --only's order
    for row in result["settings"].values():
        for key in ("images_per_s", "seconds_per_iteration", "cpu_seconds_per_iteration"):
            assert _positive_finite(row[key]), (key, row)
        assert row["losses_finite"] and row["batch"] == 8
    assert _positive_finite(result["settings"]["bare:bf16"]["framework_over_bare"])  # its framework row came later

    gpu_dmd = _load_benchmark("gpu_dmd")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, **gpu_dmd.TINY_UNET)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(torch.randn(4, 3, 8, 8), torch.ones(4))
    forwards = result["gflop_per_image"] * 1e9 / (counter.get_total_flops() / 4)
    assert 7.0 < forwards < 8.6, forwards  # two fake-score updates would be about 12


def test_gpu_script_builds_each_setting_as_named(tmp_path):
    """The compile mode, teacher dtype and weight casts each row asks for reach the run (a bare row's run is not
    compiled: the hand-written loop compiles its own copies)."""
    gpu_dmd = _load_benchmark("gpu_dmd")
    teacher = gpu_dmd.save_teacher(tmp_path / "teacher", gpu_dmd.TINY_UNET, 8)
    want = {"bf16": (False, None, "fp32", True), "bf16+compile": (True, None, "fp32", False),
            "bf16+compile+cudagraphs": (True, "reduce-overhead", "fp32", False), "bare:bf16+compile": (False, None, "fp32", True),
            "bf16+bf16_teacher": (False, None, "bf16", True), "bf16+per_call_casts": (False, None, "fp32", False)}
    for s in gpu_dmd.SETTINGS:
        if s.cuda_graph:  # runtime.cuda_graph reaches the run, whose engine refuses it without CUDA
            with pytest.raises(UserError, match="CUDA graphs need a CUDA device"):
                gpu_dmd.setting_run(teacher, "cpu", s, 2)
        elif s.name in want:
            run = gpu_dmd.setting_run(teacher, "cpu", s, 2)
            cfg, copies = run.config, run.trained["generator"].copies is not None
            assert (cfg.runtime.compile, cfg.runtime.compile_mode, cfg.teacher.config.dtype, copies) == want[s.name], s.name


@pytest.mark.slow
def test_gpu_script_keeps_to_its_time_budget(tmp_path):
    """A compiled row (minutes of warm-up) runs in a child process that is stopped at --budget; the rows done are
    kept, the script ends in time with exit 0, and a row with no time left is skipped."""
    import time

    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_dmd.py"), "--device", "cpu", "--tiny", "--batch", "8",
           "--iters", "1", "--warmup", "1", "--no-profile", "--budget", "40", "--out", str(out),
           "--only", "bf16", "bf16+compile", "bf16+compile+cudagraphs"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the compile row alone would take minutes: it was stopped. The margin is the interpreter's start and exit,
    # which take seconds on an idle machine and can take a minute on a loaded one
    assert wall < 40 + 90, wall
    rows = json.loads(out.read_text())["settings"]
    assert _positive_finite(rows["bf16"]["images_per_s"])
    assert "stopped at the time budget" in rows["bf16+compile"]["error"]
    assert "no time left" in rows["bf16+compile+cudagraphs"]["skipped"]


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_gpu_scripts_bare_loop_computes_what_the_trainer_computes(tmp_path, precision):
    """The GPU table's bare rows time overhead.py's hand-written iteration: from the same weights and seeds it must
    give the trainer's losses and weights, in fp32 and under bf16 autocast (the same arithmetic, written out)."""
    from scoredistill.trainer import train_iteration

    gpu_dmd, overhead = _load_benchmark("gpu_dmd"), _load_benchmark("overhead")
    teacher = gpu_dmd.save_teacher(tmp_path / "teacher", gpu_dmd.TINY_UNET, 8)
    run = gpu_dmd.make_run(teacher, 4, "cpu", precision, False, False, False)
    bare = overhead.Bare(run)
    for seed in range(3):
        torch.manual_seed(seed)
        mine = train_iteration(run)
        torch.manual_seed(seed)
        theirs = bare.iteration()
        for key in ("generator", "fake_score"):
            assert torch.allclose(mine[key], theirs[key], rtol=1e-6, atol=0), (seed, key, mine[key], theirs[key])
    assert mine["fake_score"] > 0 and mine["generator"] > 0  # the later iterations do work: there is something to compare
    for ours, hand in ((run.models.generator.denoiser.unet, bare.g_net), (run.models.fake_score.denoiser.unet, bare.f_net)):
        assert max(float((p - q).abs().max()) for p, q in zip(ours.parameters(), hand.parameters())) < 1e-6


def test_the_memory_benchmark_counts_a_lora_runs_state_as_the_arithmetic_says(hooks, tmp_path):
    """benchmarks/memory.py's exact state count on a tiny LoRA run: the fp32 base once, and per adapter parameter
    4 bytes of weight, 4 of gradient and 8 of Adam's moments (plus Adam's 4-byte step per tensor)."""
    from scoredistill.config import resolve
    from scoredistill.images.testing import tiny_diffusers_teacher_folder
    from scoredistill.trainer import build, setup, train_iteration

    memory = _load_benchmark("memory")
    folder = tiny_diffusers_teacher_folder(tmp_path / "teacher")
    config = resolve(hooks.registry, "dmd", "digits", ["regression"], [
        "teacher.component=diffusers_unet", f"teacher.path={folder}", "generator.component=unet_generator",
        "fake_score.component=unet_denoiser", "train.batch_size=2", "train.ema_decay=null", "runtime.progress=false",
        "train.fake_score_warmup_steps=0", "train.lora.rank=2"])
    run = build(config, hooks, tmp_path / "run")
    setup(run)
    train_iteration(run)
    adapters = [p for role in (run.models.generator, run.models.fake_score) for p in role.parameters()]
    n = sum(p.numel() for p in adapters)
    base = sum(p.numel() for name, p in run.models.teacher.named_parameters() if "lora_" not in name)
    buffers = sum(b.numel() * b.element_size() for b in run.models.teacher.buffers())
    state = memory.state_bytes(run)
    assert state == {"teacher_or_base": 4 * base + buffers, "trained_weights": 4 * n, "gradients": 4 * n,
                     "optimizer": 8 * n + 4 * len(adapters)}
    assert memory.auto_rank(folder, share=0.5) >= 1
