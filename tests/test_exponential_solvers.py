"""Exponential integrators (DDIM, DPM-Solver++ 2M/3M/2S/3S, DEIS tAB/rhoAB, SDE-DPM-Solver++).

Truth comes from closed forms: GaussianData's exact PF-ODE map, predictions that do not depend on
``x`` (the PF-ODE is then a linear inhomogeneous ODE whose step is an integral computed here by
scipy quadrature or by hand), and phi functions evaluated with 60-digit decimals.
"""
import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from torch import nn

from adjointflow import (
    DDIM, DEIS, EDM, BrownianNoise, DPMSolverPP, EulerMaruyama, LinearFlow, SDEDPMSolverPP, State, VPCosine,
    VPLinear, UniPC, solve, timesteps,
)
from adjointflow.driver import ModelCall
from adjointflow.models import Denoiser
from adjointflow.solvers import ExponentialIntegrator
from adjointflow.plan import Plan
from adjointflow.solvers.exponential import Interval, multistep_orders, phi
from adjointflow.testing import GaussianData, empirical_order, local_orders

from solver_list import ALL_SOLVERS

F64 = torch.float64


def data():
    return GaussianData(torch.linspace(-1.5, 2.0, 8, dtype=F64), torch.logspace(-1, 0.3, 8, dtype=F64))


def latent(batch=4, seed=0):
    return torch.randn(batch, 8, dtype=F64, generator=torch.Generator().manual_seed(seed))


def rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


def lam(sch, t):
    return float(sch.log_snr(torch.as_tensor(t, dtype=F64)))


# ------------------------------------------------------------------------------------------------
# phi functions
def phi_ref(k, z):
    getcontext().prec = 60
    z = Decimal(z)
    taylor = sum(z**j / math.factorial(j) for j in range(k))
    return float((z.exp() - taylor) / z**k)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("z", [-60.0, -7.5, -1.0000001, -0.9999999, -0.3, -1e-3, -1e-9, 1e-12, 2e-6, 0.5, 1.0, 3.0, 20.0])
def test_phi_matches_60_digit_reference(k, z):
    assert phi(k, z) == pytest.approx(phi_ref(k, z), rel=2e-15, abs=0)


def test_phi_limits_and_bad_order():
    assert phi(1, 0.0) == 1.0 and phi(2, 0.0) == 0.5 and phi(3, 0.0) == pytest.approx(1 / 6, rel=1e-16)
    assert phi(1, -math.inf) == 0.0 and phi(3, -math.inf) == 0.0
    assert phi(0, 0.7) == math.exp(0.7)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            phi(bad, 0.1)


# ------------------------------------------------------------------------------------------------
# identities
ORDER1 = [DDIM(), DDIM(prediction="x0"), DPMSolverPP(order=1), DEIS(order=1), DEIS(order=1, variant="rhoAB"),
          DPMSolverPP(order=1, multistep=False)]


@pytest.mark.parametrize(
    "sch, grid_kw, pred",
    [(VPLinear(), dict(kind="logsnr", denoise_to_zero=True), "eps"), (EDM(), dict(kind="karras"), "x0"),
     (LinearFlow(), dict(kind="uniform", t_start=1.0), "velocity"), (VPCosine(), dict(kind="quadratic"), "v")],
    ids=["vplinear-to0", "edm", "flow-from1", "vpcosine-v"],
)
def test_first_order_solvers_agree(sch, grid_kw, pred):
    den, x = data().denoiser(sch, pred), latent()
    grid = timesteps(sch, 12, **grid_kw)
    with torch.no_grad():
        outs = [solve(den, x, grid, s).x for s in ORDER1]
    for s, out in zip(ORDER1[1:], outs[1:]):
        assert (out - outs[0]).abs().max() <= 1e-12, s


def test_ddim_is_alpha_x0_plus_sigma_eps():
    sch, d = VPLinear(), data()
    den, x = d.denoiser(sch, "eps"), latent()
    grid = timesteps(sch, 5)
    model = ModelCall(den)
    for form in ("eps", "x0"):
        out = DDIM(prediction=form).step_at(model, State(x), grid, 2).x
        p = den(x, grid[2])
        ref = sch.alpha(grid[3]) * p.x0 + sch.sigma(grid[3]) * p.eps
        assert (out - ref).abs().max() <= 1e-13


class TimeOnly(nn.Module):
    """A network whose output depends on t only: ``c0 + c1 f(t) + c2 f(t)^2`` (one row per dim)."""

    def __init__(self, f, coeffs):
        super().__init__()
        self.f, self.c = f, torch.as_tensor(coeffs, dtype=F64)

    def value(self, t):
        v = self.f(torch.as_tensor(t, dtype=F64))
        return self.c[0] + self.c[1] * v + self.c[2] * v * v

    def forward(self, x, t):
        return torch.stack([self.value(ti) for ti in t]).to(x.dtype)


