"""AdjointGuidance: exact gradients with Checkpoint, continuous-adjoint gradients approaching them as
steps grow, the loss falling on a small network for latent / cond / parameters, and clean side effects."""
import pytest
import torch
from torch import nn

import adjointflow as af
from adjointflow.adjoint import Checkpoint, ContinuousAdjoint
from adjointflow.guidance import AdjointGuidance
from adjointflow.testing import GaussianData, empirical_order

D = torch.float64
TARGET = torch.tensor([1.0, 0.5], dtype=D)
ALL = ("latent", "cond", "params")


def to_target(x0):
    return ((x0 - TARGET) ** 2).sum(1)


def gaussian():
    return GaussianData(torch.tensor([0.7, -0.3], dtype=D), torch.tensor([0.3, 0.8], dtype=D))


def inputs():
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    cond = 0.1 * torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=D)
    return x, cond


def test_checkpoint_gradients_are_the_exact_discrete_gradients():
    data = gaussian()
    den = data.denoiser(af.VPLinear(), "eps")
    x, cond = inputs()
    grid = af.timesteps(af.VPLinear(), 8)
    got = AdjointGuidance(grid=grid, optimize=ALL).gradients(den, to_target, x, cond)
    # reference: plain autograd through the DDIM solve
    xl, cl = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    loss = to_target(af.solve(den, xl, grid, af.solvers.DDIM(), cond=cl, gradient=af.Backprop()).x).sum()
    ref = torch.autograd.grad(loss, [xl, cl, data.mean, data.std])
    for a, b in zip([got["latent"], got["cond"], *got["params"]], ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["loss"].sum(), loss.detach())
    # and a central finite difference on one latent entry
    e = torch.zeros_like(x)
    e[1, 0] = 1e-6
    f = lambda v: float(to_target(af.solve(den, v, grid, af.solvers.DDIM(), cond=cond).x.detach()).sum())
    assert abs((f(x + e) - f(x - e)) / 2e-6 - float(got["latent"][1, 0])) < 1e-6
    assert data.mean.grad is None and data.std.grad is None  # nothing accumulated in the network


def test_continuous_adjoint_gradients_approach_checkpoint_as_steps_grow():
    # Euler on a rectified flow: the continuous adjoint's error vs the exact discrete gradient falls at order 1
    data = gaussian()
    sch = af.LinearFlow()
    den = data.denoiser(sch, "velocity")
    x, cond = inputs()
    ns, errs = [10, 20, 40, 80], {k: [] for k in ("latent", "cond", "mean", "std")}
    for n in ns:
        kw = dict(solver=af.Euler(), steps=n, optimize=ALL)
        ck = AdjointGuidance(gradient=Checkpoint(), **kw).gradients(den, to_target, x, cond)
        ca = AdjointGuidance(gradient=ContinuousAdjoint(), **kw).gradients(den, to_target, x, cond)
        for k, a, b in (("latent", ca["latent"], ck["latent"]), ("cond", ca["cond"], ck["cond"]),
                        ("mean", ca["params"][0], ck["params"][0]), ("std", ca["params"][1], ck["params"][1])):
            errs[k].append(float((a - b).norm() / b.norm()))
    for k, e in errs.items():
        assert 0.85 < empirical_order(ns, e) < 1.3, (k, e)
        assert e[-1] < 0.03, (k, e)


def test_heun_continuous_adjoint_matches_checkpoint():
    data = gaussian()
    den = data.denoiser(af.VPLinear(), "eps")
    x, cond = inputs()
    kw = dict(solver=af.Heun(), steps=20, optimize=ALL)
    ck = AdjointGuidance(gradient=Checkpoint(), **kw).gradients(den, to_target, x, cond)
    ca = AdjointGuidance(gradient=ContinuousAdjoint(), **kw).gradients(den, to_target, x, cond)
    for a, b in zip([ca["latent"], ca["cond"], *ca["params"]], [ck["latent"], ck["cond"], *ck["params"]]):
        assert float((a - b).norm() / b.norm()) < 5e-3


class SmallNet(nn.Module):
    """A small conditional MLP velocity field (random weights, fixed seed); ``cond`` also enters
    through a linear read-in so that it steers the sample noticeably."""

    def __init__(self, d=2, c=2, width=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Linear(d + c + 1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                  nn.Linear(width, d)).to(D)
        self.read_in = nn.Linear(c, d, bias=False).to(D)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=D))

    def forward(self, x, t, cond):
        return self.body(torch.cat([x, cond, t[:, None]], dim=1)) - self.read_in(cond)


