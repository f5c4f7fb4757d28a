"""D-Flow against exact answers (methods.md §2.5, §8.2).

Linear-Gaussian problem in R^8: prior ``N(m, S)`` (full covariance), ``y = A x + N(0, 0.1^2 I)`` with
``A`` 4x8, on a rectified flow solved to ``t = 0``. The exact flow map ``psi(z) = m + S^{1/2} z`` turns
``||A psi(z) - y||^2/(2 sigma_y^2) + ||z||^2/2`` into the posterior's negative log density, so its
minimiser maps to the exact posterior mean; the discrete solve converges to it at the solver's order.
"""
import math

import pytest
import torch

import adjointflow as af
from adjointflow.guidance import (DFlow, FourierMagnitude, MatrixOperator, MeasurementLoss, chi_regularizer,
                                  gaussian_regularizer)
from adjointflow.testing import empirical_order, linear_gaussian_posterior

from test_guidance_gaussian import FullGaussian, random_cov

D = torch.float64
FLOW = af.LinearFlow()
TIGHT = dict(iterations=10, max_iter=50, tolerance_grad=1e-13, tolerance_change=1e-16, discrepancy=None)


def problem(rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cov, U = random_cov(8, rank, g)
    m = torch.randn(8, generator=g, dtype=D)
    A = torch.randn(4, 8, generator=g, dtype=D)
    x_true = m + U @ torch.randn(rank, generator=g, dtype=D)
    y = A @ x_true + 0.1 * torch.randn(4, generator=g, dtype=D)
    z0 = torch.randn(2, 8, generator=g, dtype=D)
    return FullGaussian(m, cov), U, A, y, z0


def grid(n):
    return af.timesteps(FLOW, n, t_end=0.0)


@pytest.mark.parametrize("solver,ns,order", [(af.Euler(), [4, 8, 16, 32], 1), (af.Heun(), [2, 4, 8, 16], 2)])
def test_converges_to_exact_posterior_mean_at_solver_order(solver, ns, order):
    prior, _, A, y, z0 = problem()
    pm, _ = linear_gaussian_posterior(prior.mean, prior.cov, A, y, 0.1)
    obj = MeasurementLoss(MatrixOperator(A), y, 0.1)
    den = prior.denoiser(FLOW)
    errs = []
    for n in ns:
        res = DFlow(solver=solver, grid=grid(n), regularizer="gaussian", **TIGHT).run(den, obj, z0)
        errs.append(float((res.x - pm).norm(dim=1).max()))
    p = empirical_order(ns, errs)
    assert abs(p - order) < 0.35, (p, errs)
    assert errs[-1] < (1.5e-2 if order == 1 else 2e-3), errs  # measured 9.4e-3 (Euler, 32) and 1.0e-3 (Heun, 16)


def test_optimum_is_the_exact_discrete_minimiser():
    # psi_N is affine for a Gaussian prior: psi_N(z) = b + M z. The D-Flow optimum must solve the
    # discrete normal equations exactly -- a solve that detaches the state per step (as FlowChef's
    # D-Flow baseline does) or a wrong gradient would land elsewhere.
    prior, _, A, y, z0 = problem()
    den = prior.denoiser(FLOW)
    g = grid(5)
    flow = lambda z: af.solve(den, z, g, af.Heun()).x
    b = flow(torch.zeros(1, 8, dtype=D))[0]
    M = (flow(torch.eye(8, dtype=D)) - b).T
    H = M.T @ A.T @ A @ M / 0.01 + torch.eye(8, dtype=D)
    z_star = torch.linalg.solve(H, M.T @ A.T @ (y - A @ b) / 0.01)
    res = DFlow(solver=af.Heun(), grid=g, regularizer="gaussian", **TIGHT).run(
        den, MeasurementLoss(MatrixOperator(A), y, 0.1), z0)
    torch.testing.assert_close(res.latent, z_star.expand(2, 8), rtol=0, atol=1e-8)
    torch.testing.assert_close(res.x, (b + M @ z_star).expand(2, 8), rtol=0, atol=1e-8)


def test_rank_deficient_prior_never_leaves_the_data_subspace():
    prior, U, A, y, z0 = problem(rank=3)
    obj = MeasurementLoss(MatrixOperator(A), y, 0.1)
    res = DFlow(solver=af.Heun(), grid=grid(6), **TIGHT).run(prior.denoiser(FLOW), obj, z0)
    P_perp = torch.eye(8, dtype=D) - U @ U.T
    off = (res.x - prior.mean) @ P_perp
    assert float(off.norm(dim=1).max()) <= 1e-8
    # ... and inside it, the data are fit by least squares: x* = m + U (AU)^+ (y - A m)
    x_ls = prior.mean + U @ torch.linalg.lstsq(A @ U, (y - A @ prior.mean)[:, None]).solution[:, 0]
    torch.testing.assert_close(res.x, x_ls.expand(2, 8), rtol=0, atol=1e-6)
    assert float(res.losses[-1].max()) < float(res.losses[0].min())


def test_chi_regulariser_gradient_pushes_norm_toward_sqrt_d_minus_1():
    d = 16
    z = torch.randn(6, d, generator=torch.Generator().manual_seed(0), dtype=D)
    z = z / z.norm(dim=1, keepdim=True) * torch.tensor([0.5, 2.0, 3.0, 3.9, 4.5, 8.0], dtype=D)[:, None]
    zl = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(chi_regularizer(zl).sum(), zl)
    r2 = z.pow(2).sum(1, keepdim=True)
    torch.testing.assert_close(g, z - (d - 1) * z / r2)
    # a descent step -g moves ||z|| toward sqrt(d - 1) = 3.873: outward below it, inward above it
    radial = -(g * z).sum(1) / z.norm(dim=1)
    below = z.norm(dim=1) < math.sqrt(d - 1)
    assert bool((radial[below] > 0).all()) and bool((radial[~below] < 0).all())
    # R is -log chi_d(||z||) up to a constant: check against the chi density
    r = z.norm(dim=1)
    log_chi = (d - 1) * torch.log(r) - r**2 / 2
    torch.testing.assert_close(chi_regularizer(z) - chi_regularizer(z)[0], -(log_chi - log_chi[0]))
    torch.testing.assert_close(gaussian_regularizer(z), 0.5 * r**2)


def test_chi_regulariser_alone_drives_norm_to_sqrt_d_minus_1():
    prior, _, _, _, z0 = problem()
    zero = lambda x0: 0.0 * x0.sum(1)
    res = DFlow(steps=2, regularizer="chi", **TIGHT).run(prior.denoiser(FLOW), zero, 3.0 * z0)
    torch.testing.assert_close(res.latent.norm(dim=1), torch.full((2,), math.sqrt(7.0), dtype=D), rtol=0, atol=1e-6)
    res = DFlow(steps=2, regularizer="gaussian", **TIGHT).run(prior.denoiser(FLOW), zero, z0)
    assert float(res.latent.abs().max()) < 1e-6


def test_blend_initialisation():
    prior, _, A, y, z0 = problem()
    den = prior.denoiser(FLOW)
    obj = MeasurementLoss(MatrixOperator(A), y, 0.1)
    dflow = DFlow(solver=af.Heun(), steps=8, blend=0.1)
    z_init = dflow.initial_latent(den, obj, z0)
    back = torch.linalg.pinv(A) @ y
    z_inv = af.solve(den, back.expand(2, 8), af.timesteps(FLOW, 8).flip(0), af.Heun()).x
    torch.testing.assert_close(z_init, math.sqrt(0.1) * z_inv + math.sqrt(0.9) * z0)
    # the sqrt weights keep unit variance for independent unit-variance inputs (a 0.1/0.9 linear blend would not)
    a, b = torch.randn(2, 200000, generator=torch.Generator().manual_seed(1), dtype=D)
    assert abs(float((math.sqrt(0.1) * a + math.sqrt(0.9) * b).var()) - 1.0) < 0.01
    # a convex problem: the optimum does not depend on the start
    ref = DFlow(solver=af.Heun(), steps=8, regularizer="gaussian", **TIGHT).run(den, obj, z0)
    res = DFlow(solver=af.Heun(), steps=8, regularizer="gaussian", blend=0.1, **TIGHT).run(den, obj, z0)
    torch.testing.assert_close(res.x, ref.x, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="linear operator"):
        DFlow(blend=0.1).initial_latent(den, MeasurementLoss(FourierMagnitude(dims=1), torch.ones(16, dtype=D), 0.1), z0)
    with pytest.raises(ValueError, match="linear operator"):
        DFlow(blend=0.1).initial_latent(den, lambda x: x.sum(1), z0)


def test_counts_and_strategies_agree():
    prior, _, A, y, z0 = problem()
    den = prior.denoiser(FLOW)
    obj = MeasurementLoss(MatrixOperator(A), y, 0.1)
    kw = dict(solver=af.Heun(), steps=4, regularizer="gaussian", iterations=1, max_iter=5)
    prior.box.update(calls=0, vjps=0)
    ck = DFlow(gradient=af.adjoint.Checkpoint(), **kw).run(den, obj, z0)
    assert (ck.nfe, ck.vjps) == (prior.box["calls"], prior.box["vjps"])
    evals = ck.losses.shape[0] - 1
    per_solve = 8  # Heun: 2 NFE per step (the default grid ends at t = 1e-3, no Euler fallback)
    # Checkpoint (keep=1) recomputes every step but the last (2 NFE fewer than a second solve)
    assert ck.vjps == evals * per_solve and ck.nfe == evals * (2 * per_solve - 2) + per_solve
    bp = DFlow(gradient=af.Backprop(), **kw).run(den, obj, z0)
    assert bp.nfe == evals * per_solve + per_solve and bp.vjps == ck.vjps
    torch.testing.assert_close(bp.latent, ck.latent, rtol=0, atol=1e-13)  # same gradients -> same iterates
    # the continuous adjoint is an opt-in: approximate gradients, still a descent
    ca = DFlow(gradient=af.adjoint.ContinuousAdjoint(), **kw).run(den, obj, z0)
    assert float(ca.losses[-1].sum()) < 0.5 * float(ca.losses[0].sum()) and ca.vjps > 0
    assert all(p.grad is None for p in den.parameters())


def test_dflow_argument_errors():
    with pytest.raises(ValueError, match="ODE solver"):
        DFlow(solver=af.EulerMaruyama())
    with pytest.raises(ValueError, match="regularizer"):
        DFlow(regularizer="l1")
    with pytest.raises(ValueError, match="blend"):
        DFlow(blend=1.5)
    with pytest.raises(TypeError, match="instance"):
        DFlow(gradient=af.Backprop)
    with pytest.raises(ValueError, match="iterations"):
        DFlow(iterations=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        DFlow(lr=0)  # used to pass validation and divide by zero in the first step