COEFFS = [[0.3, -1.0, 2.0], [0.7, 0.4, -0.2], [0.05, 0.1, 0.3]]  # (3, dims=3)


def test_first_step_coefficients_are_closed_form():
    sch = VPLinear()
    grid = timesteps(sch, 8)
    a0, s0, a1, s1 = (float(f(grid[k])) for k in (0, 1) for f in (sch.alpha, sch.sigma))
    x, dx = latent(2)[:, :3], 1e-3 * latent(2, seed=1)[:, :3]
    for prediction, solvers, lead, coef in [
        ("x0", [DPMSolverPP(order=2), DPMSolverPP(order=3, warmup="multistep"), SDEDPMSolverPP(order=1)],
         s1 / s0, a1 - a0 * s1 / s0),  # alpha_1 (1 - e^{-h}) = alpha_1 - alpha_0 sigma_1/sigma_0
        ("eps", [DEIS(order=2), DEIS(order=3, variant="rhoAB", warmup="multistep")],
         a1 / a0, s1 - a1 * s0 / a0),  # -sigma_1 (e^h - 1) = sigma_1 - alpha_1 sigma_0/alpha_0
    ]:
        net = TimeOnly(lambda t: sch.log_snr(t), COEFFS)
        model = ModelCall(Denoiser(net, sch, prediction))
        p = net.value(grid[0])
        for s in solvers:
            if s.stochastic:
                continue  # the SDE's x-coefficient is (sigma_1/sigma_0) e^{-h}; checked in test_sde_first_step
            out = s.step_at(model, State(x), grid, 0).x
            out2 = s.step_at(model, State(x + dx), grid, 0).x
            # rounding only: the outputs are O(30) here, so compare at 1e-13
            assert (out2 - out - lead * dx).abs().max() <= 1e-13, s
            assert (out - lead * x - coef * p).abs().max() <= 1e-13, s


def test_sde_first_step_closed_form():
    sch = VPLinear()
    grid = timesteps(sch, 8)
    a0, s0, a1, s1 = (float(f(grid[k])) for k in (0, 1) for f in (sch.alpha, sch.sigma))
    e_mh = (a0 * s1) / (s0 * a1)  # e^{-h}
    net = TimeOnly(lambda t: sch.log_snr(t), COEFFS)
    model = ModelCall(Denoiser(net, sch, "x0"))
    x = latent(2)[:, :3]
    noise = BrownianNoise(x.shape, seed=5, dtype=F64)
    z = noise(grid[0], grid[1]) / math.sqrt(float(grid[0] - grid[1]))
    out = SDEDPMSolverPP(order=2).step_at(model, State(x), grid, 0, noise).x
    ref = s1 / s0 * e_mh * x + a1 * (1 - e_mh**2) * net.value(grid[0]) + s1 * math.sqrt(1 - e_mh**2) * z
    assert (out - ref).abs().max() <= 1e-14


def _step_with_history(solver, sch, prediction, f, i, grid):
    """One step of ``solver`` at ``i`` with exact history, for a time-only model ``c(f(t))``."""
    net = TimeOnly(f, COEFFS)
    model = ModelCall(Denoiser(net, sch, prediction))
    x = latent(2)[:, :3]
    hist = tuple(net.value(grid[i - j]).expand_as(x) for j in range(1, solver.order))
    return x, net, solver.step_at(model, State(x, hist), grid, i)


@pytest.mark.parametrize(
    "multistep, single",
    [(DPMSolverPP(order=2), DDIM(prediction="x0")), (DPMSolverPP(order=2, solver_type="heun"), DDIM(prediction="x0")),
     (DPMSolverPP(order=3, warmup="multistep"), DDIM(prediction="x0")), (DEIS(order=2), DDIM()),
     (DEIS(order=3, variant="rhoAB", warmup="multistep"), DDIM()), (SDEDPMSolverPP(order=2), SDEDPMSolverPP(order=1)),
     (DPMSolverPP(order=3), DPMSolverPP(order=2, multistep=False)),
     (DPMSolverPP(order=3, solver_type="heun"), DPMSolverPP(order=2, multistep=False, solver_type="heun"))],
)
def test_empty_history_takes_single_step_form(multistep, single):
    """An empty history takes exactly the first-order step (3M with singlestep warm-up: the 2S step)."""
    sch, d = EDM(), data()
    model, x, grid = ModelCall(d.denoiser(sch, "eps")), latent(), timesteps(sch, 20)
    noise = BrownianNoise(x.shape, seed=2, dtype=F64) if multistep.stochastic else None
    out = multistep.step_at(model, State(x), grid, 5, noise).x
    ref = single.step_at(model, State(x), grid, 5, noise).x
    assert torch.equal(out, ref)


@pytest.mark.parametrize("three", [DPMSolverPP(order=3), DEIS(order=3), DEIS(order=3, variant="rhoAB")],
                         ids=lambda s: repr(s)[:40])
