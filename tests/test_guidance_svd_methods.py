"""DDRM, PiGDM, DiffPIR and FlowDPS against closed forms on Gaussian data.

* PiGDM (``eta = 0``, Bayes' weight) and DiffPIR (``lambda = 1``, ``zeta = 0``) with the exact
  ``r_t^2`` of isotropic Gaussian data are the posterior's probability-flow ODE in DDIM form: from
  whitened starts (every update is affine in the start, so the moments are the method's exact ones)
  the sample mean and covariance converge to the exact posterior's at order 1, on VP and flow paths.
* DDRM equals an independent dense implementation of the paper's equations, is data-consistent as
  ``sigma_y -> 0``, and samples the prior exactly on the coordinates the operator does not see when
  the prior decouples there. It is *not* a posterior sampler: its mean is biased toward ``y``.
* FlowDPS: one step equals the hand-derived update; no VJP through the network; works with a
  nonlinear objective.
"""
import math

import pytest
import torch

import adjointflow as af
from adjointflow.guidance import (DDRM, DiffPIR, Downsample, FlowDPS, FourierMagnitude, GaussianBlur, Inpaint,
                                  LanPaint, MatrixOperator, MeasurementLoss, PiGDM)
from adjointflow.testing import GaussianData, empirical_order

from test_guidance_gaussian import FullGaussian

D = torch.float64
VP, FLOW = af.VPLinear(), af.LinearFlow()


def whiten(z):
    z = z - z.mean(0)
    L = torch.linalg.cholesky(torch.cov(z.T))
    return torch.linalg.solve_triangular(L, z.T, upper=False).T


def isotropic_problem(d=4, c=0.7, sy=0.3):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(d, generator=g, dtype=D)
    data = GaussianData(m, torch.full((d,), c**0.5, dtype=D))
    A = torch.randn(2, d, generator=g, dtype=D)
    y = A @ (m + c**0.5 * torch.randn(d, generator=g, dtype=D)) + sy * torch.randn(2, generator=g, dtype=D)
    pm, pc = (v.detach() for v in data.posterior(A, y, sy))
    return data, MeasurementLoss(MatrixOperator(A), y, sy), pm, pc


def grid_for(sch, n):
    return af.timesteps(sch, n, t_end=0.0) if sch is FLOW else af.timesteps(sch, n)


def moment_errors(method_for_grid, sch, pred, ns):
    data, obj, pm, pc = isotropic_problem()
    den = data.denoiser(sch, pred)
    z = whiten(torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=D))
    em, ec = [], []
    for n in ns:
        grid = grid_for(sch, n)
        a0, s0, a1, s1 = sch.alpha(grid[0]), sch.sigma(grid[0]), sch.alpha(grid[-1]), sch.sigma(grid[-1])
        x1 = a0 * pm + z @ torch.linalg.cholesky(a0**2 * pc + s0**2 * torch.eye(4, dtype=D)).T
        x = method_for_grid(grid).run(den, obj, x1).x
        em.append(float((x.mean(0) - a1 * pm).norm()))
        ec.append(float((torch.cov(x.T) - (a1**2 * pc + s1**2 * torch.eye(4, dtype=D))).norm()))
    return em, ec


PATHS = [("vp", VP, "eps"), ("flow", FLOW, "velocity")]


@pytest.mark.parametrize("name,sch,pred", PATHS, ids=[p[0] for p in PATHS])
def test_pigdm_converges_to_the_exact_posterior(name, sch, pred):
    em, ec = moment_errors(lambda g: PiGDM(grid=g, eta=0.0, data_variance=0.7), sch, pred, [50, 100, 200])
    assert ec[-1] < 0.03 and empirical_order([50, 100, 200], ec) > 0.9, ec
    # VP: the mean is exact at every step count; flow: the unguided first step from alpha = 0 costs O(h)
    if sch is VP:
        assert max(em) < 1e-10, em
    else:
        assert em[-1] < 3e-3 and empirical_order([50, 100, 200], em) > 0.9, em


