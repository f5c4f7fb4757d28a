"""Gradient ladder for the exact strategies: finite differences (float64) ~ Backprop == Checkpoint,
for every solver (ODE, multistep, SDE), w.r.t. the latent, a conditioning, the network parameters
and tensors captured by closure; the explicit adjoint API; input validation."""
import pytest
import torch
from torch import nn

import adjointflow as af
from adjointflow.adjoint import AdjointResult, Backprop, Checkpoint, ContinuousAdjoint, adjoint
from adjointflow.solvers import DDIM, DEIS, DPMSolverPP, SDEDPMSolverPP
from adjointflow.testing import GaussianData
from solver_list import ALL_SOLVERS

D64 = torch.float64

# every solver of the shared list, plus the multistep/singlestep variants the gradient code must handle
SOLVERS = {i: (f, k) for i, f, _, k in ALL_SOLVERS}
SOLVERS.update({
    "ddim": (DDIM, "ode"),
    "dpmpp2m": (lambda: DPMSolverPP(order=2), "ode"),
    "dpmpp3m": (lambda: DPMSolverPP(order=3), "ode"),
    "dpmpp2s": (lambda: DPMSolverPP(order=2, multistep=False), "ode"),
    "deis3": (lambda: DEIS(order=3), "ode"),
    "sde_dpmpp1": (lambda: SDEDPMSolverPP(order=1), "sde"),
    "sde_dpmpp2m": (lambda: SDEDPMSolverPP(order=2), "sde"),
})


class SmallConvNet(nn.Module):
    """A small random eps-network on (B, C, H, W) with a time input and an additive conditioning."""

    def __init__(self, c=2, hidden=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(c, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, c, 3, padding=1)
        self.temb = nn.Linear(1, hidden)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, x, t, cond=None):
        h = self.conv1(x if cond is None else x + cond) + self.temb(t[:, None].to(x.dtype))[:, :, None, None]
        return torch.tanh(self.conv2(torch.nn.functional.silu(h)))


def gaussian_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    data = GaussianData(torch.tensor([0.5, -1.0, 2.0], dtype=D64), torch.tensor([0.3, 1.0, 0.7], dtype=D64))
    x = torch.randn(2, 3, generator=g, dtype=D64)
    cond = 0.1 * torch.randn(2, 3, generator=g, dtype=D64)
    w = torch.randn(2, 3, generator=g, dtype=D64)
    return data, x, cond, w