def test_one_history_entry_takes_the_two_step_form(three):
    """The next warm-up level: an order-3 method with one history entry equals its order-2 version."""
    sch, d = EDM(), data()
    model, x, grid = ModelCall(d.denoiser(sch, "eps")), latent(), timesteps(sch, 20)
    hist = (den_pred(model, x, grid[4], three.prediction),)
    out = three.step_at(model, State(x, hist), grid, 5).x
    two = type(three)(**{**vars(three), "order": 2})
    assert torch.equal(out, two.step_at(model, State(x, hist), grid, 5).x)


def den_pred(model, x, t, kind):
    p = model(x * 0.9, t)
    return p.x0 if kind == "x0" else p.eps


def test_deis3_singlestep_warmup_is_dpm_solver_2():
    sch, d = VPLinear(), data()
    den, x, grid = d.denoiser(sch, "eps"), latent(), timesteps(sch, 20)
    out = DEIS(order=3).step_at(ModelCall(den), State(x), grid, 0).x
    iv = Interval.of(sch, grid[0], grid[1])
    t_mid = sch.t_from_log_snr(torch.tensor(0.5 * (iv.lam_s + iv.lam_t), dtype=F64))
    a0, s0, am, sm, a1, s1 = (float(f(t)) for t in (grid[0], t_mid, grid[1]) for f in (sch.alpha, sch.sigma))
    e0 = den(x, grid[0]).eps
    u = am / a0 * x - sm * (math.exp(lam(sch, t_mid) - iv.lam_s) - 1) * e0
    e1 = den(u, t_mid).eps
    r1 = (lam(sch, t_mid) - iv.lam_s) / iv.h
    ref = a1 / a0 * x - s1 * math.expm1(iv.h) * (e0 + (e1 - e0) / (2 * r1))
    assert (out - ref).abs().max() <= 1e-13


# ------------------------------------------------------------------------------------------------
# polynomial exactness: each full-order step integrates its interpolating polynomial exactly
def _exact_data_form(sch, net, t_s, t_t, x):
    """x_t = sigma_t/sigma_s x + alpha_t int_{lambda_s}^{lambda_t} e^{-(lambda_t - l)} x0(l) dl, x0 = c(l)."""
    ls, lt = lam(sch, t_s), lam(sch, t_t)
    c = net.c.numpy()
    ints = [quad(lambda l, k=k: math.exp(-(lt - l)) * l**k, ls, lt, epsabs=0, epsrel=1e-13, limit=200)[0]
            for k in range(3)]
    integral = torch.tensor(c[0] * ints[0] + c[1] * ints[1] + c[2] * ints[2], dtype=F64)
    return float(sch.sigma(t_t) / sch.sigma(t_s)) * x + float(sch.alpha(t_t)) * integral


@pytest.mark.parametrize("solver", [DPMSolverPP(order=3, lower_order_final=False),
                                    DPMSolverPP(order=3, multistep=False, solver_type="heun")], ids=["3M", "3S-heun"])
@pytest.mark.parametrize("sch", [VPLinear(), EDM(), LinearFlow()], ids=["vplinear", "edm", "flow"])
def test_third_order_data_form_is_exact_for_quadratic_x0(solver, sch):
    grid = timesteps(sch, 10, "logsnr", t_start=0.9 if isinstance(sch, LinearFlow) else None)
    x, net, new = _step_with_history(solver, sch, "x0", lambda t: sch.log_snr(t), 5, grid)
    ref = _exact_data_form(sch, net, grid[5], grid[6], x)
    assert (new.x - ref).abs().max() <= 1e-12 * (1 + ref.abs().max())


@pytest.mark.parametrize("solver", [DPMSolverPP(order=2, solver_type="heun"),
                                    DPMSolverPP(order=2, multistep=False, solver_type="heun")], ids=["2M-heun", "2S-heun"])
