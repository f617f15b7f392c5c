"""Where DMD's KL gradient comes from: its size and signal-to-noise ratio per noise level, on a finished run.

    python benchmarks/kl_gradient_snr.py RUN_DIR [--samples 256] [--draws 16] [--ratios 0.05 0.15 ...] [--out FILE]

For ``--samples`` generator outputs ``x = G(z)`` of the run (EMA weights, as evaluated)
and each timestep ratio ``r`` (``t = r T`` on the teacher's schedule, as the KL gradient
draws it), the normalised per-sample gradient of DMD eq. 7-8,
``g = (D_fake(x_s) - D_real(x_s)) / mean|x - D_real(x_s)|``, is computed for ``--draws``
independent noises ``x_s = x + s eps``. Reported per level, averaged over samples:

* ``signal``: ``|E_eps g|^2``, the squared size of the gradient a sample gets on average;
* ``noise``: ``E_eps |g - E_eps g|^2``, the variance one draw adds around it;
* ``snr``: their ratio for a single draw (what one training step sees);
* ``teacher_mean_bias``: ``rms_pixels(mean D_real(x + s eps) - mean x)`` over real data ``x``
  (where the teacher has real data), and ``fake_mean_bias``, the same for ``D_fake`` over
  generator samples. A denoiser is a posterior mean, so ``E[D(x + s eps)] = E[x]`` exactly
  (the tower property) at every level; what is left is the network's error (plus the
  sampling error of the means, about ``std / sqrt(samples)``). A biased teacher at a level
  gives the KL gradient a push that is the same for every sample there.

The KL gradient draws ``t`` uniformly over the levels, so with evenly spaced ratios (the
default: the middle of each tenth of the schedule) a level's ``share`` of the summed
``signal + noise`` is about that tenth's share of the squared update (Adam rescales the whole). The run's fake score
(``fake_score.safetensors``) is the one the gradient was last computed with; a fake
score equal to the teacher gives ``g = 0`` at every level.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

RATIOS = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)  # the middle of each tenth of the schedule


@torch.no_grad()
def gradient_by_level(models, x: torch.Tensor, ratios, draws: int, seed: int = 0, real: Optional[torch.Tensor] = None,
                      cond: Optional[torch.Tensor] = None) -> list[dict]:
    """Per timestep ratio: the signal, noise and single-draw SNR of DMD's normalised gradient at ``x`` (generated with
    conditions ``cond``, if any), and the mean bias of D_fake on ``x`` and (given ``real`` data) of the teacher on ``real``."""
    from scoredistill.distill import dmd_gradient

    teacher, fake = models.teacher, models.fake_score
    gen = torch.Generator(device=x.device).manual_seed(seed)
    rows = []
    for r in ratios:
        index = min(int(r * teacher.num_timesteps), teacher.num_timesteps - 1)
        sigma = teacher.sigmas[index].expand(len(x))
        g = []
        for _ in range(draws):
            x_s = _noised(x, sigma, gen)
            g.append(dmd_gradient(x, teacher(x_s, sigma, cond), fake(x_s, sigma, cond, x_clean=x)).float())
        g = torch.stack(g)
        mean = g.mean(0)
        signal = mean.pow(2).flatten(1).sum(1).mean().item()
        noise = (g - mean).pow(2).flatten(2).sum(2).mean().item()
        rows.append({"ratio": r, "sigma": round(float(sigma[0]), 5), "signal": signal, "noise": noise,
                     "snr": signal / noise if noise > 0 else float("inf"),
                     "fake_mean_bias": mean_bias(lambda x_s, s: fake(x_s, s, cond, x_clean=x), x, sigma, draws, gen)})
        if real is not None:
            rows[-1]["teacher_mean_bias"] = mean_bias(lambda x_s, s: teacher(x_s, s, None), real, sigma[:1].expand(len(real)), draws, gen)
    return rows


def _noised(x: torch.Tensor, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    from scoredistill.roles import append_dims

    return x + append_dims(sigma, x.ndim) * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


@torch.no_grad()
def mean_bias(denoiser, x: torch.Tensor, sigma: torch.Tensor, draws: int, gen: torch.Generator) -> float:
    """``rms over dimensions of (mean over x, eps of D(x + sigma eps) - mean of x)``: zero for an exact denoiser."""
    total = torch.zeros_like(x[0], dtype=torch.float64)
    for _ in range(draws):
        total += denoiser(_noised(x, sigma, gen), sigma).double().mean(0)
    return float((total / draws - x.double().mean(0)).pow(2).mean().sqrt())


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from scoredistill.errors import UserError
    from scoredistill.io import load_tensors
    from scoredistill.plugins import Hooks
    from scoredistill.roles import seeded_conditions
    from scoredistill.trainer import FAKE_SCORE_FILE, load_run, one_step_samples

    run = load_run(args.run_dir, Hooks())
    if not (args.run_dir / FAKE_SCORE_FILE).is_file():
        raise SystemExit(f"{args.run_dir} has no {FAKE_SCORE_FILE}: this method trains no fake score")
    run.models.fake_score.load_state_dict(load_tensors(args.run_dir / FAKE_SCORE_FILE))
    cond = seeded_conditions(run.models.teacher, args.samples, args.seed)  # a class-conditional teacher's labels, else None
    x = one_step_samples(run.sampling_generator, args.samples, args.seed, run.device, cond=cond).to(run.device)
    try:
        real = run.models.teacher.real_samples(args.samples)
    except UserError:  # a teacher without real data: no teacher bias column
        real = None
    rows = gradient_by_level(run.models, x, args.ratios, args.draws, args.seed, real, cond)
    total = sum(r["signal"] + r["noise"] for r in rows)
    print(f"KL gradient by noise level: {args.run_dir}, {args.samples} samples x {args.draws} draws")
    print("| t / T | sigma | signal |E g|^2 | noise E|g - E g|^2 | single-draw SNR | share of |g|^2 | teacher mean bias | fake mean bias |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["share"] = (r["signal"] + r["noise"]) / total if total > 0 else 0.0
        teacher_bias = f"{r['teacher_mean_bias']:.4f}" if "teacher_mean_bias" in r else "-"
        print(f"| {r['ratio']:.2f} | {r['sigma']:.4g} | {r['signal']:.3f} | {r['noise']:.3f} | {r['snr']:.2f} | {r['share']:.2f} "
              f"| {teacher_bias} | {r['fake_mean_bias']:.4f} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"run": str(args.run_dir), "samples": args.samples, "draws": args.draws, "levels": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
