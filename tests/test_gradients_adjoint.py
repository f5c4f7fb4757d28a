"""ContinuousAdjoint: AdjointDEIS-1/2M (noise and data forms, ODE and SDE) and the Euler/Heun adjoints
converge to the Backprop / closed-form gradient at their order; small-M behaviour of the two forms;
what exactly is differentiated; the explicit API; replay of the Brownian path; torchdiffeq cross-check."""
import pytest
import torch
from torch import nn

import adjointflow as af
from adjointflow.adjoint import Backprop, Checkpoint, ContinuousAdjoint, adjoint
from adjointflow.adjoint.equations import AdjointModel, integrate_adjoint
from adjointflow.solvers import DDIM, DPMSolverPP, SDEDPMSolverPP
from adjointflow.testing import GaussianData, GaussianMixture, empirical_order

D64 = torch.float64
SCH = af.VPLinear()


def problem():
    g = torch.Generator().manual_seed(0)
    data = GaussianData(torch.tensor([0.5, -1.0, 2.0], dtype=D64), torch.tensor([0.3, 1.0, 0.7], dtype=D64))
    x = torch.randn(2, 3, generator=g, dtype=D64)
    cond = 0.1 * torch.randn(2, 3, generator=g, dtype=D64)
    w = torch.randn(2, 3, generator=g, dtype=D64)
    return data, x, cond, w


def flat_grads(den, solver, grid, x, cond, w, strategy, noise_seed=3):
    params = [p for p in den.parameters() if p.requires_grad]
    xl, cl = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    noise = af.BrownianNoise(tuple(x.shape), seed=noise_seed, dtype=D64) if solver.stochastic else None
    out = af.solve(den, xl, grid, solver, cond=cl, gradient=strategy, noise=noise).x
    gs = torch.autograd.grad(out, [xl, cl, *params], w)
    return torch.cat([g.flatten() for g in gs])


CASES = [  # (id, solver, form, steps, (t_start, t_end), order)
    ("euler", af.Euler(), "eps", [40, 80, 160], (1.0, 1e-3), 1),
    ("heun", af.Heun(), "eps", [40, 80, 160], (1.0, 1e-3), 2),
    ("ddim_adjointdeis1_eps", DDIM(), "eps", [40, 80, 160], (0.5, 0.05), 1),
    ("ddim_adjointdeis1_x0", DDIM(), "x0", [40, 80, 160], (0.5, 0.05), 1),
    ("dpmpp2m_adjointdeis2m_eps", DPMSolverPP(order=2), "eps", [20, 40, 80], (0.5, 0.05), 2),
    ("dpmpp2m_adjointdeis2m_x0", DPMSolverPP(order=2), "x0", [20, 40, 80], (0.5, 0.05), 2),
    ("sde1_adjointdeis1_eps", SDEDPMSolverPP(order=1), "eps", [40, 80, 160], (0.5, 0.05), 1),
    ("sde2m_adjointdeis2m_eps", SDEDPMSolverPP(order=2), "eps", [20, 40, 80], (0.5, 0.05), 2),
    # the default form="auto" (data form where lambda < 0, noise form elsewhere) on the *full* VP range t = 1 -> 1e-3
    ("ddim_adjointdeis1_auto_full", DDIM(), "auto", [40, 80, 160], (1.0, 1e-3), 1),
    ("dpmpp2m_adjointdeis2m_auto_full", DPMSolverPP(order=2), "auto", [40, 80, 160], (1.0, 1e-3), 2),
    ("sde2m_adjointdeis2m_auto_full", SDEDPMSolverPP(order=2), "auto", [80, 160, 320], (1.0, 1e-3), 2),
]


@pytest.mark.parametrize("cid,solver,form,ns,span,order", CASES, ids=[c[0] for c in CASES])
def test_converges_to_backprop_at_its_order(cid, solver, form, ns, span, order):
    """|ContinuousAdjoint - Backprop| over (x, cond, mean, std) shrinks at the adjoint's order (+-0.2).

    For the SDE only the gradients w.r.t. x and cond are compared: for Gaussian data they do not depend
    on the Brownian path (the SDE is linear with additive noise), and Backprop through SDE-DPM-Solver++
    gives them exactly (asserted), so this is convergence to the closed form. The path-dependent ``std``
    gradient of the discrete SDE solver carries the solver's own strong error (order 1), not the adjoint's.
    """
    data, x, cond, w = problem()
    den = data.denoiser(SCH, "eps")
    errs = []
    for n in ns:
        grid = af.timesteps(SCH, n, t_start=span[0], t_end=span[1])
        bp = flat_grads(den, solver, grid, x, cond, w, Backprop())
        ca = flat_grads(den, solver, grid, x, cond, w, ContinuousAdjoint(form=form))
        if solver.stochastic:
            bp, ca = bp[:12], ca[:12]
            v = data.std.detach() ** 2
            a0, s0, a1, s1 = SCH.alpha(grid[0]), SCH.sigma(grid[0]), SCH.alpha(grid[-1]), SCH.sigma(grid[-1])
            phi = a0 * (a1**2 * v + s1**2) / (a1 * (a0**2 * v + s0**2))  # dx_end/dx_t with the noise term doubled
            exact = torch.cat([(phi * w).flatten(), ((a1 - phi * a0) * w).flatten()])
            assert torch.allclose(bp, exact, rtol=1e-12, atol=1e-14)
        errs.append(float((ca - bp).norm() / bp.norm()))
    p = empirical_order(ns, errs)
    assert abs(p - order) <= 0.2, (cid, p, errs)
    assert errs[-1] < 0.05, errs


