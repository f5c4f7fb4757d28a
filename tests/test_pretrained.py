"""adjointflow.pretrained: the bundled digits model and its trained solvers, ready to use."""
import pytest
import torch

import adjointflow as af
from adjointflow import pretrained

pytest.importorskip("safetensors")


def test_digits_is_a_ready_frozen_flow_denoiser():
    den = pretrained.digits()
    assert isinstance(den, af.Denoiser) and isinstance(den.schedule, af.LinearFlow)
    assert den.prediction == "velocity"
    assert not any(p.requires_grad for p in den.net.parameters())
    x1 = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = af.solve(den, x1, af.timesteps(den.schedule, 6, t_start=0.999, t_end=1e-3), af.Euler(),
                     cond=torch.tensor([0, 5, 10])).x
    assert x.shape == (3, 1, 16, 16) and bool(torch.isfinite(x).all())


def test_bundled_solver_beats_the_generic_ones_at_its_budget():
    den = pretrained.digits()
    assert 10 in pretrained.digits_solver_nfes()
    solver = pretrained.digits_solver(10, denoiser=den)
    assert isinstance(solver, af.BespokeSolver) and not any(p.requires_grad for p in solver.parameters())
    x1 = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6)
    g = solver.timesteps()
    with torch.no_grad():
        ref = af.solve(den, x1, af.timesteps(den.schedule, 60, "uniform", t_start=float(g[0]), t_end=float(g[-1])),
                       af.Heun(), cond=labels).x
        fast = af.solve(den, x1, g, solver, cond=labels)
        dpm = af.solve(den, x1, af.timesteps(den.schedule, 10, "quadratic", t_start=float(g[0]), t_end=float(g[-1])),
                       af.DPMSolverPP(), cond=labels).x
    assert fast.nfe == 10 and not fast.x.requires_grad
    assert float((fast.x - ref).pow(2).mean()) < 0.5 * float((dpm - ref).pow(2).mean())


def test_bad_requests_are_clear_errors():
    with pytest.raises(ValueError, match="bundled digits solvers exist for NFE"):
        pretrained.digits_solver(7)
    with pytest.raises(ValueError, match="bundled digits solvers exist for NFE"):
        pretrained.digits_solver(True)
    from adjointflow.testing import GaussianData

    other = GaussianData(torch.zeros(1, 16, 16), torch.ones(1, 16, 16)).denoiser(af.LinearFlow(), "velocity")
    with pytest.raises(ValueError):
        pretrained.digits_solver(10, denoiser=other)  # trained for another model
    with pytest.raises(FileNotFoundError):
        pretrained.digits("/nonexistent/weights.safetensors")
