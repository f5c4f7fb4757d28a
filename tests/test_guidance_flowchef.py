"""FlowChef against closed forms (methods.md §8.4): a 2-D correlated Gaussian prior
``N(0, [[1, .8], [.8, 1]])`` on a rectified flow with ``x_1 = 1.5`` observed exactly; the exact
conditional is ``x_2 | x_1 = 1.5 ~ N(1.2, 0.36)``. No VJP ever goes through the network."""
import math

import pytest
import torch

import adjointflow as af
from adjointflow.guidance import FlowChef, Inpaint, MeasurementLoss

from test_guidance_gaussian import FullGaussian

D = torch.float64
FLOW = af.LinearFlow()
COV = torch.tensor([[1.0, 0.8], [0.8, 1.0]])
Y = 1.5
COND_MEAN, COND_VAR = 0.8 * Y, 1 - 0.8**2


def observe(x0):
    return (x0[:, 0] - Y) ** 2


def grid(n):
    return af.timesteps(FLOW, n, t_end=0.0)


def test_reproduces_exact_conditional_within_mc_error_with_zero_vjps():
    prior = FullGaussian(torch.zeros(2), COV)
    den = prior.denoiser(FLOW, "velocity")
    n = 4000
    x1 = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=D)
    res = FlowChef(grid=grid(100), lr=0.1, optimizer="sgd").run(den, observe, x1)
    x = res.x
    se_mean, se_var = math.sqrt(COND_VAR / n), COND_VAR * math.sqrt(2.0 / (n - 1))
    assert abs(float(x[:, 0].mean()) - Y) < 0.01
    assert abs(float(x[:, 1].mean()) - COND_MEAN) < 4 * se_mean, float(x[:, 1].mean())
    assert abs(float(x[:, 1].var()) - COND_VAR) < 4 * se_var, float(x[:, 1].var())
    # zero VJPs through the network: the library's count, an independent count on the network's
    # output, and no network call ever sees an input that carries a graph
    assert res.vjps == 0 and prior.box["vjps"] == 0 and prior.box["graph_calls"] == 0
    assert res.nfe == 100 == prior.box["calls"]


def whitened(n=64, seed=2):
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=D)
    z = z - z.mean(0)
    L = torch.linalg.cholesky(torch.cov(z.T))
    return torch.linalg.solve_triangular(L, z.T, upper=False).T


@pytest.mark.parametrize("lr,steps", [(0.1, 100), (0.3, 100)])
def test_exact_moments_of_the_method_match_the_conditional(lr, steps):
    # SGD on a quadratic loss with an affine velocity: the whole sampler is affine in the start
    # latent, so whitened starts give the method's exact output moments (no Monte-Carlo error)
    den = FullGaussian(torch.zeros(2), COV).denoiser(FLOW, "velocity")
    x = FlowChef(grid=grid(steps), lr=lr, optimizer="sgd").run(den, observe, whitened()).x
    assert abs(float(x[:, 1].mean()) - COND_MEAN) < 0.015
    assert abs(float(x[:, 1].var()) - COND_VAR) < 0.015
    assert abs(float(x[:, 0].mean()) - Y) < 0.005 and float(x[:, 0].var()) < 1e-3


def test_weak_guidance_under_steers():
    # methods.md §8.4: s = 0.02 leaves x_2's mean near 0.92 -- the test above can fail
    den = FullGaussian(torch.zeros(2), COV).denoiser(FLOW, "velocity")
    x = FlowChef(grid=grid(100), lr=0.02, optimizer="sgd").run(den, observe, whitened()).x
    assert float(x[:, 1].mean()) < 1.0 and float(x[:, 0].mean()) > 1.55