@pytest.mark.parametrize("gradient", [Checkpoint(), ContinuousAdjoint()], ids=["checkpoint", "continuous"])
@pytest.mark.parametrize("target", ["latent", "cond", "params"])
def test_loss_falls_on_a_small_network(target, gradient):
    net = SmallNet()
    den = af.Denoiser(net, af.LinearFlow(), "velocity")
    x, cond = inputs()
    before = [p.detach().clone() for p in net.parameters()]
    lr = 0.05 if target == "params" else 0.1
    ag = AdjointGuidance(solver=af.Euler(), steps=10, gradient=gradient, optimize=(target,), iterations=40, lr=lr)
    res = ag.run(den, to_target, x, cond)
    first, last = float(res.losses[0].mean()), float(res.losses[-1].mean())
    assert last < 0.2 * first, (first, last)  # measured: latent 2 %, cond 8 %, params 0.01-0.02 % of the start
    changed = [not torch.equal(p, b) for p, b in zip(net.parameters(), before)]
    assert all(changed) if target == "params" else not any(changed)  # parameters move in place, only if asked
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(res.latent, x) != (target == "latent")
    assert torch.equal(res.cond, cond) != (target == "cond")
    # the returned sample is the solve of the returned latent/cond under the (updated) network
    torch.testing.assert_close(res.x, af.solve(den, res.latent, af.timesteps(af.LinearFlow(), 10), af.Euler(),
                                               cond=res.cond).x.detach())
    # counts: Euler, 10 steps: Checkpoint (keep=1) re-runs all but the last step (10 + 9 NFE, 10 VJPs); the
    # continuous adjoint evaluates the network once per adjoint step (10 + 10 NFE, 10 VJPs); +10 for the final solve
    per_gradient = 19 if isinstance(gradient, Checkpoint) else 20
    assert (res.nfe, res.vjps) == (40 * per_gradient + 10, 40 * 10)


def test_run_equals_hand_written_gradient_descent():
    data = gaussian()
    den = data.denoiser(af.VPLinear(), "eps")
    x, cond = inputs()
    grid = af.timesteps(af.VPLinear(), 6)
    res = AdjointGuidance(grid=grid, optimize=("latent", "cond"), iterations=5, optimizer="sgd", lr=0.1).run(
        den, to_target, x, cond)
    z, c = x.clone(), cond.clone()
    for _ in range(5):
        zl, cl = z.clone().requires_grad_(True), c.clone().requires_grad_(True)
        gz, gc = torch.autograd.grad(to_target(af.solve(den, zl, grid, af.solvers.DDIM(), cond=cl).x).sum(), [zl, cl])
        z, c = z - 0.1 * gz, c - 0.1 * gc
    torch.testing.assert_close(res.latent, z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.cond, c, rtol=1e-12, atol=1e-12)


def test_dict_cond_and_sde_solver():
    class DictNet(nn.Module):
        def forward(self, x, t, shift, label):
            return -x + shift * (1 + label[:, None].to(x.dtype))

    den = af.Denoiser(DictNet(), af.VPLinear(), "eps")
    x, cond = inputs()
    c = {"shift": cond, "label": torch.tensor([0, 1, 2])}
    ag = AdjointGuidance(solver=af.EulerMaruyama(), steps=10, optimize=("cond",), iterations=3)
    out = ag.gradients(den, to_target, x, c)
    assert set(out["cond"]) == {"shift"} and out["latent"] is None and out["params"] is None
    res = ag.run(den, to_target, x, c)
    assert torch.equal(res.cond["label"], c["label"]) and not torch.equal(res.cond["shift"], cond)


def test_adjoint_guidance_argument_errors():
    with pytest.raises(ValueError, match="optimize"):
        AdjointGuidance(optimize=("noise",))
    with pytest.raises(ValueError, match="optimize"):
        AdjointGuidance(optimize=())
    with pytest.raises(ValueError, match="optimizer"):
        AdjointGuidance(optimizer="lbfgs")
    with pytest.raises(ValueError, match="params"):
        AdjointGuidance(params=[torch.zeros(2, requires_grad=True)])
    with pytest.raises(TypeError, match="instance"):
        AdjointGuidance(gradient=Checkpoint)
    data = gaussian()
    den = data.denoiser(af.VPLinear(), "eps")
    x, _ = inputs()
    with pytest.raises(ValueError, match="no cond"):
        AdjointGuidance(optimize=("cond",)).run(den, to_target, x)
    frozen = af.Denoiser(lambda x, t: -x, af.VPLinear(), "eps")
    with pytest.raises(ValueError, match="no parameter"):
        AdjointGuidance(optimize=("params",)).run(frozen, to_target, x)
