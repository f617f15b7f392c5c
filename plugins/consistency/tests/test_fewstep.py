"""Few-step generators: DMD2's timesteps, the sampler against a hand-written loop, one step == G(z) bit for bit,
backward simulation, ``sample --steps`` and its bad inputs, resume with EMA targets and backward simulation."""

from __future__ import annotations

import torch
import pytest
from safetensors.torch import load_file

from scoredistill.cli import main
from scoredistill.config import resolve
from scoredistill.errors import UserError
from scoredistill.fewstep import chain_timesteps
from scoredistill.roles import BuildContext
from scoredistill.trainer import build, one_step_samples

TOY = ["train.batch_size=32", "eval.num_samples=200", "runtime.progress=false", "train.fake_score_warmup_steps=2",
       "train.log_every=2", "train.sample_every=null", "generator.teacher_init_steps=20"]


def toy_run(hooks, tmp_path, method="dmd2_4step", extra=()):
    return build(resolve(hooks.registry, method, "toy2d", [], TOY + list(extra)), hooks, tmp_path)


def test_dmd2_timesteps_and_too_many_steps():
    assert chain_timesteps(1000, 4) == [999, 749, 499, 249]
    assert chain_timesteps(1000, 1) == [999]
    assert chain_timesteps(5, 5) == [4, 3, 2, 1, 0]
    with pytest.raises(UserError, match="more than the teacher's schedule has"):
        chain_timesteps(1000, 1001)


def test_sampler_equals_a_hand_written_chain(hooks, tmp_path):
    run = toy_run(hooks, tmp_path, extra=["generator.steps=3"])
    g, teacher = run.models.generator.eval(), run.models.teacher
    out = one_step_samples(g, 50, seed=3, steps=3)
    # by hand: z and each re-noising eps from the seed, in order; timesteps T-1-k*floor(T/3)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(50, 2, generator=gen)
    sig = [teacher.sigmas[999], teacher.sigmas[666], teacher.sigmas[333]]
    x = z * sig[0]
    with torch.no_grad():
        for k in range(3):
            x0 = g.denoiser(x, torch.full((50,), float(sig[k])))
            if k < 2:
                x = x0 + sig[k + 1] * torch.randn(50, 2, generator=gen)
    torch.testing.assert_close(out, x0, rtol=0, atol=0)
    # its own default is its K; one-step sampling is G(s_max z, s_max)
    assert torch.equal(one_step_samples(g, 50, seed=3), out)
    one = one_step_samples(g, 50, seed=3, steps=1)
    with torch.no_grad():
        assert torch.equal(one, g.denoiser(torch.randn(50, 2, generator=torch.Generator().manual_seed(3)) * sig[0],
                                           torch.full((50,), float(sig[0]))))


def test_one_step_fewstep_generator_is_todays_unet_generator_bit_for_bit(hooks, tmp_path):
    from scoredistill.images.testing import tiny_diffusers_teacher_folder

    folder = tiny_diffusers_teacher_folder(tmp_path / "teacher")
    reg = hooks.registry
    teacher = reg.component("teacher", "diffusers_unet").cls(
        reg.component("teacher", "diffusers_unet").cls.Config(path=str(folder)), None).eval().requires_grad_(False)
    ctx = BuildContext(hooks=hooks, teacher=teacher)
    today = reg.component("generator", "unet_generator").cls(reg.component("generator", "unet_generator").cls.Config(), ctx)
    cls = reg.component("generator", "fewstep_generator").cls
    fewstep = cls(cls.Config(steps=1), ctx)
    z = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(today(z), fewstep(z))  # training mode: K = 1 has nothing to simulate
        assert torch.equal(one_step_samples(today, 4, seed=0), one_step_samples(fewstep, 4, seed=0))