@pytest.mark.parametrize("name,sch,pred", PATHS, ids=[p[0] for p in PATHS])
def test_diffpir_with_exact_prox_weight_converges_to_the_exact_posterior(name, sch, pred):
    em, ec = moment_errors(lambda g: DiffPIR(grid=g, lam=1.0, zeta=0.0, data_variance=0.7), sch, pred,
                           [50, 100, 200])
    assert max(em) < 1e-10, em  # the data step is E[x0 | x_t, y] exactly: the mean never drifts
    assert ec[-1] < 0.03 and empirical_order([50, 100, 200], ec) > 0.9, ec


def test_pigdm_stochastic_samples_within_mc_error():
    # eta = 1 with the exact likelihood: one run, Monte-Carlo check of the posterior mean
    data, obj, pm, pc = isotropic_problem()
    n = 4000
    x1 = torch.randn(n, 4, generator=torch.Generator().manual_seed(2), dtype=D)
    res = PiGDM(steps=100, eta=0.0, data_variance=0.7).run(data.denoiser(FLOW, "velocity"), obj, x1)
    se = torch.sqrt(torch.diagonal(pc) / n)
    assert bool(((res.x.mean(0) - pm).abs() < 4 * se + 5e-3).all()), (res.x.mean(0), pm)
    assert res.nfe == 100 and res.vjps == 99  # the first step (alpha = 0) needs no VJP