def run_grads(den, solver, grid, x, cond, w, strategy, noise_seed=5, noise=None):
    """Gradients of <w, x_end> w.r.t. (x, cond, *params)."""
    params = [p for p in den.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    xl, cl = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    if solver.stochastic and noise is None:
        noise = af.BrownianNoise(tuple(x.shape), seed=noise_seed, dtype=x.dtype)
    out = af.solve(den, xl, grid, solver, cond=cl, gradient=strategy, noise=noise).x
    (w * out).sum().backward()
    return [xl.grad, cl.grad, *[p.grad.clone() for p in params]]


def loss_at(den, solver, grid, x, cond, w, noise_seed=5):
    noise = af.BrownianNoise(tuple(x.shape), seed=noise_seed, dtype=x.dtype) if solver.stochastic else None
    with torch.no_grad():
        return float((w * af.solve(den, x, grid, solver, cond=cond, noise=noise).x).sum())


@pytest.mark.parametrize("sid", sorted(SOLVERS))
def test_ladder_gaussian_fd_backprop_checkpoint(sid):
    """FD ~ Backprop (float64 directional derivative over x, cond, mean, std) and Checkpoint == Backprop."""
    factory, _ = SOLVERS[sid]
    solver = factory()
    data, x, cond, w = gaussian_problem()
    den = data.denoiser(af.VPLinear(), "eps")
    grid = af.timesteps(den.schedule, 8)
    bp = run_grads(den, solver, grid, x, cond, w, Backprop())
    ck = run_grads(den, solver, grid, x, cond, w, Checkpoint())
    for a, b in zip(bp, ck):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (sid, float((a - b).abs().max()))
    # central difference along one random direction in (x, cond, mean, std)
    g = torch.Generator().manual_seed(1)
    dirs = [torch.randn(v.shape, generator=g, dtype=D64) for v in (x, cond, data.mean, data.std)]
    eps = 1e-6

    def shifted(sign):
        with torch.no_grad():
            m0, s0 = data.mean.clone(), data.std.clone()
            data.mean.add_(sign * eps * dirs[2])
            data.std.add_(sign * eps * dirs[3])
            val = loss_at(den, solver, grid, x + sign * eps * dirs[0], cond + sign * eps * dirs[1], w)
            data.mean.copy_(m0)
            data.std.copy_(s0)
        return val

    fd = (shifted(1) - shifted(-1)) / (2 * eps)
    an = sum(float((gr * d).sum()) for gr, d in zip(bp, dirs))
    assert abs(fd - an) <= 1e-7 * max(1.0, abs(an)), (sid, fd, an)


@pytest.mark.parametrize("sid", ["heun", "dpmpp3m", "deis3", "sde_dpmpp2m", "euler_maruyama"])
def test_ladder_conv_net(sid):
    """Same ladder on a small random conv net (parameters, latent, image-shaped conditioning)."""
    factory, _ = SOLVERS[sid]
    solver = factory()
    net = SmallConvNet().double()
    den = af.Denoiser(net, af.VPLinear(), "eps")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 5, 5, generator=g, dtype=D64)
    cond = 0.2 * torch.randn(2, 2, 5, 5, generator=g, dtype=D64)
    w = torch.randn(2, 2, 5, 5, generator=g, dtype=D64)
    grid = af.timesteps(den.schedule, 6)
    bp = run_grads(den, solver, grid, x, cond, w, Backprop())
    ck = run_grads(den, solver, grid, x, cond, w, Checkpoint())
    for a, b in zip(bp, ck):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # FD w.r.t. one weight entry and one latent entry
    eps = 1e-6
    p = net.conv2.weight
    idx = (1, 3, 0, 2)
    with torch.no_grad():
        p[idx] += eps
        up = loss_at(den, solver, grid, x, cond, w)
        p[idx] -= 2 * eps
        dn = loss_at(den, solver, grid, x, cond, w)
        p[idx] += eps
    k = [i for i, q in enumerate(den.parameters()) if q is p][0]
    an = float(bp[2 + k][idx])
    assert abs((up - dn) / (2 * eps) - an) <= 1e-7 * max(1.0, abs(an))
    dx = torch.zeros_like(x)
    dx[1, 0, 2, 3] = eps
    fdx = (loss_at(den, solver, grid, x + dx, cond, w) - loss_at(den, solver, grid, x - dx, cond, w)) / (2 * eps)
    an = float(bp[0][1, 0, 2, 3])
    assert abs(fdx - an) <= 1e-7 * max(1.0, abs(an))


class ClosureNet(nn.Module):
    """A network that reads a tensor captured by closure (not a parameter, not an input)."""

    def __init__(self, captured):
        super().__init__()
        self.captured = lambda: captured

    def forward(self, x, t):
        return torch.tanh(x * self.captured() + t[:, None])


@pytest.mark.parametrize("strategy", [Backprop(), Checkpoint()])
def test_exact_strategies_reach_closure_tensors(strategy):
    """A leaf and a non-leaf tensor captured by closure get gradients, via .backward() and autograd.grad."""
    leaf = torch.tensor([0.7, 1.3, 0.9], dtype=D64, requires_grad=True)
    nonleaf = leaf * 2.0  # its graph must be traversed by every step's backward
    x0 = torch.randn(3, 3, dtype=D64, generator=torch.Generator().manual_seed(3))
    grads = []
    for cap, get in ((leaf, lambda: leaf), (nonleaf, lambda: leaf)):
        den = af.Denoiser(ClosureNet(cap), af.VPLinear(), "eps")
        grid = af.timesteps(den.schedule, 5)
        x = x0.clone().requires_grad_(True)
        out = af.solve(den, x, grid, DPMSolverPP(order=2), gradient=strategy).x
        g1 = torch.autograd.grad(out.square().sum(), [x, leaf])
        grads.append(g1)
    ref = []
    for cap in (leaf, leaf * 2.0):
        den = af.Denoiser(ClosureNet(cap), af.VPLinear(), "eps")
        x = x0.clone().requires_grad_(True)
        out = af.solve(den, x, af.timesteps(den.schedule, 5), DPMSolverPP(order=2), gradient=Backprop()).x
        ref.append(torch.autograd.grad(out.square().sum(), [x, leaf]))
    for got, want in zip(grads, ref):
        assert float(got[1].abs().sum()) > 0
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_checkpoint_nfe_and_trajectory():
    data, x, cond, w = gaussian_problem()
    den = data.denoiser(af.VPLinear(), "eps")
    grid = af.timesteps(den.schedule, 7)
    a = af.solve(den, x, grid, af.Heun(), cond=cond, gradient=Backprop(), save_trajectory=True)
    b = af.solve(den, x, grid, af.Heun(), cond=cond, gradient=Checkpoint(), save_trajectory=True)
    assert a.nfe == b.nfe == 14
    assert torch.equal(a.trajectory, b.trajectory)
    with torch.no_grad():  # no graph wanted: plain solve
        c = af.solve(den, x, grid, af.Heun(), cond=cond, gradient=Checkpoint())
    assert torch.equal(c.x, a.x.detach())