def test_one_step_training_draws_no_extra_noise(hooks, tmp_path):
    g = toy_run(hooks, tmp_path, extra=["generator.steps=1"]).models.generator.train()
    z = torch.randn(16, 2)
    state = torch.get_rng_state()
    x = g(z)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(x, g.denoise(z * g.chain[0], g.chain[0].expand(16)))


def test_backward_simulation_runs_the_generators_own_chain_then_one_step_with_grad(hooks, tmp_path):
    g = toy_run(hooks, tmp_path, extra=["generator.steps=3"]).models.generator.train()
    s = g.chain
    z = torch.randn(64, 2)
    torch.manual_seed(5)
    x = g(z)
    # by hand, with the same draws: the step of each sample, then the chain's noise
    torch.manual_seed(5)
    k = torch.randint(0, 3, (64,))
    with torch.no_grad():
        x1 = g.denoise(z * s[0], s[0].expand(64)) + s[1] * torch.randn(64, 2)
        x2 = g.denoise(x1, s[1].expand(64)) + s[2] * torch.randn(64, 2)
    inputs = torch.stack([z * s[0], x1, x2])[k, torch.arange(64)]
    expected = g.denoise(inputs, s[k])
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)
    assert {0, 1, 2} == set(k.tolist())
    # the gradient reaches the weights through the last step only: it equals that of G(inputs, s_k) alone
    g.zero_grad()
    x.sum().backward()
    grads = [p.grad.clone() for p in g.parameters()]
    g.zero_grad()
    expected.sum().backward()
    for a, b in zip(grads, [p.grad for p in g.parameters()]):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_cli_fewstep_run_then_sample_steps_and_bad_inputs(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["--preset", "toy2d", "--quiet", "--set", "train.steps=4", "--set", "train.batch_size=32", "--set",
            "train.fake_score_warmup_steps=1", "--set", "eval.num_samples=100", "--set", "train.sample_every=null",
            "--set", "generator.teacher_init_steps=20"]
    assert main(["run", "dmd2_4step", "--out", str(run_dir), *base]) == 0
    capsys.readouterr()
    for k in (1, 2, 4):
        assert main(["sample", str(run_dir), "--num", "10", "--out", str(tmp_path / f"s{k}.npy"), "--steps", str(k)]) == 0
    for args, message in ((["--steps", "0"], "--steps must be a positive integer"),
                          (["--steps", "1001"], "more than the teacher's schedule has")):
        assert main(["sample", str(run_dir), "--num", "10", "--out", str(tmp_path / "bad.npy"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert main(["run", "cd", "--out", str(tmp_path / "bad"), *base, "--set", "generator.steps=1001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than the teacher's schedule has" in err[0], err
    # LCM: guidance folded into the solver needs a conditional teacher
    assert main(["run", "lcm", "--out", str(tmp_path / "bad2"), *base, "--set", "losses.consistency.guidance_scale=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a conditional teacher" in err[0], err
    lcm = tmp_path / "lcm"
    assert main(["run", "lcm", "--out", str(lcm), *base, "--set", "teacher.class_conditional=true",
                 "--set", "losses.consistency.guidance_scale=2", "--set", "generator.guidance_embedding=0"]) == 0
    assert main(["sample", str(lcm), "--num", "10", "--out", str(tmp_path / "lcm.npy"), "--steps", "2"]) == 0
    assert (tmp_path / "lcm_labels.npy").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("cd", ["losses.consistency.target.decay=0.9", "train.ema_decay=0.9"]),
    ("dmd2_4step", []),
    ("scm", ["losses.consistency.warmup_steps=15"]),
    ("lcm", ["teacher.class_conditional=true"]),  # the guidance embedding: w drawn per sample
])
def test_resume_is_bitwise_with_ema_targets_and_backward_simulation(tmp_path, method, extra):
    base = ["--preset", "toy2d", "--quiet", "--set", "train.batch_size=32", "--set", "train.fake_score_warmup_steps=1",
            "--set", "eval.num_samples=100", "--set", "train.sample_every=null", "--set", "train.log_every=2",
            "--set", "generator.teacher_init_steps=20"]
    for item in extra:
        base += ["--set", item]
    short, longer = tmp_path / "short", tmp_path / "long"
    assert main(["run", method, "--out", str(short), *base, "--set", "train.steps=6"]) == 0
    assert main(["run", method, "--out", str(longer), *base, "--set", "train.steps=12"]) == 0
    assert main(["run", "--resume", str(short), "--set", "train.steps=12", "--quiet"]) == 0
    a, b = load_file(str(short / "generator.safetensors")), load_file(str(longer / "generator.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (load_file(str(sorted(d.glob("checkpoint-step-*.safetensors"))[-1])) for d in (short, longer))
    targets = [k for k in ca if k.startswith("losses.")]
    assert (method == "dmd2_4step") or targets  # the consistency terms' target networks are in the checkpoint
    assert all(torch.equal(ca[k], cb[k]) for k in targets)


def test_a_one_step_generator_refuses_more_steps(hooks, tmp_path):
    run = build(resolve(hooks.registry, "dmd", "toy2d", [], ["runtime.progress=false", "pairs.num_pairs=16"]), hooks, tmp_path)
    with pytest.raises(UserError, match="is one-step") as info:
        one_step_samples(run.models.generator, 4, seed=0, steps=2)
    assert "\n" not in str(info.value)
    assert one_step_samples(run.models.generator, 4, seed=0, steps=1).shape == (4, 2)


@pytest.mark.slow
def test_the_fewstep_results_script_runs(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    out = tmp_path / "table"
    cmd = [sys.executable, str(root / "benchmarks" / "fewstep_toy2d.py"), "--out", str(out), "--seeds", "1", "--methods", "cd",
           "--set", "train.steps=3", "--set", "eval.num_samples=100", "--set", "generator.teacher_init_steps=5"]
    proc = subprocess.run(cmd, cwd=root, env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    values = json.loads(out.with_suffix(".json").read_text())
    assert set(values["cd"]) == {"1", "2", "4"}
    assert "| cd | 4 |" in out.with_suffix(".md").read_text()


def test_the_fewstep_speed_script_runs(tmp_path, capsys):
    """benchmarks/fewstep_speed.py on a tiny UNet teacher (an untrained few-step generator of its shape) and on a
    trained toy2d run: images/s at 1, 2 and 4 steps, the teacher's Euler at those NFEs and its own Heun sampler."""
    import importlib.util
    import json
    from pathlib import Path

    from scoredistill.images.testing import tiny_diffusers_teacher_folder

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "fewstep_speed.py"
    spec = importlib.util.spec_from_file_location("fewstep_speed", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder = tiny_diffusers_teacher_folder(tmp_path / "teacher")
    out = tmp_path / "speed.json"
    assert script.main(["--preset", "teacher", "--method", "cd", "--set", f"teacher.path={folder}", "--set",
                        "teacher.sampler_steps=3", "--batch", "4", "--repeats", "1", "--out", str(out)]) == 0
    rates = json.loads(out.read_text())["images_per_s"]
    assert set(rates) == {"generator_1_step", "generator_2_step", "generator_4_step", "teacher_euler_1_nfe",
                          "teacher_euler_2_nfe", "teacher_euler_4_nfe", "teacher_heun_5_nfe"}
    assert all(v > 0 for v in rates.values())
    assert "| generator, 4 step(s) | 4 |" in capsys.readouterr().out
    run_dir = tmp_path / "run"
    assert main(["run", "cd", "--preset", "toy2d", "--out", str(run_dir), "--quiet", "--set", "train.steps=2",
                 "--set", "eval.num_samples=50", "--set", "generator.teacher_init_steps=5"]) == 0
    assert script.main(["--run", str(run_dir), "--batch", "8", "--repeats", "1", "--steps", "1,4"]) == 0
    assert "| teacher, Euler 4 step(s) | 4 |" in capsys.readouterr().out