@pytest.mark.parametrize("form", ["eps", "x0"])
@pytest.mark.parametrize("solver,order", [(DDIM(), 1), (DPMSolverPP(order=2), 2)])
def test_adjointdeis_on_exact_states_matches_closed_form(form, solver, order):
    """AdjointDEIS alone (exact forward states from the closed-form flow map): error vs the exact
    gradient of the PF-ODE map w.r.t. x, mean, std and cond at order 1 (AdjointDEIS-1) / 2 (-2M)."""
    data, x, cond, w = problem()
    den = data.denoiser(SCH, "eps")
    ns, errs = [20, 40, 80], []
    for n in ns:
        grid = af.timesteps(SCH, n, t_start=0.5, t_end=0.05)
        with torch.no_grad():
            xs = [data.flow_map(SCH, x, grid[0], t, cond) for t in grid]
        model = AdjointModel(den, xs, cond, list(den.parameters()), form=form)
        adj = integrate_adjoint(solver, model, grid, w)
        ex = data.flow_map_grads(SCH, x, grid[0], grid[-1], w, cond=cond)
        got = torch.cat([adj.a.flatten(), *[v.flatten() for v in adj.inputs]])
        want = torch.cat([ex["x"].flatten(), ex["cond"].flatten(), ex["mean"].flatten(), ex["std"].flatten()]).detach()
        errs.append(float((got - want).norm() / want.norm()))
        assert model.nvjp == n and model.nfe == n  # one network evaluation + one VJP per step
    assert abs(empirical_order(ns, errs) - order) <= 0.2, errs


@pytest.mark.parametrize("solver", [DDIM(), DPMSolverPP(order=2)])
def test_small_m_noise_form_blows_up_data_form_stays_bounded(solver):
    """The documented small-M behaviour on the full VP range (t = 1 -> 1e-3), M = 5: the paper's noise
    form is off by orders of magnitude, the data form stays below 100 % relative error."""
    data, x, cond, w = problem()
    den = data.denoiser(SCH, "eps")
    grid = af.timesteps(SCH, 5)
    ex = data.flow_map_grads(SCH, x, grid[0], grid[-1], w, cond=cond)
    want = torch.cat([ex["x"].flatten(), ex["cond"].flatten(), ex["mean"].flatten(), ex["std"].flatten()]).detach()
    err = {f: float((flat_grads(den, solver, grid, x, cond, w, ContinuousAdjoint(form=f)) - want).norm() / want.norm())
           for f in ("eps", "x0")}
    assert err["eps"] > 10 and err["x0"] < 1, err


def test_sde_states_replayed_from_the_same_brownian_path():
    """On a nonlinear model the SDE adjoint depends on the path: the explicit API replaying the forward
    noise equals .backward() exactly; re-drawing the noise (another path) changes the gradient."""
    mix = GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]], [0.4, 0.6])
    den = mix.denoiser(SCH, "eps")
    x = torch.randn(3, 2, dtype=D64, generator=torch.Generator().manual_seed(1))
    grid = af.timesteps(SCH, 30, t_start=0.8, t_end=0.02)
    solver = SDEDPMSolverPP(order=2)
    noise = af.BrownianNoise((3, 2), seed=4, dtype=D64)
    xl = x.clone().requires_grad_(True)
    out = af.solve(den, xl, grid, solver, noise=noise, gradient=ContinuousAdjoint()).x
    w = torch.ones_like(out)
    (gx,) = torch.autograd.grad(out, xl, w)
    same = adjoint(solver, den, grid, out.detach(), w, x_start=x, noise=noise)
    other = adjoint(solver, den, grid, out.detach(), w, x_start=x, noise=af.BrownianNoise((3, 2), seed=5, dtype=D64))
    assert torch.equal(same.x, gx)
    assert float((other.x - gx).norm() / gx.norm()) > 1e-2