def test_second_order_heun_is_exact_for_linear_x0(solver):
    sch = VPLinear()
    grid = timesteps(sch, 10)
    net_c = [COEFFS[0], COEFFS[1], [0.0, 0.0, 0.0]]
    net = TimeOnly(lambda t: sch.log_snr(t), net_c)
    model = ModelCall(Denoiser(net, sch, "x0"))
    x = latent(2)[:, :3]
    hist = (net.value(grid[4]).expand_as(x),) if solver.multistep else ()
    out = solver.step_at(model, State(x, hist), grid, 5).x
    ref = _exact_data_form(sch, net, grid[5], grid[6], x)
    assert (out - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("sch", [VPLinear(), EDM(), LinearFlow()], ids=["vplinear", "edm", "flow"])
def test_deis_tab_is_exact_for_eps_quadratic_in_t(sch):
    """x_t = alpha_t/alpha_s x + alpha_t int_{t_s}^{t_t} eps(tau) rho'(tau) dtau, rho = sigma/alpha."""
    grid = timesteps(sch, 10, "logsnr", t_start=0.9 if isinstance(sch, LinearFlow) else None)
    x, net, new = _step_with_history(DEIS(order=3, lower_order_final=False), sch, "eps", lambda t: t, 5, grid)
    ts, tt = float(grid[5]), float(grid[6])

    def drho(tau):
        t = torch.tensor(tau, dtype=F64)
        return float(-sch.sigma_tilde(t) * sch.dlog_snr_dt(t))

    c = net.c.numpy()
    ints = [quad(lambda tau, k=k: tau**k * drho(tau), ts, tt, epsabs=0, epsrel=1e-13, limit=200)[0] for k in range(3)]
    integral = torch.tensor(c[0] * ints[0] + c[1] * ints[1] + c[2] * ints[2], dtype=F64)
    ref = float(sch.alpha(grid[6]) / sch.alpha(grid[5])) * x + float(sch.alpha(grid[6])) * integral
    assert (new.x - ref).abs().max() <= 1e-12 * (1 + ref.abs().max())


def test_deis_rhoab_is_exact_for_eps_quadratic_in_rho():
    sch = VPLinear()
    grid = timesteps(sch, 10)
    x, net, new = _step_with_history(DEIS(order=3, variant="rhoAB"), sch, "eps", lambda t: sch.sigma_tilde(t), 5, grid)
    r0, r1 = float(sch.sigma_tilde(grid[5])), float(sch.sigma_tilde(grid[6]))
    c = net.c
    integral = c[0] * (r1 - r0) + c[1] * (r1**2 - r0**2) / 2 + c[2] * (r1**3 - r0**3) / 3
    ref = float(sch.alpha(grid[6]) / sch.alpha(grid[5])) * x + float(sch.alpha(grid[6])) * integral
    assert (new.x - ref).abs().max() <= 1e-12


# ------------------------------------------------------------------------------------------------
def errors(solver, sch, grid_kw, ns, prediction="eps", d=None):
    d = data() if d is None else d
    den, x = d.denoiser(sch, prediction), latent()
    out = []
    with torch.no_grad():
        for n in ns:
            g = timesteps(sch, n, "logsnr", **grid_kw)
            out.append(rms(solve(den, x, g, solver).x, d.flow_map(sch, x, g[0], g[-1])))
    return out


# The declared-order suite (every solver x VPLinear/VPCosine/EDM/LinearFlow) lives in tests/test_solver_orders.py,
# driven by tests/solver_list.py.


# fine grids (EDM, the schedule with the smallest error constants): no floor, no order loss at 200+
# steps; the third-order solvers reach 1e-9 (diffusers' float32 DEIS-3 has a 1e-4 floor here)
FINE_CASES = [
    ("ddim", DDIM(), 1, [256, 512]),
    ("dpmpp_2m", DPMSolverPP(order=2), 2, [256, 512]),
    ("dpmpp_2s", DPMSolverPP(order=2, multistep=False), 2, [256, 512]),
    ("deis2_tab", DEIS(order=2), 2, [256, 512]),
    ("deis2_rhoab", DEIS(order=2, variant="rhoAB"), 2, [256, 512]),
    ("dpmpp_3m", DPMSolverPP(order=3), 3, [256, 512]),
    ("dpmpp_3s", DPMSolverPP(order=3, multistep=False), 3, [256, 512]),
    ("deis3_tab", DEIS(order=3), 3, [512, 1024]),
    ("deis3_rhoab", DEIS(order=3, variant="rhoAB"), 3, [1024, 2048]),
]


@pytest.mark.parametrize("name, solver, order, ns", FINE_CASES, ids=[c[0] for c in FINE_CASES])
def test_no_order_loss_on_fine_grids(name, solver, order, ns):
    errs = errors(solver, EDM(), {"t_end": 0.05}, ns)
    p = local_orders(ns, errs)[-1]
    assert p >= order - 0.15, f"{name}: local order {p:.2f} at {ns} steps; errors {errs}"
    if order == 3:
        # rhoAB-DEIS-3 has the largest error constant: 1.7e-9 at 2048 steps, still falling at order 3
        assert errs[-1] <= (1e-9 if "rhoab" not in name else 2e-9), errs


def test_3m_first_order_warmup_loses_the_order_on_fine_grids():
    """Why warmup="singlestep" is the default: diffusers' first-order first step (local error O(h^2))
    makes DPM-Solver++(3M) second order once h is small (documented trade-off, not a tolerance)."""
    ns = [256, 512]
    plain = errors(DPMSolverPP(order=3, warmup="multistep"), VPLinear(), {}, ns)
    ours = errors(DPMSolverPP(order=3), VPLinear(), {}, ns)
    assert local_orders(ns, plain)[0] < 2.3 and local_orders(ns, ours)[0] > 3.5


# ------------------------------------------------------------------------------------------------
# singular ends
FINAL_SOLVERS = [DDIM(), DPMSolverPP(order=2), DPMSolverPP(order=3), DPMSolverPP(order=3, multistep=False),
                 DEIS(order=2), DEIS(order=3, variant="rhoAB"), SDEDPMSolverPP(order=2)]


@pytest.mark.parametrize("solver", FINAL_SOLVERS, ids=lambda s: repr(s)[:40])
@pytest.mark.parametrize("sch, pred", [(VPLinear(), "eps"), (LinearFlow(), "velocity")], ids=["vplinear", "flow"])
def test_denoise_to_zero_final_step_returns_x0_hat(solver, sch, pred):
    """The step to t = 0 (sigma = 0, lambda = +inf) is first order and gives x = alpha(0) x0_hat = x0_hat."""
    d = data()
    den, x = d.denoiser(sch, pred), latent()
    grid = timesteps(sch, 20, "logsnr", t_start=0.99, t_end=2e-3, denoise_to_zero=True)
    with torch.no_grad():
        sol = solve(den, x, grid, solver, save_trajectory=True)
    x_last = sol.trajectory[-2]
    assert torch.isfinite(sol.x).all()
    assert (sol.x - den(x_last, grid[-2]).x0).abs().max() <= 1e-14


@pytest.mark.parametrize("solver", [DPMSolverPP(order=2), DPMSolverPP(order=3), DPMSolverPP(order=2, multistep=False),
                                    DEIS(order=3), DEIS(order=2, variant="rhoAB"), DDIM()], ids=lambda s: repr(s)[:40])
def test_flow_from_t1_velocity_model(solver):
    """LinearFlow from t = 1 exactly (alpha = 0, lambda = -inf): the first step is the exact first-order
    limit x = alpha_1 x0_hat + sigma_1 x/sigma_0; later steps converge (order >= 1 on a uniform t grid)."""
    sch, d = LinearFlow(), data()
    den, x = d.denoiser(sch, "velocity"), latent()
    grid = timesteps(sch, 4, "uniform", t_start=1.0, t_end=1e-2)
    first = solver.step_at(ModelCall(den), solver.init(None, x, grid), grid, 0).x
    with torch.no_grad():
        ref = float(sch.alpha(grid[1])) * den(x, grid[0]).x0 + float(sch.sigma(grid[1])) * x
        assert (first - ref).abs().max() <= 1e-14
        ns = [20, 40, 80]
        errs = [rms(solve(den, x, timesteps(sch, n, "uniform", t_start=1.0, t_end=1e-2), solver).x,
                    d.flow_map(sch, x, 1.0, 1e-2)) for n in ns]
    assert errs[2] < errs[1] < errs[0] and empirical_order(ns, errs) >= 0.9, errs


@pytest.mark.parametrize("pred", ["eps", "score"])
@pytest.mark.parametrize("solver", [DDIM(), DDIM(prediction="x0"), DPMSolverPP(order=2), DEIS(order=3),
                                    DPMSolverPP(order=3, multistep=False), SDEDPMSolverPP()], ids=lambda s: repr(s)[:40])
def test_eps_model_at_alpha_zero_raises(solver, pred):
    sch = LinearFlow()
    den, x = data().denoiser(sch, pred), latent()
    with pytest.raises(ValueError, match="t < 1|alpha = 0"):
        solve(den, x, timesteps(sch, 5, "uniform", t_start=1.0), solver)


@pytest.mark.parametrize("solver", [DDIM(), DPMSolverPP(order=2), DEIS(order=3), DEIS(order=3, variant="rhoAB")],
                         ids=lambda s: repr(s)[:40])
def test_vpcosine_from_t1_v_model(solver):
    """VPCosine's alpha(1) is exactly 0 (lambda = -inf), so a grid from t = 1 takes the exact limit step, as on
    LinearFlow (regression: cos(pi/2) = 6e-17 once made lambda(1) = -37 and DEIS-3 errors ~1e7)."""
    sch, d = VPCosine(), data()
    den, x = d.denoiser(sch, "v"), latent()
    assert float(sch.alpha(1.0)) == 0.0 and float(sch.log_snr(1.0)) == float("-inf")
    with torch.no_grad():
        ns = [20, 40, 80]
        errs = [rms(solve(den, x, timesteps(sch, n, "uniform", t_start=1.0, t_end=1e-2), solver).x,
                    d.flow_map(sch, x, 1.0, 1e-2)) for n in ns]
    assert errs[2] < errs[1] < errs[0] < 0.5 and empirical_order(ns, errs) >= 0.9, errs



@pytest.mark.parametrize("solver", [DDIM(), DPMSolverPP(order=2), DPMSolverPP(order=3), DEIS(order=3, variant="rhoAB")],
                         ids=lambda s: repr(s)[:40])
def test_inversion_round_trip_and_order(solver):
    """Increasing grids (h < 0) integrate the same ODE backwards: errors vs the exact map at the solver's order."""
    sch, d = VPLinear(), data()
    den, x0 = d.denoiser(sch, "eps"), latent()
    ns = [20, 40, 80]
    with torch.no_grad():
        errs = []
        for n in ns:
            g = timesteps(sch, n).flip(0)
            errs.append(rms(solve(den, x0, g, solver).x, d.flow_map(sch, x0, g[0], g[-1])))
    assert empirical_order(ns, errs) >= solver.order - 0.15, errs


def test_inversion_from_t0_needs_eps():
    """An increasing grid from t = 0 (sigma = 0) starts with the exact limit x = alpha_1 x0_hat + sigma_1 eps_hat,
    which needs eps there: fine for an eps model, a ValueError for an x0 model (eps = (x - alpha x0)/sigma)."""
    sch = VPLinear()
    x = latent(2)[:, :3]
    g = torch.linspace(0.0, 0.5, 6, dtype=F64)
    net = TimeOnly(lambda t: t, COEFFS)
    den = Denoiser(net, sch, "eps")
    for solver in (DDIM(), DDIM(prediction="x0"), DPMSolverPP(order=2), DEIS(order=3)):
        first = solver.step_at(ModelCall(den), State(x), g, 0).x
        ref = float(sch.alpha(g[1])) * x + float(sch.sigma(g[1])) * net.value(g[0])
        assert (first - ref).abs().max() <= 1e-14, solver
        with torch.no_grad():
            assert torch.isfinite(solve(den, x, g, solver).x).all()
    for solver in (DEIS(order=2), DPMSolverPP(order=2), DDIM()):
        with pytest.raises(ValueError, match="t > 0|sigma = 0"):
            solve(Denoiser(net, sch, "x0"), x, g, solver)


# ------------------------------------------------------------------------------------------------
# lower_order_final, history, purity, gradients
def test_lower_order_final_rule():
    """lower_order_final=True is diffusers' rule (below 15 steps the last step is first order)."""
    sch, d = VPLinear(), data()
    den, x = d.denoiser(sch, "eps"), latent()
    grid = timesteps(sch, 10)
    with torch.no_grad():
        sol = solve(den, x, grid, DPMSolverPP(order=2, lower_order_final=True), save_trajectory=True)
        last = DDIM(prediction="x0").step_at(ModelCall(den), State(sol.trajectory[-2]), grid, 9).x
        assert (sol.x - last).abs().max() <= 1e-15
        off = solve(den, x, grid, DPMSolverPP(order=2, lower_order_final=False)).x
        assert (off - sol.x).abs().max() > 1e-6
        # 15 steps or more: no lowering
        g15 = timesteps(sch, 15)
        a = solve(den, x, g15, DPMSolverPP(order=2, lower_order_final=True)).x
        b = solve(den, x, g15, DPMSolverPP(order=2, lower_order_final=False)).x
        assert torch.equal(a, b)


def _orders(solver, sch, grid):
    return [k for k, _ in multistep_orders(solver, Plan(sch, grid))]


def test_auto_final_order_follows_the_step_ratio_in_lambda():
    """lower_order_final=None lowers a step's order where it is over twice the mean lambda-step of its history
    (the last step of a uniform-t flow grid: h ~ 4.7 after 0.8) and caps third order to steps of h <= 1;
    on uniform log-SNR grids with h <= 1 nothing is lowered, however many steps."""
    flow = LinearFlow()
    g = timesteps(flow, 10)  # uniform t from 1: lambda steps inf, 0.81, 0.54, ..., 0.54, 0.81, 4.72
    for order in (2, 3):
        ks = _orders(DPMSolverPP(order=order, warmup="multistep"), flow, g)
        assert ks[-1] == 1 and ks[-2] == order and ks[0] == 1, ks  # singular first step, full order before the last
    assert _orders(UniPC(order=3), flow, g)[-1] == 1
    vp = VPLinear()
    for n in (12, 16, 40):
        g = timesteps(vp, n)
        assert float((vp.log_snr(g).diff()).max()) <= 1.0
        assert _orders(DPMSolverPP(order=3, warmup="multistep"), vp, g) == [1, 2] + [3] * (n - 2)
    g = timesteps(vp, 6)  # h ~ 1.7: second order at most
    assert max(_orders(DPMSolverPP(order=3, warmup="multistep"), vp, g)) == 2
    # diffusers' rules for comparison
    g = timesteps(vp, 20)
    assert _orders(DPMSolverPP(order=3, warmup="multistep", lower_order_final=True), vp, g)[-2:] == [3, 3]
    assert _orders(UniPC(order=3, lower_order_final=True), vp, g)[-2:] == [2, 1]
    # a solver class may move the thresholds (benchmarks/test_bench_solver_variants.py)
    g = timesteps(vp, 16)
    assert _orders(type("Coarse", (UniPC,), {"max_third_order_step": 0.1})(order=3), vp, g) == [1] + [2] * 15
    g = timesteps(flow, 10)
    assert _orders(type("Far", (UniPC,), {"max_step_ratio": 8.0})(order=3), flow, g)[-1] == 2


def test_singlestep_warmup_only_on_steps_where_third_order_is_the_aim():
    """DEIS-3/3M take the singlestep starter only on a first step of h <= 1 in lambda: on a one-step grid
    (h ~ 10) the noise-form starter was 55x worse than DDIM; now the step is DDIM."""
    sch, d = VPLinear(), data()
    den, x = d.denoiser(sch, "eps"), latent()
    grid = timesteps(sch, 1, t_start=1.0, t_end=1e-3, denoise_to_zero=True)
    with torch.no_grad():
        ddim = solve(den, x, grid, DDIM())
        for solver in (DEIS(order=3), DPMSolverPP(order=3)):
            sol = solve(den, x, grid, solver)
            assert sol.nfe == 2 and (sol.x - ddim.x).abs().max() <= 1e-12
    assert multistep_orders(DEIS(order=3), Plan(sch, timesteps(sch, 20)))[0] == (2, True)  # h ~ 0.5: starter


@pytest.mark.parametrize("solver", [DPMSolverPP(order=3), DEIS(order=3), DEIS(order=2, variant="rhoAB"),
                                    SDEDPMSolverPP(order=2)], ids=lambda s: repr(s)[:40])
def test_history_is_pure_and_differentiable(solver):
    sch, d = VPLinear(), data()
    den, grid = d.denoiser(sch, "eps"), timesteps(sch, 20)
    x = latent().requires_grad_(True)
    model = ModelCall(den)
    noise = BrownianNoise(x.shape, seed=1, dtype=F64) if solver.stochastic else None
    state = solver.init(model, x, grid)
    for i in range(4):
        state = solver.step_at(model, state, grid, i, noise)
    assert len(state.history) == solver.order - 1
    again = solver.step_at(model, state, grid, 4, noise)
    once_more = solver.step_at(model, state, grid, 4, noise)
    assert torch.equal(again.x, once_more.x)
    for h in state.history:
        assert h.requires_grad
    (g,) = torch.autograd.grad(state.history[-1].sum() + again.x.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_too_much_history_raises():
    sch, d = VPLinear(), data()
    model, x, grid = ModelCall(d.denoiser(sch, "eps")), latent(), timesteps(sch, 10)
    with pytest.raises(ValueError, match="history"):
        DPMSolverPP(order=3).step_at(model, State(x, (x, x)), grid, 1)


# ------------------------------------------------------------------------------------------------
# properties through the single solver list
MINE = [(n, f) for n, f, _, _ in ALL_SOLVERS if isinstance(f(), ExponentialIntegrator)]


@pytest.mark.parametrize("name, factory", MINE, ids=[m[0] for m in MINE])
def test_list_properties_batch_determinism_dtype(name, factory):
    sch, d = VPLinear(), data()
    grid = timesteps(sch, 6, denoise_to_zero=True)
    x = latent(3).to(torch.float32)
    den32 = d.denoiser(sch, "eps")
    s = factory()

    def run(xx, seed=7):
        noise = BrownianNoise(tuple(xx.shape), seed=seed, dtype=xx.dtype) if s.stochastic else None
        with torch.no_grad():
            return solve(den32, xx, grid, s, noise=noise).x

    out = run(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, run(x))  # determinism (same seed, same path)
    if not s.stochastic:  # an SDE's noise for one sample depends on the batch shape it is drawn with
        alone = run(x[1:2])
        assert (alone - out[1:2]).abs().max() <= 1e-6
    out64 = run(x.double())
    assert out64.dtype == torch.float64 and (out64 - out.double()).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------------
# SDE-DPM-Solver++
def test_sde_pathwise_convergence_on_a_fixed_brownian_path():
    """Fixed BrownianNoise, refining grids: errors vs a 512-step reference fall ~ linearly (strong
    order 1 for additive noise); the reference agrees with Euler--Maruyama's on the same path."""
    d = GaussianData(torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.3, 1.2], dtype=F64))
    sch = VPLinear()
    den = d.denoiser(sch, "eps")
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    noise = BrownianNoise(x.shape, seed=0, dtype=F64)
    ns = [8, 16, 32, 64]
    with torch.no_grad():
        ref = solve(den, x, timesteps(sch, 512), SDEDPMSolverPP(order=2), noise=noise).x
        ref_em = solve(den, x, timesteps(sch, 512), EulerMaruyama(), noise=noise).x
        slopes = {}
        for order in (1, 2):
            errs = [rms(solve(den, x, timesteps(sch, n), SDEDPMSolverPP(order=order), noise=noise).x, ref) for n in ns]
            assert all(a > b for a, b in zip(errs, errs[1:])), errs
            slopes[order] = empirical_order(ns, errs)
            if order == 1:
                err1_64 = errs[-1]
    assert slopes[1] >= 0.7 and slopes[2] >= 0.9, slopes
    assert rms(ref, ref_em) <= 0.1 * err1_64