def test_update_order_matches_algorithm_1():
    # x_t <- x_t - lr grad L(x0_hat(x_t, u)); x_{t_next} = x_t + dt u with the PRE-update velocity
    prior = FullGaussian(torch.tensor([0.3, -0.2]), COV)
    den = prior.denoiser(FLOW, "velocity")
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    g = grid(7)
    res = FlowChef(grid=g, lr=0.2, optimizer="sgd", iterations=2).run(den, observe, x)
    ref = x.clone()
    for i in range(7):
        t, tn = g[i], g[i + 1]
        u = den(ref, t).velocity
        x0 = ref - t * u  # rectified flow: frozen-velocity clean estimate
        for _ in range(2):
            grad = torch.zeros_like(x0)
            grad[:, 0] = 2 * (x0[:, 0] - Y)
            ref, x0 = ref - 0.2 * grad, x0 - 0.2 * grad
        ref = ref + (tn - t) * u
    torch.testing.assert_close(res.x, ref, rtol=1e-12, atol=1e-12)


def test_guidance_window_is_honoured():
    prior = FullGaussian(torch.zeros(2), COV)
    den = prior.denoiser(FLOW, "velocity")
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    g = grid(10)
    off = FlowChef(grid=g, lr=0.3, optimizer="sgd", window=(0.0, 0.0)).run(den, observe, x)
    torch.testing.assert_close(off.x, af.solve(den, x, g, af.Euler()).x, rtol=1e-13, atol=1e-13)
    assert off.losses.shape == (len(g), 8)  # every step's clean estimate (guided or not) + the final sample
    half = FlowChef(grid=g, lr=0.3, optimizer="sgd", window=(0.0, 0.55)).run(den, observe, x)
    assert half.losses.shape == (len(g), 8)
    # before the window opens the path is the unguided one
    early = af.solve(den, x, g[:6], af.Euler()).x  # t = 1 .. 0.5: steps at t = 1.0 .. 0.6 unguided
    late = FlowChef(grid=g[5:], lr=0.3, optimizer="sgd").run(den, observe, early)
    torch.testing.assert_close(half.x, late.x, rtol=1e-12, atol=1e-12)


def test_adam_is_scale_free_and_identity_measurement_converges_to_y():
    den = FullGaussian(torch.zeros(2), COV).denoiser(FLOW, "velocity")
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    y = torch.tensor([0.7, -0.4], dtype=D)
    # a fresh Adam's first step is lr * g / (|g| + eps): nearly blind to the loss's scale
    g1 = torch.tensor([0.5, 0.4], dtype=D)
    u = den(x, g1[0]).velocity
    for c in (1.0, 1e3):
        out = FlowChef(grid=g1, lr=0.05, optimizer="adam").run(den, lambda v: c * ((v - y) ** 2).sum(1), x).x
        g = c * 2 * (x - 0.5 * u - y)
        torch.testing.assert_close(out, x - 0.05 * g / (g.abs() + 1e-8) - 0.1 * u, rtol=1e-12, atol=1e-12)
    # with A = I and noiseless y, the output approaches y as the step grows (methods.md §8.4)
    obj = MeasurementLoss(Inpaint(torch.ones(2)), y, sigma=1.0)
    errs = [float((FlowChef(grid=grid(50), lr=lr, optimizer="sgd").run(den, obj, x).x - y).norm(dim=1).max())
            for lr in (0.05, 0.2, 0.8)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3, errs


def test_vp_schedule_and_counts():
    prior = FullGaussian(torch.zeros(2), COV)
    den = prior.denoiser(af.VPLinear(), "eps")
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    plain = af.solve(den, x, af.timesteps(af.VPLinear(), 50), af.Euler()).x
    for fc in (FlowChef(steps=50, lr=0.1, optimizer="sgd"), FlowChef(steps=50, lr=0.1, optimizer="adam")):
        res = fc.run(den, observe, x)
        assert float(observe(res.x).mean()) < 0.02 * float(observe(plain).mean()), fc
        assert (res.nfe, res.vjps) == (50, 0)
    assert prior.box["graph_calls"] == 0 and prior.box["vjps"] == 0


def test_flowchef_argument_errors():
    with pytest.raises(ValueError, match="optimizer"):
        FlowChef(optimizer="lbfgs")
    with pytest.raises(ValueError, match="window"):
        FlowChef(window=(0.8, 0.2))
    with pytest.raises(ValueError, match="lr"):
        FlowChef(lr=-0.1)
    with pytest.raises(ValueError, match="iterations"):
        FlowChef(iterations=0)
    with pytest.raises(ValueError, match="betas"):
        FlowChef(betas=(0.9, 1.0))
