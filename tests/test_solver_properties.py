"""Properties every solver in tests/solver_list.py must have (hypothesis over shapes/schedules)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adjointflow import BrownianNoise, LinearFlow, solve, timesteps
from adjointflow.testing import GaussianData
from adjointflow.testing.strategies import schedules, shapes
from solver_list import ALL_SOLVERS, ODE_SOLVERS

IDS = [s[0] for s in ALL_SOLVERS]


def make(sch, shape, dtype=torch.float64):
    dims = shape[1:]
    g = torch.Generator().manual_seed(0)
    d = GaussianData(torch.randn(dims, generator=g, dtype=torch.float64).to(dtype),
                     (0.5 + torch.rand(dims, generator=g, dtype=torch.float64)).to(dtype))
    pred = "velocity" if isinstance(sch, LinearFlow) else "eps"
    return d.denoiser(sch, pred)


def grid_for(sch, n):
    return timesteps(sch, n, "logsnr", t_start=min(sch.t_start, 0.99), t_end=0.01)


def run(factory, kind, den, x, g, seed=0, solver=None):
    noise = BrownianNoise(x.shape, seed=seed, dtype=x.dtype) if kind == "sde" else None
    with torch.no_grad():
        return solve(den, x, g, factory() if solver is None else solver, noise=noise).x


@pytest.mark.parametrize("name, factory, order, kind", ALL_SOLVERS, ids=IDS)
@settings(max_examples=8, deadline=None)
@given(sch=schedules(), shape=shapes(), n=st.integers(1, 12))
def test_deterministic_dtype_and_shape(name, factory, order, kind, sch, shape, n):
    den = make(sch, shape)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = grid_for(sch, n)
    solver = factory()  # the same instance twice: no hidden state may survive a solve
    a, b = run(factory, kind, den, x, g, solver=solver), run(factory, kind, den, x, g, solver=solver)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)  # solving twice gives the same answer (no hidden state)
    assert bool(torch.isfinite(a).all())


@pytest.mark.parametrize("name, factory, order", ODE_SOLVERS, ids=[s[0] for s in ODE_SOLVERS])
@settings(max_examples=6, deadline=None)
@given(sch=schedules(), shape=shapes(max_batch=4), n=st.integers(1, 10))
def test_batch_invariance(name, factory, order, sch, shape, n):
    # A sample solved alone equals it solved inside a batch (per-sample independence).
    den = make(sch, shape)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = grid_for(sch, n)
    full = run(factory, "ode", den, x, g)
    for i in range(shape[0]):
        assert torch.allclose(run(factory, "ode", den, x[i : i + 1], g)[0], full[i], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, factory, order, kind", ALL_SOLVERS, ids=IDS)
@settings(max_examples=5, deadline=None)
@given(sch=schedules(), shape=shapes())
def test_float32_close_to_float64(name, factory, order, kind, sch, shape):
    den64, den32 = make(sch, shape), make(sch, shape, torch.float32)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = grid_for(sch, 10)
    a = run(factory, kind, den64, x, g)
    b = run(factory, kind, den32, x.float(), g)
    assert b.dtype == torch.float32
    scale = 1 + float(a.abs().max())
    assert float((b.double() - a).abs().max()) < 2e-4 * scale