def test_explicit_api_equals_backward():
    data, x, cond, w = problem()
    den = data.denoiser(SCH, "eps")
    grid = af.timesteps(SCH, 12)
    solver = DPMSolverPP(order=3)
    xl, cl = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    sol = af.solve(den, xl, grid, solver, cond=cl, gradient=ContinuousAdjoint(), save_trajectory=True)
    got = torch.autograd.grad(sol.x, [xl, cl, data.mean, data.std], w)
    assert sol.stats == {"backward_nfe": 12, "backward_vjp": 12}
    for kwargs in ({"trajectory": sol.trajectory}, {"x_start": x}):
        res = solver.adjoint(den, grid, sol.x.detach(), w, cond=cond, **kwargs)
        for a, b in zip([res.x, res.cond, *res.params], got):
            assert torch.equal(a, b)
        assert (res.nfe, res.nvjp) == (12, 12)
    # without states an ODE solve is re-solved backwards from x_end (adds the inversion error only)
    grid = af.timesteps(SCH, 100, t_start=0.7, t_end=0.02)
    sol = af.solve(den, x, grid, af.Heun(), cond=cond, save_trajectory=True)
    a = adjoint(af.Heun(), den, grid, sol.x, w, cond=cond, trajectory=sol.trajectory)
    b = adjoint(af.Heun(), den, grid, sol.x, w, cond=cond)
    assert float((a.x - b.x).norm() / a.x.norm()) < 1e-4


class CapturingNet(nn.Module):
    def __init__(self, captured):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.9, dtype=D64))
        self.unused = nn.Parameter(torch.tensor(2.0, dtype=D64))
        self.captured = lambda: captured

    def forward(self, x, t, cond):
        return torch.tanh(self.scale * x * self.captured() + cond)


def test_differentiates_exactly_latent_cond_and_params():
    """ContinuousAdjoint reaches the latent, cond and params (default: all that require grad; unused -> 0),
    nothing else: a tensor captured by closure and a parameter left out of params= keep .grad None."""
    captured = torch.tensor([1.1, 0.8], dtype=D64, requires_grad=True)
    net = CapturingNet(captured)
    den = af.Denoiser(net, SCH, "eps")
    grid = af.timesteps(SCH, 6)
    x = torch.randn(2, 2, dtype=D64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    cond = torch.zeros(2, 2, dtype=D64, requires_grad=True)
    af.solve(den, x, grid, DDIM(), cond=cond, gradient=ContinuousAdjoint()).x.sum().backward()
    assert x.grad is not None and cond.grad is not None and net.scale.grad is not None
    assert torch.equal(net.unused.grad, torch.zeros((), dtype=D64))
    assert captured.grad is None  # not an input, not a parameter: not differentiated
    for p in (x, cond, net.scale, net.unused):
        p.grad = None
    af.solve(den, x, grid, DDIM(), cond=cond, gradient=ContinuousAdjoint(params=[captured])).x.sum().backward()
    assert net.scale.grad is None and net.unused.grad is None
    assert captured.grad is not None and float(captured.grad.abs().sum()) > 0
    # Backprop and Checkpoint reach the closure tensor, like plain autograd
    for strategy in (Backprop(), Checkpoint()):
        captured.grad = None
        af.solve(den, x, grid, DDIM(), cond=cond, gradient=strategy).x.sum().backward()
        assert captured.grad is not None


class MLPVelocity(nn.Module):
    def __init__(self, d=3, hidden=16):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.l1, self.l2 = nn.Linear(d + 1, hidden), nn.Linear(hidden, d)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, x, t):
        return self.l2(torch.tanh(self.l1(torch.cat([x, t[:, None].to(x.dtype)], 1))))


def test_flow_gradient_matches_torchdiffeq_odeint_adjoint():
    """A flow-matching ODE (LinearFlow, nonlinear MLP velocity): our Heun continuous adjoint, Checkpoint and
    Backprop with 200 steps agree with torchdiffeq's odeint_adjoint (dopri5, rtol = atol = 1e-10)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    net = MLPVelocity().double()
    den = af.Denoiser(net, af.LinearFlow(), "velocity")
    x = torch.randn(4, 3, dtype=D64, generator=torch.Generator().manual_seed(8))
    w = torch.randn(4, 3, dtype=D64, generator=torch.Generator().manual_seed(9))
    params = list(net.parameters())

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.den = den

        def forward(self, t, y):
            return self.den(y, t).velocity

    xl = x.clone().requires_grad_(True)
    ys = torchdiffeq.odeint_adjoint(Field(), xl, torch.tensor([1.0, 0.0], dtype=D64), method="dopri5",
                                    rtol=1e-10, atol=1e-10, adjoint_params=tuple(params))
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(ys[-1], [xl, *params], w)])
    grid = af.timesteps(af.LinearFlow(), 200, t_start=1.0, t_end=0.0)
    for strategy in (ContinuousAdjoint(), Checkpoint(), Backprop()):
        xl = x.clone().requires_grad_(True)
        out = af.solve(den, xl, grid, af.Heun(), gradient=strategy).x
        got = torch.cat([g.flatten() for g in torch.autograd.grad(out, [xl, *params], w)])
        assert float((got - ref).norm() / ref.norm()) < 1e-4, strategy
