"""ContinuousAdjoint warns once when its grid is shorter than the measured step threshold for its
AdjointDEIS order and form (adjointflow/adjoint/thresholds.py), naming the threshold and Checkpoint."""
import warnings

import pytest
import torch

import adjointflow as af
from adjointflow.adjoint import adjoint, thresholds
from adjointflow.testing import GaussianData

D = torch.float64


@pytest.fixture(autouse=True)
def fresh():
    thresholds._WARNED.clear()
    yield
    thresholds._WARNED.clear()


def _grad(solver, steps, gradient, sde=False):
    data = GaussianData(torch.zeros(3, dtype=D), torch.full((3,), 0.5, dtype=D))
    den = data.denoiser(af.VPLinear(), "eps")
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    grid = af.timesteps(den.schedule, steps, t_start=0.999 if sde else None)
    noise = af.BrownianNoise(x.shape, seed=0, dtype=D) if sde else None
    af.solve(den, x, grid, solver, gradient=gradient, noise=noise).x.sum().backward()
    return x.grad


def _caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    return [str(m.message) for m in w if issubclass(m.category, UserWarning) and "ContinuousAdjoint" in str(m.message)]


def test_short_grid_warns_once_naming_threshold_and_checkpoint():
    msgs = _caught(lambda: _grad(af.DPMSolverPP(order=2), 5, af.ContinuousAdjoint()))
    assert len(msgs) == 1
    assert "AdjointDEIS-2M" in msgs[0] and "5-step" in msgs[0] and ">= 10 steps" in msgs[0]
    assert "Checkpoint()" in msgs[0]
    assert _caught(lambda: _grad(af.DPMSolverPP(order=2), 5, af.ContinuousAdjoint())) == []  # once


def test_threshold_depends_on_order_and_form():
    assert _caught(lambda: _grad(af.DPMSolverPP(order=2), 10, af.ContinuousAdjoint())) == []  # 2M auto: 10
    one = _caught(lambda: _grad(af.DDIM(), 10, af.ContinuousAdjoint()))  # AdjointDEIS-1 auto needs 20
    assert len(one) == 1 and ">= 20 steps" in one[0]
    assert _caught(lambda: _grad(af.DDIM(), 20, af.ContinuousAdjoint())) == []
    x0 = _caught(lambda: _grad(af.DPMSolverPP(order=2), 40, af.ContinuousAdjoint(form="x0")))
    assert len(x0) == 1 and "up to 160" in x0[0]
    sde = _caught(lambda: _grad(af.SDEDPMSolverPP(order=2), 10, af.ContinuousAdjoint(), sde=True))
    assert len(sde) == 1 and "(SDE)" in sde[0] and ">= 20 steps" in sde[0]


def test_no_warning_for_exact_strategies_own_scheme_solvers_or_no_backward():
    assert _caught(lambda: _grad(af.DPMSolverPP(order=2), 3, af.Checkpoint())) == []
    assert _caught(lambda: _grad(af.Heun(), 3, af.ContinuousAdjoint())) == []  # its own adjoint scheme
    data = GaussianData(torch.zeros(3, dtype=D), torch.ones(3, dtype=D))
    den = data.denoiser(af.VPLinear(), "eps")
    with torch.no_grad():  # no backward pass: nothing to warn about
        assert _caught(lambda: af.solve(den, torch.randn(2, 3, dtype=D), af.timesteps(den.schedule, 3),
                                        af.DDIM(), gradient=af.ContinuousAdjoint())) == []


def test_explicit_adjoint_api_warns_too():
    data = GaussianData(torch.zeros(3, dtype=D), torch.ones(3, dtype=D))
    den = data.denoiser(af.VPLinear(), "eps")
    grid = af.timesteps(den.schedule, 4)
    sol = af.solve(den, torch.randn(2, 3, dtype=D), grid, af.DDIM(), save_trajectory=True)
    msgs = _caught(lambda: adjoint(af.DDIM(), den, grid, sol.x, torch.ones_like(sol.x), trajectory=sol.trajectory))
    assert len(msgs) == 1 and "4-step" in msgs[0]


def test_table_covers_every_configuration():
    for k in (1, 2):
        for sde in (False, True):
            for form in ("auto", "eps", "x0"):
                assert (k, sde, form) in thresholds.MIN_STEPS