# --- explicit API ------------------------------------------------------------------------------
def test_explicit_adjoint_exact_strategies_match_backward():
    data, x, cond, w = gaussian_problem()
    den = data.denoiser(af.VPLinear(), "eps")
    grid = af.timesteps(den.schedule, 8)
    solver = DPMSolverPP(order=3)
    bp = run_grads(den, solver, grid, x, cond, w, Backprop())
    x_end = af.solve(den, x, grid, solver, cond=cond).x.detach()
    for strategy in (Backprop(), Checkpoint()):
        res = solver.adjoint(den, grid, x_end, w, cond=cond, x_start=x, gradient=strategy)
        assert isinstance(res, AdjointResult)
        for a, b in zip([res.x, res.cond, *res.params], bp):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_explicit_adjoint_dict_cond_and_unused_params():
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(0.8, dtype=D64))
            self.unused = nn.Parameter(torch.tensor(1.0, dtype=D64))

        def forward(self, x, t, shift, label):
            return torch.tanh(self.w * x + shift) * (1 + label[:, None].to(x.dtype))

    net = DictNet()
    den = af.Denoiser(net, af.VPLinear(), "eps")
    x = torch.randn(2, 3, dtype=D64, generator=torch.Generator().manual_seed(6))
    cond = {"shift": 0.1 * torch.ones(2, 3, dtype=D64), "label": torch.tensor([0, 1])}
    grid = af.timesteps(den.schedule, 5)
    x_end = af.solve(den, x, grid, af.Heun(), cond=cond).x
    w = torch.ones_like(x_end)
    for strategy in (Checkpoint(), ContinuousAdjoint()):
        res = adjoint(af.Heun(), den, grid, x_end, w, cond=cond, x_start=x, gradient=strategy)
        assert set(res.cond) == {"shift"}  # integer labels are not differentiated
        assert res.cond["shift"].shape == (2, 3) and float(res.cond["shift"].abs().sum()) > 0
        assert len(res.params) == 2 and torch.equal(res.params[1], torch.zeros((), dtype=D64))


def test_errors():
    data, x, cond, w = gaussian_problem()
    den = data.denoiser(af.VPLinear(), "eps")
    grid = af.timesteps(den.schedule, 4)
    x_end = af.solve(den, x, grid, af.Euler()).x.detach()
    with pytest.raises(ValueError, match="shape of x_end"):
        adjoint(af.Euler(), den, grid, x_end, w[:1])
    with pytest.raises(TypeError, match="not a tensor"):
        adjoint(af.Euler(), den, grid, x_end, w, params=[data.mean, "std"])
    with pytest.raises(TypeError, match="iterable of tensors"):
        adjoint(af.Euler(), den, grid, x_end, w, params=3)
    with pytest.raises(ValueError, match="does not require grad"):
        adjoint(af.Euler(), den, grid, x_end, w, params=[torch.ones(3, dtype=D64)])
    with pytest.raises(TypeError, match="params"):
        ContinuousAdjoint(params=[1.0])
    with pytest.raises(ValueError, match="needs x_start"):
        adjoint(af.Euler(), den, grid, x_end, w, gradient=Checkpoint())
    class NoAdjoint(af.Euler):  # a solver that defines no adjoint_step of its own
        adjoint_step = af.Solver.adjoint_step

    with pytest.raises(ValueError, match="no continuous-adjoint step"):
        af.solve(den, x.requires_grad_(), grid, NoAdjoint(), gradient=ContinuousAdjoint())
    with pytest.raises(ValueError, match="stochastic"):
        adjoint(SDEDPMSolverPP(), den, grid, x_end, w)
    with pytest.raises(ValueError, match="trajectory"):
        adjoint(af.Euler(), den, grid, x_end, w, trajectory=torch.zeros(3, 2, 3, dtype=D64))
    with pytest.raises(ValueError, match="callback"):
        af.solve(den, x, grid, af.Euler(), gradient=ContinuousAdjoint(), callback=lambda info: info.x_next * 0)
    with pytest.raises(ValueError, match="form"):
        ContinuousAdjoint(form="v")
    with pytest.raises(ValueError, match="order"):
        ContinuousAdjoint(order=3)
    with pytest.raises(TypeError, match="strategy"):
        adjoint(af.Euler(), den, grid, x_end, w, gradient="checkpoint")
