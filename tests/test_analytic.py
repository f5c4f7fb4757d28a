"""The truth toolkit itself must be right: check it against independent computations."""
import math

import torch
from hypothesis import given, settings

from adjointflow import VPLinear, solve, timesteps, Heun
from adjointflow.testing import GaussianData, GaussianMixture, empirical_order, linear_gaussian_posterior, local_orders
from adjointflow.testing.strategies import schedules, times


def gd():
    return GaussianData(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(schedules(), times(), times(), times())
def test_flow_map_composes_and_inverts(sch, t0, t1, t2):
    d = gd()
    x = torch.randn(2, 3, dtype=torch.float64)
    with torch.no_grad():
        via = d.flow_map(sch, d.flow_map(sch, x, t0, t1), t1, t2)
        assert torch.allclose(via, d.flow_map(sch, x, t0, t2), rtol=1e-9, atol=1e-9)
        assert torch.allclose(d.flow_map(sch, d.flow_map(sch, x, t0, t1), t1, t0), x, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(schedules(), times(), times())
def test_flow_map_grads_match_autograd(sch, t0, t1):
    d = gd()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    go = torch.randn(2, 3, dtype=torch.float64)
    out = d.flow_map(sch, x, t0, t1, cond=cond)
    gx, gm, gs, gc = torch.autograd.grad(out, (x, d.mean, d.std, cond), go)
    ex = d.flow_map_grads(sch, x.detach(), t0, t1, go, cond=cond.detach())
    for a, b in ((gx, ex["x"]), (gm, ex["mean"]), (gs, ex["std"]), (gc, ex["cond"])):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_flow_map_pushes_marginals_forward():
    # The exact map sends the marginal at t to the marginal at t' (checked by Monte Carlo, n = 20000)
    sch, d = VPLinear(), gd()
    x = d.prior_sample(sch, 0.9, 20000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = d.flow_map(sch, x, 0.9, 0.1)
        m, sd = d.marginal(sch, 0.1, like=y)
    assert torch.allclose(y.mean(0), m, atol=4 * float(sd.max()) / math.sqrt(20000))
    assert torch.allclose(y.std(0), sd, rtol=0.03)


def test_mixture_with_one_component_equals_gaussian():
    sch, t = VPLinear(), torch.tensor(0.4, dtype=torch.float64)
    mix = GaussianMixture([1.0], [[0.5, -1.0]], [[0.3, 2.0]])
    g = GaussianData(torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.3, 2.0], dtype=torch.float64))
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(mix.posterior_mean_x0(sch, x, t), g.posterior_mean_x0(sch, x, t), atol=1e-12)


def test_mixture_score_matches_autograd_of_log_density():
    sch, t = VPLinear(), torch.tensor(0.3, dtype=torch.float64)
    w, means, stds = torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.0], [1.5, 1.0]]), torch.tensor([0.4, 0.8])
    mix = GaussianMixture(w, means, stds)
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    a, s = sch.alpha(t), sch.sigma(t)
    comps = [torch.distributions.Normal(a * means[k].double(), torch.sqrt(a**2 * stds[k].double() ** 2 + s**2))
             for k in range(2)]
    logp = torch.logsumexp(torch.stack([math.log(float(w[k])) + comps[k].log_prob(x).sum(-1) for k in range(2)]), 0)
    (score,) = torch.autograd.grad(logp.sum(), x)
    assert torch.allclose(mix.denoiser(sch, "eps").score(x.detach(), t), score, rtol=1e-9, atol=1e-10)


def test_linear_gaussian_posterior_against_joint_conditioning():
    torch.manual_seed(0)
    d = 4
    L = torch.randn(d, d, dtype=torch.float64)
    S = L @ L.T + 0.5 * torch.eye(d, dtype=torch.float64)
    m = torch.randn(d, dtype=torch.float64)
    A = torch.randn(2, d, dtype=torch.float64)
    y = torch.randn(2, dtype=torch.float64)
    pm, pc = linear_gaussian_posterior(m, S, A, y, 0.3)
    # joint Gaussian of (x, y) conditioned on y, via the precision form
    P = torch.linalg.inv(S) + A.T @ A / 0.09
    assert torch.allclose(pc, torch.linalg.inv(P), atol=1e-10)
    assert torch.allclose(pm, torch.linalg.solve(P, torch.linalg.solve(S, m) + A.T @ y / 0.09), atol=1e-10)


def test_empirical_order():
    ns = [10, 20, 40]
    assert abs(empirical_order(ns, [1.0 / n**2 for n in ns]) - 2.0) < 1e-12
    assert all(abs(p - 1) < 1e-12 for p in local_orders(ns, [1.0 / n for n in ns]))
    import pytest

    with pytest.raises(ValueError):
        empirical_order([10], [1.0])
    with pytest.raises(ValueError):
        empirical_order([10, 20], [0.0, 1.0])