def _sde_moments(order, steps, n, seed):
    d = GaussianData(torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.3, 1.2], dtype=F64))
    sch = VPLinear()
    grid = timesteps(sch, steps)
    x = d.prior_sample(sch, grid[0], n, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = solve(d.denoiser(sch, "eps"), x, grid, SDEDPMSolverPP(order=order),
                    noise=BrownianNoise(x.shape, seed=seed, dtype=F64)).x
        mean, sd = d.marginal(sch, grid[-1], like=x)
    return (out.mean(0) - mean) / (sd / math.sqrt(n)), out.var(0) / sd**2 - 1


def test_sde_marginal_mean_and_variance():
    """From exact prior samples at t = 1 the reverse SDE keeps the exact marginals, so the output at
    t_end is N(alpha mu, alpha^2 s^2 + sigma^2). Monte Carlo with n = 40000 per dim at 50 steps
    (order 2): mean within 5 standard errors, variance within 5 sqrt(2/n) = 3.5% (measured: 1-2%)."""
    n = 40000
    z_mean, rel_var = _sde_moments(2, 50, n, seed=12)
    assert (z_mean.abs() <= 5).all(), z_mean
    assert (rel_var.abs() <= 5 * math.sqrt(2 / n)).all(), rel_var


def test_sde_first_order_weak_error_is_first_order():
    """SDE-DPM-Solver++(1) has weak order 1: its variance bias (-30% at 25 steps) shrinks ~4x from 25 to
    100 steps (a 0th-order method would not shrink, a 2nd-order one 16x); n = 20000, same seed."""
    z25, v25 = _sde_moments(1, 25, 20000, seed=3)
    z100, v100 = _sde_moments(1, 100, 20000, seed=3)
    ratio = v25 / v100
    assert ((ratio >= 2.3) & (ratio <= 6.0)).all(), (v25, v100)
    assert (z25.abs() <= 5).all() and (z100.abs() <= 5).all()


def test_sde_replay_and_bad_inputs():
    sch, d = VPLinear(), data()
    den, x, grid = d.denoiser(sch, "eps"), latent(), timesteps(sch, 8)
    with torch.no_grad():
        a = solve(den, x, grid, SDEDPMSolverPP(), noise=BrownianNoise(x.shape, seed=4, dtype=F64)).x
        b = solve(den, x, grid, SDEDPMSolverPP(), noise=BrownianNoise(x.shape, seed=4, dtype=F64)).x
        c = solve(den, x, grid, SDEDPMSolverPP(), noise=BrownianNoise(x.shape, seed=5, dtype=F64)).x
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
    with pytest.raises(ValueError, match="noise"):
        SDEDPMSolverPP().step_at(ModelCall(den), State(x), grid, 0, None)
    with pytest.raises(ValueError, match="decreasing"):
        SDEDPMSolverPP().step_at(ModelCall(den), State(x), grid.flip(0), 0, BrownianNoise(x.shape, dtype=F64))


# ------------------------------------------------------------------------------------------------
# input validation
@pytest.mark.parametrize(
    "make, exc",
    [(lambda: DPMSolverPP(order=4), ValueError), (lambda: DPMSolverPP(order=2.0), TypeError),
     (lambda: DPMSolverPP(order=True), TypeError), (lambda: DPMSolverPP(multistep="yes"), TypeError),
     (lambda: DPMSolverPP(solver_type="bh2"), ValueError), (lambda: DPMSolverPP(lower_order_final=1), TypeError),
     (lambda: DPMSolverPP(warmup="none"), ValueError), (lambda: DEIS(order=0), ValueError),
     (lambda: DEIS(order=4), ValueError), (lambda: DEIS(variant="tab"), ValueError),
     (lambda: DEIS(warmup=None), ValueError), (lambda: DDIM(prediction="v"), ValueError),
     (lambda: SDEDPMSolverPP(order=3), ValueError), (lambda: SDEDPMSolverPP(solver_type=None), ValueError)],
)
def test_bad_arguments(make, exc):
    with pytest.raises(exc):
        make()


def test_declared_attributes():
    assert DPMSolverPP(order=3).nfe_per_step == 1 and DPMSolverPP(order=3, multistep=False).nfe_per_step == 3
    assert DPMSolverPP().prediction == "x0" and DEIS().prediction == "eps" and SDEDPMSolverPP().prediction == "x0"
    assert DDIM().prediction == "eps" and DDIM(prediction="x0").prediction == "x0"
    assert SDEDPMSolverPP().stochastic and not DPMSolverPP().stochastic
    assert DEIS(order=2).order == 2 and DDIM.order == 1
    with pytest.raises(Exception):
        DPMSolverPP().order = 3  # frozen
