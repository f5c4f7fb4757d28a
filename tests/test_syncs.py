"""No host-device synchronisation inside the step loop: the number of syncs of a whole solve + backward is
the same at 10 and at 40 steps, for every solver in tests/solver_list.py and every gradient strategy.

Counted with a TorchDispatchMode on the ops that read a tensor on the host (``.item()``, ``float(t)``,
``bool(t)`` dispatch to ``aten._local_scalar_dense`` / ``aten.is_nonzero`` / ``aten.item``): on CPU they
cost nothing, on a GPU each one drains the launch queue.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adjointflow as af
from adjointflow.adjoint import Backprop, Checkpoint, ContinuousAdjoint
from adjointflow.solvers import BespokeSolver
from adjointflow.solvers.bespoke_ns import BespokeNSSolver

from solver_list import ALL_SOLVERS

SYNC = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default}


class Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC:
            self.n += 1
        return func(*args, **(kwargs or {}))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.f = torch.nn.Linear(9, 8)

    def forward(self, x, t):
        return self.f(torch.cat([x, t[:, None].to(x.dtype)], 1))


def vp_discrete():
    return af.VPDiscrete(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))


STRATEGIES = [Backprop(), Checkpoint(), Checkpoint(keep=0), ContinuousAdjoint()]


def count(den, solver, strategy, n, **grid_kw):
    torch.manual_seed(0)
    grid = af.timesteps(den.schedule, n, **grid_kw)
    x = torch.randn(2, 8, requires_grad=True)
    noise = af.BrownianNoise((2, 8), seed=1) if solver.stochastic else None
    with Syncs() as c:
        af.solve(den, x, grid, solver, gradient=strategy, noise=noise).x.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return c.n


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: repr(s))
@pytest.mark.parametrize("name, factory, order, kind", ALL_SOLVERS, ids=[s[0] for s in ALL_SOLVERS])
def test_sync_count_does_not_grow_with_steps(name, factory, order, kind, strategy):
    den = af.Denoiser(Net(), vp_discrete(), "eps")
    counts = [count(den, factory(), strategy, n) for n in (10, 40)]
    assert counts[0] == counts[1], f"{name} with {strategy!r}: {counts[0]} syncs at N=10, {counts[1]} at N=40"


@pytest.mark.parametrize("name, factory", [(s[0], s[1]) for s in ALL_SOLVERS if s[3] == "ode"],
                         ids=[s[0] for s in ALL_SOLVERS if s[3] == "ode"])
def test_sync_count_from_a_singular_end(name, factory):
    # a flow from t = 1 (alpha = 0, lambda = -inf): first-order limit steps are planned, not detected per step
    den = af.Denoiser(Net(), af.LinearFlow(), "velocity")
    counts = [count(den, factory(), Backprop(), n, kind="uniform", t_start=1.0) for n in (10, 40)]
    assert counts[0] == counts[1], counts


BESPOKE = {"bespoke_rk1": lambda n: BespokeSolver(n, "rk1"), "bespoke_rk2": lambda n: BespokeSolver(n, "rk2"),
           "bespoke_ns": lambda n: BespokeNSSolver(n)}


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: repr(s))
@pytest.mark.parametrize("name", list(BESPOKE))
def test_sync_count_bespoke(name, strategy):
    # learned solvers step with tensor coefficients (their parameters): none is read on the host per step
    if name == "bespoke_ns" and isinstance(strategy, ContinuousAdjoint):
        pytest.skip("BespokeNSSolver has no continuous adjoint (refused with a clear error, tests/test_bespoke.py)")
    den = af.Denoiser(Net(), af.LinearFlow(), "velocity")
    counts = []
    for n in (10, 40):
        solver = BESPOKE[name](n)
        x = torch.randn(2, 8, requires_grad=True)
        with Syncs() as c:
            af.solve(den, x, solver.timesteps(1.0, 1e-3), solver, gradient=strategy).x.square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        counts.append(c.n)
    assert counts[0] == counts[1], f"{name} with {strategy!r}: {counts[0]} syncs at N=10, {counts[1]} at N=40"
