"""The Heun ODE solver and the ODE pair source against the exact flow of a Gaussian."""

from __future__ import annotations

import torch

from scoredistill.pairs import ODEPairs
from scoredistill.sampling import heun_sample, karras_sigmas

from scoredistill.testing import build_context, mixture

MU, S0 = torch.tensor([1.0, -0.5]), 0.6


def exact_flow(x_T: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """For N(mu, s0^2 I), (x - mu) / sqrt(s0^2 + s^2) is constant along the probability-flow ODE."""
    return MU + (x_T - MU) * S0 / (S0**2 + sigma_max**2) ** 0.5


def test_karras_grid_endpoints():
    s = karras_sigmas(18, 0.002, 80.0)
    assert len(s) == 19 and s[-1] == 0
    assert torch.isclose(s[0], torch.tensor(80.0, dtype=s.dtype)) and torch.isclose(s[-2], torch.tensor(0.002, dtype=s.dtype))
    assert torch.all(s[1:] < s[:-1])


def test_heun_converges_to_gaussian_flow_at_second_order():
    """Heun is a 2nd-order method: doubling the steps cuts the error about 4x."""
    teacher = mixture([MU.tolist()], [S0], [1.0])
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    exact = exact_flow(z * teacher.sigma_max, teacher.sigma_max)
    errs = {}
    for n in (40, 80, 160):
        y = heun_sample(teacher, (z * teacher.sigma_max).double(), karras_sigmas(n, teacher.sigma_min, teacher.sigma_max))
        errs[n] = (y - exact).abs().max().item()
    assert errs[160] < 5e-3 * S0
    assert errs[40] / errs[80] > 3.0 and errs[80] / errs[160] > 3.0, errs


def _pairs(tmp_path, **cfg) -> ODEPairs:
    teacher = mixture([MU.tolist()], [S0], [1.0])
    ctx = build_context(teacher, cache_dir=tmp_path)
    return ODEPairs(ODEPairs.Config(**{"num_pairs": 300, "steps": 100, **cfg}), ctx)


def test_ode_pairs_are_the_exact_flow_and_cached(tmp_path):
    first = _pairs(tmp_path)
    assert (first.y - exact_flow(first.z * 80.0, 80.0)).abs().max() < 1e-2 * S0
    assert first.path.is_file()
    stamp = first.path.stat().st_mtime_ns
    again = _pairs(tmp_path)
    assert again.path == first.path and first.path.stat().st_mtime_ns == stamp
    assert torch.equal(again.z, first.z) and torch.equal(again.y, first.y)


def test_ode_pair_cache_key_changes_with_solver_settings(tmp_path):
    a = _pairs(tmp_path)
    b = _pairs(tmp_path, steps=10)
    c = _pairs(tmp_path, seed=7)
    assert len({a.path, b.path, c.path}) == 3
    assert not torch.equal(a.z, c.z)