# --- DDRM --------------------------------------------------------------------------------------
def ddrm_reference(data, sch, A, y, sy, x, grid, eta, eta_b, seed):
    """The paper's Eq. (7)-(8) in its variance-exploding form on the dense SVD, coordinate by coordinate."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=True)
    k, n = S.numel(), Vh.shape[0]
    ybar = (y @ U)[:k] / S
    gen = torch.Generator().manual_seed(seed)
    for i in range(len(grid) - 1):
        t, tn = grid[i], grid[i + 1]
        a, s, an, sn = sch.alpha(t), sch.sigma(t), sch.alpha(tn), sch.sigma(tn)
        x0 = data.posterior_mean_x0(sch, x, t).detach()
        c0, e = x0 @ Vh.T, ((x - a * x0) / s) @ Vh.T
        z = torch.randn(c0.shape, generator=gen, dtype=D)
        rho = sn / an
        c = torch.empty_like(c0)
        for j in range(n):
            if j >= k or S[j] == 0:
                c[:, j] = c0[:, j] + rho * (math.sqrt(1 - eta**2) * e[:, j] + eta * z[:, j])
            elif rho < sy / S[j]:
                c[:, j] = c0[:, j] + rho * (math.sqrt(1 - eta**2) * (ybar[j] - c0[:, j]) / (sy / S[j]) + eta * z[:, j])
            else:
                c[:, j] = ((1 - eta_b) * c0[:, j] + eta_b * ybar[j]
                           + torch.sqrt(rho**2 - eta_b**2 * sy**2 / S[j] ** 2) * z[:, j])
        x = an * (c @ Vh)
    return x


@pytest.mark.parametrize("eta,eta_b", [(0.85, 1.0), (0.0, 0.5), (1.0, 0.0)])
def test_ddrm_equals_dense_reference(eta, eta_b):
    g = torch.Generator().manual_seed(3)
    data = GaussianData(torch.randn(5, generator=g, dtype=D), torch.linspace(0.5, 1.5, 5, dtype=D))
    A = torch.randn(3, 5, generator=g, dtype=D)
    A[2] = A[0] + A[1]  # rank 2: a zero singular value inside the measured block
    y = torch.randn(3, generator=g, dtype=D)
    x = torch.randn(6, 5, generator=g, dtype=D)
    for sch, pred in ((VP, "eps"), (FLOW, "velocity")):
        grid = af.timesteps(sch, 12, t_start=0.99)
        out = DDRM(grid=grid, eta=eta, eta_b=eta_b, seed=7).run(data.denoiser(sch, pred),
                                                                 MeasurementLoss(MatrixOperator(A), y, 0.2), x)
        ref = ddrm_reference(data, sch, A, y, 0.2, x, grid, eta, eta_b, 7)
        torch.testing.assert_close(out.x, ref, rtol=1e-9, atol=1e-9)
        assert out.vjps == 0 and out.nfe == 12


def test_ddrm_is_data_consistent_as_noise_vanishes():
    data = GaussianData(torch.zeros(1, 4, 4, dtype=D), torch.ones(1, 4, 4, dtype=D))
    truth = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=D)
    for op in (Downsample(2), Inpaint((torch.arange(16) % 3 > 0).reshape(4, 4)),
               GaussianBlur(sigma=0.6, size=3)):
        y = op(truth)
        # the seen coordinates are pinned to alpha' y_bar + O(sigma') while sigma' >= sigma_y / s
        x = DDRM(grid=af.timesteps(FLOW, 20, t_end=1e-7)).run(data.denoiser(FLOW, "velocity"),
                                                             MeasurementLoss(op, y, 1e-10), torch.randn_like(truth)).x
        torch.testing.assert_close(op(x), y, rtol=0, atol=1e-6)


def test_ddrm_samples_the_prior_exactly_where_the_operator_is_blind():
    # diagonal prior + inpainting: coordinates decouple; the unseen one must follow the prior
    # (deterministic eta = 0 from whitened starts: exact moments; DDIM's first-order convergence)
    m, s = torch.tensor([0.5, -1.0, 2.0], dtype=D), torch.tensor([0.6, 1.5, 1.0], dtype=D)
    data = GaussianData(m, s)
    obj = MeasurementLoss(Inpaint(torch.tensor([1.0, 0.0, 1.0])), torch.tensor([1.0, 0.0, 1.5], dtype=D), 0.1)
    z = whiten(torch.randn(64, 3, generator=torch.Generator().manual_seed(5), dtype=D))
    ns, mean_err, var_err = [50, 100, 200], [], []
    for n in ns:
        x = DDRM(grid=grid_for(FLOW, n), eta=0.0).run(data.denoiser(FLOW, "velocity"), obj, z).x
        mean_err.append(abs(float(x[:, 1].mean() - m[1])))
        var_err.append(abs(float(x[:, 1].var() - s[1] ** 2)))
    assert max(mean_err) < 1e-10, mean_err
    assert var_err[-1] < 0.035 and empirical_order(ns, var_err) > 0.9, var_err


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddrm_is_not_a_posterior_sampler(eta):
    # 1-D prior N(0, 1), y = 1.5, sigma_y = 0.3: posterior N(1.376, 0.0826). DDRM's eta = 0 stays at y
    # (no denoising of the measured coordinate); eta = 1 re-draws all noise each step and drifts back
    # toward the prior as steps grow. Neither has the posterior's mean (contrary to the hope in the
    # issue that eta = 1 samples the exact posterior).
    data = GaussianData(torch.zeros(1, dtype=D), torch.ones(1, dtype=D))
    obj = MeasurementLoss(Inpaint(torch.ones(1)), torch.tensor([1.5], dtype=D), 0.3)
    x = DDRM(steps=200, eta=eta).run(data.denoiser(VP, "eps"), obj,
                                     torch.randn(4000, 1, generator=torch.Generator().manual_seed(6), dtype=D)).x
    mean = float(x.mean())
    assert abs(mean - 1.376) > 0.1, mean
    assert (mean > 1.45) if eta == 0.0 else (mean < 1.2), mean


# --- FlowDPS -----------------------------------------------------------------------------------
def test_flowdps_one_step_equals_the_hand_derived_update():
    prior = FullGaussian(torch.zeros(2), torch.tensor([[1.0, 0.6], [0.6, 1.0]]))
    den = prior.denoiser(FLOW, "velocity")
    A, y, sy = torch.tensor([[1.0, 0.5]], dtype=D), torch.tensor([0.8], dtype=D), 0.1
    obj = MeasurementLoss(MatrixOperator(A), y, sy)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(7), dtype=D)
    t, tn, lr, K = 0.7, 0.6, 0.3, 2
    out = FlowDPS(grid=torch.tensor([t, tn], dtype=D), lr=lr, iterations=K, stochasticity=0.0).run(den, obj, x)
    x0 = prior.posterior_mean_x0(FLOW, x, t)
    eps = (x - (1 - t) * x0) / t
    x0y = x0.clone()
    for _ in range(K):  # gradient of ||y - A x0|| is -A^T r / ||r||
        r = y - x0y @ A.T
        x0y = x0y + lr * (r @ A) / r.norm(dim=1, keepdim=True)
    x0t = (1 - t) * x0 + t * x0y  # tau = t on a rectified flow
    torch.testing.assert_close(out.x, (1 - tn) * x0t + tn * eps, rtol=1e-12, atol=1e-12)
    assert (out.nfe, out.vjps) == (1, 0) and prior.box["graph_calls"] == 0


def test_flowdps_fits_a_nonlinear_measurement():
    data = GaussianData(torch.zeros(1, 4, 4, dtype=D), torch.ones(1, 4, 4, dtype=D))
    truth = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(8), dtype=D)
    obj = MeasurementLoss(FourierMagnitude(), FourierMagnitude()(truth), 0.05)
    x1 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(9), dtype=D)
    den = data.denoiser(FLOW, "velocity")
    plain = af.solve(den, x1, af.timesteps(FLOW, 30), af.Euler()).x.detach()
    res = FlowDPS(steps=30, lr=1.0, iterations=10).run(den, obj, x1)
    assert float(res.losses[-1].mean()) < 0.25 * float(obj(plain).mean())  # measured: 0.15
    assert res.vjps == 0


# --- shared behaviour and bad input --------------------------------------------------------------
METHODS = [DDRM, PiGDM, DiffPIR, FlowDPS, LanPaint]


def gaussian_setup():
    data = GaussianData(torch.zeros(1, 4, 4, dtype=D), torch.ones(1, 4, 4, dtype=D))
    truth = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(10), dtype=D)
    op = Downsample(2)
    obj = MeasurementLoss(op, op(truth) + 0.05 * torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(11),
                                                           dtype=D), 0.05)
    return data.denoiser(FLOW, "velocity"), obj, torch.randn(3, 1, 4, 4, dtype=D)


@pytest.mark.parametrize("method", METHODS, ids=[m.__name__ for m in METHODS])
def test_defaults_run_fit_the_measurement_and_are_reproducible(method, capsys):
    den, obj, x = gaussian_setup()
    m = method(steps=10)
    a, b = m.run(den, obj, x), m.run(den, obj, x)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert a.losses.shape == (11, 3) and a.nfe >= 10
    torch.testing.assert_close(a.losses[-1], obj(a.x))
    plain = af.solve(den, x, af.timesteps(FLOW, 10), af.Euler()).x.detach()
    assert float(a.losses[-1].mean()) < 0.1 * float(obj(plain).mean())
    assert method.__doc__ and "default" in method.__doc__.lower()
    import dataclasses
    dataclasses.replace(m, progress=True).run(den, obj, x)
    assert method.__name__ in capsys.readouterr().err
    assert a.stop_reason == "completed"


@pytest.mark.parametrize("method", [DDRM, PiGDM, DiffPIR], ids=["DDRM", "PiGDM", "DiffPIR"])
def test_svd_methods_refuse_operators_without_an_svd(method):
    den, _, x = gaussian_setup()
    obj = MeasurementLoss(FourierMagnitude(), torch.ones(3, 1, 8, 8, dtype=D), 0.1)
    with pytest.raises(TypeError, match=r"Inpaint, Downsample, GaussianBlur, MatrixOperator.*FourierMagnitude has none"):
        method(steps=3).run(den, obj, x)
    with pytest.raises(TypeError, match="MeasurementLoss"):
        method(steps=3).run(den, lambda x0: (x0**2).flatten(1).sum(1), x)
    poisson = MeasurementLoss(Downsample(2), torch.ones(3, 1, 2, 2, dtype=D), 0.1, noise="poisson")
    with pytest.raises(ValueError, match="Gaussian"):
        method(steps=3).run(den, poisson, x)


def test_fraction_arguments_must_lie_in_the_unit_interval():
    for bad in (-0.1, 1.5, math.nan, "0.5", True):
        with pytest.raises(ValueError, match="eta must be a number in"):
            DDRM(eta=bad)
        with pytest.raises(ValueError, match="eta must be a number in"):
            PiGDM(eta=bad)
    with pytest.raises(ValueError, match="eta_b"):
        DDRM(eta_b=1.01)
    with pytest.raises(ValueError, match="zeta"):
        DiffPIR(zeta=-1.0)
    with pytest.raises(ValueError, match="stochasticity"):
        FlowDPS(stochasticity=2.0)
    with pytest.raises(ValueError, match="data_variance"):
        PiGDM(data_variance=0.0)
    with pytest.raises(ValueError, match="steps"):
        DDRM(steps=0)
    with pytest.raises(ValueError, match="seed"):
        DiffPIR(seed=0.5)
    with pytest.raises(ValueError, match="iterations"):
        FlowDPS(iterations=0)


# --- LanPaint ----------------------------------------------------------------------------------
def inpainting_problem():
    from adjointflow.testing import linear_gaussian_posterior
    from test_guidance_gaussian import random_cov
    g = torch.Generator().manual_seed(12)
    cov, _ = random_cov(4, 4, g)
    mean = torch.randn(4, generator=g, dtype=D)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=D)
    truth = mean + torch.linalg.cholesky(cov) @ torch.randn(4, generator=g, dtype=D)
    y = (truth + 0.3 * torch.randn(4, generator=g, dtype=D)) * mask
    pm, pc = linear_gaussian_posterior(mean, cov, torch.eye(4, dtype=D)[mask > 0], y[mask > 0], 0.3)
    return FullGaussian(mean, cov), MeasurementLoss(Inpaint(mask), y, 0.3), pm, pc


def test_lanpaint_samples_the_exact_posterior_of_noisy_inpainting():
    # correlated prior, noisy measurement: the mean within Monte-Carlo error at every step count, the
    # covariance converging at first order (the ancestral steps below the pinning level); without the
    # Langevin steps (plain replacement) the unseen coordinates are off by many standard errors
    prior, obj, pm, pc = inpainting_problem()
    n = 4000
    x1 = torch.randn(n, 4, generator=torch.Generator().manual_seed(13), dtype=D)
    se_mean = torch.sqrt(torch.diagonal(pc) / n)
    se_cov = torch.sqrt((torch.outer(torch.diagonal(pc), torch.diagonal(pc)) + pc**2) / n)
    cov_err = {}
    for steps in (50, 200):
        grid = af.timesteps(FLOW, steps, t_end=0.0)
        res = LanPaint(grid=grid, langevin_steps=10, step_size=0.2).run(prior.denoiser(FLOW), obj, x1)
        assert bool(((res.x.mean(0) - pm).abs() < 4 * se_mean).all()), ((res.x.mean(0) - pm) / se_mean)
        cov_err[steps] = torch.cov(res.x.T) - pc
        # NFE: one per ODE step plus 10 per step down to the level rho = sigma_y = 0.3 (t* = 0.3 / 1.3 on
        # the flow), which the run moves the nearest grid time (in log-SNR) onto
        t_star = 0.3 / 1.3
        lam = FLOW.log_snr(grid[1:-1])
        grid[1 + int((lam - math.log(1 / 0.3)).abs().argmin())] = t_star
        pinned = int((grid[:-1] >= t_star - 1e-12).sum())
        assert res.nfe == steps + 10 * pinned and res.vjps == 0
    assert bool((cov_err[200].abs() < 4.5 * se_cov + 0.01).all()), cov_err[200] / se_cov
    seen = torch.tensor([0, 2])
    assert bool((cov_err[200].diagonal()[seen].abs() < 0.4 * cov_err[50].diagonal()[seen].abs()).all()), cov_err
    plain = LanPaint(grid=af.timesteps(FLOW, 50, t_end=0.0), langevin_steps=0).run(prior.denoiser(FLOW), obj, x1).x
    assert float(((plain.mean(0) - pm).abs() / se_mean).max()) > 5


def test_lanpaint_argument_errors():
    with pytest.raises(ValueError, match="langevin_steps"):
        LanPaint(langevin_steps=-1)
    with pytest.raises(ValueError, match="step_size"):
        LanPaint(step_size=-0.1)
    den, _, x = gaussian_setup()
    with pytest.raises(TypeError, match="FourierMagnitude has none"):
        LanPaint(steps=3).run(den, MeasurementLoss(FourierMagnitude(), torch.ones(3, 1, 8, 8, dtype=D), 0.1), x)


# --- posterior-mean output (stop) ----------------------------------------------------------------
def test_pigdm_stopped_estimate_is_the_posterior_mean_with_less_error_than_a_sample():
    # Exact likelihood, exact posterior-marginal starts: x_t | y ~ N(alpha pm, alpha^2 pc + sigma^2 I) along the
    # posterior PF-ODE, and the estimate at the stop level rho is E[x0 | x_t, y]. So its mean is pm and its
    # spread Cov[E[x0 | x_t, y]] = pc - (pc^-1 + I / rho^2)^-1 (the law of total covariance): its error to
    # the truth, tr pc + tr spread, lies between the posterior mean's (tr pc) and a sample's (2 tr pc),
    # and falls to the posterior mean's as rho grows. First-order in the steps (covariance of the ODE).
    data, obj, pm, pc = isotropic_problem()
    den = data.denoiser(VP, "eps")
    z = whiten(torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=D))
    eye = torch.eye(4, dtype=D)
    ns, errs, spread = (50, 100), {}, {}
    for n in ns:
        grid0 = af.timesteps(VP, n)
        a0, s0 = VP.alpha(grid0[0]), VP.sigma(grid0[0])
        x1 = a0 * pm + z @ torch.linalg.cholesky(a0**2 * pc + s0**2 * eye).T
        for rho in (0.1, 0.5, 20.0):
            res = PiGDM(steps=n, eta=0.0, data_variance=0.7, stop=rho, progress=False).run(den, obj, x1)
            assert res.nfe == n
            assert float((res.x.mean(0) - pm).norm()) < 1e-10
            exact = pc - torch.linalg.inv(torch.linalg.inv(pc) + eye / rho**2)
            errs.setdefault(rho, []).append(float((torch.cov(res.x.T) - exact).norm() / pc.norm()))
            spread[rho] = float(torch.cov(res.x.T).trace())
    for rho in (0.1, 0.5):  # measured at 100 steps: 0.035, 0.015
        assert errs[rho][-1] < 0.04 and empirical_order(ns, errs[rho]) > 0.9, errs
    assert errs[20.0][-1] < 1e-6, errs
    # a sample's spread around pm is tr pc (its error 2 tr pc); the estimate's shrinks with the level
    assert spread[0.1] < float(pc.trace()) and spread[0.5] < 0.75 * float(pc.trace()), spread
    assert spread[20.0] < 0.002 * float(pc.trace()), spread


@pytest.mark.parametrize("eta", [0.85, 1.0])
def test_ddrm_stopped_at_the_measurement_level_returns_the_posterior_mean_of_the_measured_part(eta):
    # Isotropic prior N(m, c I), A = s Q (orthonormal rows, equal singular values), stop = sigma_y / s:
    # the measured entries of x_t are alpha y_bar exactly, so E[x0 | x_t] there is the exact posterior
    # mean of every run; the unseen entries are DDRM's prior draws denoised (mean m = the posterior's),
    # spread c^2 / (c + rho^2) < c at rho = 0.6: the error to pm about half a sample's.
    g = torch.Generator().manual_seed(14)
    c, s, sy = 0.7, 0.5, 0.3
    m = torch.randn(4, generator=g, dtype=D)
    Q = torch.linalg.qr(torch.randn(4, 2, generator=g, dtype=D))[0].T
    y = s * Q @ (m + c**0.5 * torch.randn(4, generator=g, dtype=D)) + sy * torch.randn(2, generator=g, dtype=D)
    data = GaussianData(m, torch.full((4,), c**0.5, dtype=D))
    obj = MeasurementLoss(MatrixOperator(s * Q), y, sy)
    pm, pc = (v.detach() for v in data.posterior(s * Q, y, sy))
    den, n = data.denoiser(FLOW, "velocity"), 2000
    x1 = torch.randn(n, 4, generator=torch.Generator().manual_seed(15), dtype=D)
    est = DDRM(steps=60, eta=eta, stop=sy / s, seed=3).run(den, obj, x1)
    assert est.nfe == 60 and est.vjps == 0
    torch.testing.assert_close(est.x @ Q.T, (pm @ Q.T).expand(n, 2), rtol=0, atol=1e-6)
    se = torch.sqrt(torch.diagonal(pc) / n)
    assert bool(((est.x.mean(0) - pm).abs() < 4 * se).all()), (est.x.mean(0) - pm) / se
    sample = DDRM(steps=60, eta=eta, seed=3).run(den, obj, x1).x
    err_est, err_sample = (float(((v - pm) ** 2).sum(1).mean()) for v in (est.x, sample))
    assert err_est < 0.7 * err_sample, (err_est, err_sample)


def test_stop_runs_to_the_level_records_every_evaluation_and_returns_the_estimate():
    den, obj, x = gaussian_setup()
    seen = []
    res = DiffPIR(steps=10, stop=0.1, callback=lambda st: seen.append((st.t, st.x0))).run(den, obj, x)
    assert res.nfe == 10 and len(seen) == 10 and res.losses.shape == (11, 3)
    assert abs(seen[-1][0] - FLOW.t_from_log_snr(torch.tensor(-math.log(0.1), dtype=D)).item()) < 1e-12
    torch.testing.assert_close(res.x, seen[-1][1], rtol=0, atol=0)
    grid = af.timesteps(FLOW, 10, t_end=0.0)
    explicit = DDRM(grid=grid, stop=0.1).run(den, obj, x)  # grid points with rho > 0.1, then the level
    assert explicit.nfe == int((FLOW.log_snr(grid) < -math.log(0.1)).sum()) + 1


def test_stop_argument_errors():
    for bad in (0.0, -1.0, math.inf, math.nan, True, "0.1"):
        for method in (DDRM, PiGDM, DiffPIR):
            with pytest.raises(ValueError, match="stop must be None or a noise level"):
                method(stop=bad)
    with pytest.raises(ValueError, match="steps must be >= 2 with stop"):
        DDRM(steps=1, stop=0.1)
    den, obj, x = gaussian_setup()
    with pytest.raises(ValueError, match=r"stop=0.001 is below the noise level .* grid's last time"):
        DDRM(grid=af.timesteps(FLOW, 10, t_end=0.2), stop=1e-3).run(den, obj, x)
    with pytest.raises(ValueError, match=r"stop=10 is not below the noise level .* grid's first time"):
        DDRM(grid=af.timesteps(FLOW, 10, t_start=0.5), stop=10.0).run(den, obj, x)
