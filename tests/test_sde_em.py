"""Euler--Maruyama on the reverse VP SDE: pathwise convergence and exact marginals."""
import torch

from adjointflow import BrownianNoise, EulerMaruyama, VPLinear, solve, timesteps
from adjointflow.testing import GaussianData, empirical_order


def problem():
    sch = VPLinear()
    d = GaussianData(torch.linspace(-1.0, 1.0, 4, dtype=torch.float64), torch.full((4,), 0.6, dtype=torch.float64))
    return sch, d, d.denoiser(sch, "eps")


def test_pathwise_strong_convergence_on_fixed_brownian_path():
    # Additive noise (g depends on t only) -> EM has strong order 1 (Kloeden & Platen §10.2).
    # All grids are nested uniform-t grids and share one BrownianNoise object = one Brownian path.
    sch, d, den = problem()
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    noise = BrownianNoise(x.shape, seed=11, dtype=torch.float64)
    grid = lambda n: timesteps(sch, n, "uniform", t_start=1.0, t_end=0.02)
    with torch.no_grad():
        ref = solve(den, x, grid(5120), EulerMaruyama(), noise=noise).x
        ns = [40, 80, 160, 320]
        errs = [float((solve(den, x, grid(n), EulerMaruyama(), noise=noise).x - ref).pow(2).mean().sqrt()) for n in ns]
    p = empirical_order(ns, errs)
    # measured ~1.0; strong order 1 for additive noise, asserted with the suite's 0.15 tolerance
    assert p >= 0.85, (p, errs)


def test_marginal_matches_exact_gaussian():
    # Start from the exact marginal at t=1; the reverse SDE keeps every marginal exact, so at t_end the
    # sample mean/variance must match N(alpha mu, alpha^2 s^2 + sigma^2) up to Monte-Carlo error + O(h).
    sch, d, den = problem()
    n = 4000
    x1 = d.prior_sample(sch, 1.0, n, generator=torch.Generator().manual_seed(0))
    t_end = 0.05
    with torch.no_grad():
        out = solve(den, x1, timesteps(sch, 400, "uniform", t_start=1.0, t_end=t_end), EulerMaruyama(),
                    noise=BrownianNoise(x1.shape, seed=5, dtype=torch.float64)).x
    m, sd = d.marginal(sch, t_end, like=out)
    se_mean = sd / n**0.5
    assert bool(((out.mean(0) - m).abs() < 4 * se_mean + 5e-3).all()), (out.mean(0), m)
    # variance: standard error of the sample variance is ~ sd^2 sqrt(2/n)
    assert bool(((out.var(0) - sd**2).abs() < 4 * sd**2 * (2 / n) ** 0.5 + 5e-3).all()), (out.var(0), sd**2)


def test_same_seed_same_result_and_other_seed_differs():
    sch, d, den = problem()
    x = torch.randn(3, 4, dtype=torch.float64)
    g = timesteps(sch, 20)
    a = solve(den, x, g, EulerMaruyama(), noise=BrownianNoise(x.shape, seed=1, dtype=torch.float64)).x
    b = solve(den, x, g, EulerMaruyama(), noise=BrownianNoise(x.shape, seed=1, dtype=torch.float64)).x
    c = solve(den, x, g, EulerMaruyama(), noise=BrownianNoise(x.shape, seed=2, dtype=torch.float64)).x
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # the default noise is seeded from torch's generator (tests/test_sde_seed.py)
    torch.manual_seed(5)
    d1 = solve(den, x, g, EulerMaruyama()).x
    torch.manual_seed(5)
    assert torch.equal(d1, solve(den, x, g, EulerMaruyama()).x)


def test_singular_reverse_sde_is_a_clear_error():
    import pytest

    from adjointflow import LinearFlow

    d = GaussianData(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    den = d.denoiser(LinearFlow(), "velocity")
    with pytest.raises(ValueError, match="singular at t=1"):
        solve(den, torch.randn(3, 2, dtype=torch.float64), timesteps(LinearFlow(), 5), EulerMaruyama())
