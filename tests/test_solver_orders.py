"""Generic convergence-order suite: every ODE solver in tests/solver_list.py on GaussianData.

Errors are measured against the exact PF-ODE map (adjointflow.testing.GaussianData.flow_map) in
float64 on grids uniform in log-SNR that stop at the grid's last time (the final "denoise to 0"
step is tested separately by the solver suites). The slope must reach the declared order - 0.15.
"""
import pytest
import torch

from adjointflow import EDM, LinearFlow, VPCosine, VPLinear, solve, timesteps
from adjointflow.testing import GaussianData, empirical_order

from solver_list import ODE_SOLVERS, ORDER_STEPS

SCHEDULES = [
    ("vplinear", VPLinear(), {}),
    ("vpcosine", VPCosine(), {}),
    ("edm", EDM(), {"t_end": 0.05}),  # sigma from 80 down to ~0.01
    ("linearflow", LinearFlow(), {"t_start": 0.99}),  # lambda(1) = -inf: a log-SNR grid must start below 1
]


def data():
    mu = torch.linspace(-1.5, 2.0, 8, dtype=torch.float64)
    s = torch.logspace(-1, 0.3, 8, dtype=torch.float64)
    return GaussianData(mu, s)


def errors(solver, sch, grid_kw, ns, prediction="eps"):
    d = data()
    den = d.denoiser(sch, prediction)
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = []
    with torch.no_grad():
        for n in ns:
            g = timesteps(sch, n, "logsnr", **grid_kw)
            ref = d.flow_map(sch, x, g[0], g[-1])
            out.append(float((solve(den, x, g, solver).x - ref).pow(2).mean().sqrt()))
    return out


def steps_for(order):
    # asymptotic but above the float64 floor for each order
    return {1: [40, 80, 160, 320], 2: [20, 40, 80, 160], 3: [10, 20, 40, 80]}.get(order, [10, 20, 40, 80])


@pytest.mark.parametrize("sid, sch, grid_kw", SCHEDULES, ids=[s[0] for s in SCHEDULES])
@pytest.mark.parametrize("name, factory, order", ODE_SOLVERS, ids=[s[0] for s in ODE_SOLVERS])
def test_declared_order(name, factory, order, sid, sch, grid_kw):
    ns = ORDER_STEPS.get(name, steps_for(order))
    errs = errors(factory(), sch, grid_kw, ns, prediction="velocity" if sid == "linearflow" else "eps")
    p = empirical_order(ns, errs)
    assert p >= order - 0.15, f"{name} on {sid}: slope {p:.2f} < {order} - 0.15; errors {errs}"
    assert errs[-1] < errs[0]


@pytest.mark.parametrize("factory, order", [(f, o) for n, f, o in ODE_SOLVERS if n in ("euler", "heun")])
def test_flow_uniform_t_orders(factory, order):
    # Flow models are usually sampled on a uniform t grid from t = 1 exactly.
    sch, d = LinearFlow(), data()
    den = d.denoiser(sch, "velocity")
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ns = [20, 40, 80, 160]
    errs = []
    for n in ns:
        g = timesteps(sch, n, "uniform", t_start=1.0, t_end=1e-3)
        with torch.no_grad():
            errs.append(float((solve(den, x, g, factory()).x - d.flow_map(sch, x, 1.0, 1e-3)).abs().max()))
    assert empirical_order(ns, errs) >= order - 0.15, errs
