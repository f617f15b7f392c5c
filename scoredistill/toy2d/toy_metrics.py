"""Exact metrics for samples of a known Gaussian mixture.

Each sample is assigned to the component of highest posterior probability
(Bayes' rule on the clean mixture). From that:

* ``mode_mass[k]``: the share of samples assigned to component ``k``;
* ``mode_coverage``: the fraction of components whose share is at least half of
  their weight;
* ``mode_std_ratio[k]``: RMS per-dimension distance of the assigned samples to
  ``mu_k``, over the true ``s_k`` (1.0 when the spread is right);
* ``within_3std``: the share of samples within ``3 s_k`` of some centre ``mu_k``
  (``1 - exp(-4.5) = 0.989`` for exact 2-D samples);
* ``energy_distance``: the (squared) energy distance to fresh exact samples,
  ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (Székely & Rizzo 2013), zero iff the
  distributions are equal.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from scoredistill.toy2d.gaussian_mixture import GaussianMixtureTeacher

ENERGY_SAMPLES = 2000


def _mean_pdist(a: torch.Tensor, b: torch.Tensor, same: bool) -> float:
    d = torch.cdist(a.double(), b.double())
    if same:
        n = len(a)
        return float(d.sum() / (n * (n - 1)))
    return float(d.mean())


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased (U-statistic) squared energy distance between two samples."""
    return 2 * _mean_pdist(x, y, False) - _mean_pdist(x, x, True) - _mean_pdist(y, y, True)


def mixture_metrics(teacher: GaussianMixtureTeacher, samples: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    x = samples.double()
    finite = torch.isfinite(x).all(dim=1)
    x = x[finite]
    k = len(teacher.weights)
    assign = teacher.responsibilities(x).argmax(dim=1)
    counts = torch.bincount(assign, minlength=k).double()
    mass = counts / max(len(x), 1)
    weights = teacher.weights.cpu()
    d = teacher.dim
    std_ratio: list[float | None] = []
    for j in range(k):
        mine = x[assign == j]
        if len(mine) < 2:
            std_ratio.append(None)
            continue
        rms = ((mine - teacher.means[j]) ** 2).sum(1).mean().div(d).sqrt()
        std_ratio.append(round(float(rms / teacher.stds[j]), 4))
    dist = torch.cdist(x, teacher.means.double()) / teacher.stds.double()[None]
    g = torch.Generator().manual_seed(seed)
    fresh = teacher.sample(ENERGY_SAMPLES, generator=g)
    return {
        "mode_coverage": float((mass >= 0.5 * weights).double().mean()),
        "mode_mass": [round(float(m), 4) for m in mass],
        "max_mass_error": round(float((mass - weights).abs().max()), 4),
        "mode_std_ratio": std_ratio,
        "within_3std": round(float((dist.min(dim=1).values <= 3.0).double().mean()), 4),
        "energy_distance": round(energy_distance(x[:ENERGY_SAMPLES].float(), fresh), 5),
        "non_finite": int((~finite).sum()),
    }


def exact_within_3std(dim: int) -> float:
    """P(|x - mu| <= 3 s) for an isotropic Gaussian (chi distribution); 2-D: 1 - exp(-4.5)."""
    if dim == 2:
        return 1 - math.exp(-4.5)
    return float(torch.special.gammainc(torch.tensor(dim / 2.0, dtype=torch.float64), torch.tensor(4.5, dtype=torch.float64)))
