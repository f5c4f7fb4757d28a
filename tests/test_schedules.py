import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adjointflow.schedules import EDM, VE, LinearFlow, NoiseSchedule, VPCosine, VPDiscrete, VPLinear
from adjointflow.testing.strategies import schedules, times

ALL = [VPLinear(), VPCosine(), VE(), EDM(), LinearFlow()]


def ddpm_table(n=1000):
    betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


@settings(max_examples=60, deadline=None)
@given(schedules(), times())
def test_derivatives_match_autograd(sch, t):
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    for fn, dfn in [(sch.log_alpha, sch.dlog_alpha_dt), (sch.log_sigma, sch.dlog_sigma_dt),
                    (sch.alpha, sch.dalpha_dt), (sch.sigma, sch.dsigma_dt), (sch.log_snr, sch.dlog_snr_dt)]:
        out = fn(tt)
        g = torch.autograd.grad(out, tt)[0] if out.requires_grad else torch.zeros((), dtype=torch.float64)  # constant (alpha = 1)
        assert torch.allclose(dfn(tt.detach()), g, rtol=1e-10, atol=1e-12), (fn.__name__, float(g))


@settings(max_examples=60, deadline=None)
@given(schedules(), times())
def test_log_snr_round_trip(sch, t):
    lam = sch.log_snr(t)
    assert abs(float(sch.t_from_log_snr(lam)) - t) < 1e-10
    # and the generic bisection inverse agrees with the closed form
    assert abs(float(NoiseSchedule.t_from_log_snr(sch, lam)) - t) < 1e-10


@settings(max_examples=40, deadline=None)
@given(schedules(), times())
def test_sde_coefficients_consistent(sch, t):
    # g^2 = d sigma^2/dt - 2 f sigma^2 (Song et al. 2021, eq. for the forward SDE of a Gaussian path)
    t = torch.tensor(t, dtype=torch.float64)
    lhs = sch.g2(t)
    rhs = 2 * sch.sigma(t) * sch.dsigma_dt(t) - 2 * sch.f(t) * sch.sigma(t) ** 2
    assert torch.allclose(lhs, rhs, rtol=1e-9)
    assert float(lhs) > 0


@pytest.mark.parametrize("sch", ALL + [VPDiscrete(ddpm_table())], ids=lambda s: type(s).__name__)
def test_log_snr_strictly_decreasing(sch):
    t = torch.linspace(0.01, 0.99, 500, dtype=torch.float64)
    lam = sch.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())


def test_vp_schedules_preserve_variance():
    t = torch.linspace(0.0, 0.99, 50, dtype=torch.float64)
    for sch in (VPLinear(), VPCosine(), VPDiscrete(ddpm_table())):
        assert torch.allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t), atol=1e-12)


def test_vplinear_closed_form():
    sch = VPLinear()
    t = torch.tensor(0.3, dtype=torch.float64)
    la = -(19.9) * 0.09 / 4 - 0.1 * 0.3 / 2
    assert math.isclose(float(sch.alpha(t)), math.exp(la), rel_tol=1e-14)
    assert float(sch.sigma(0.0)) == 0.0 and math.isinf(float(sch.log_snr(0.0)))


def test_vpdiscrete_matches_table_at_timesteps():
    ac = ddpm_table()
    sch = VPDiscrete(ac)
    k = torch.arange(1000)
    t = (k + 1).double() / 1000
    assert torch.allclose(sch.alpha(t) ** 2, ac, rtol=1e-12)
    assert torch.allclose(sch.timestep(t), k.double())
    assert float(sch.alpha(0.0)) == 1.0 and float(sch.sigma(0.0)) == 0.0
    lam = sch.log_snr(t)
    assert torch.allclose(sch.t_from_log_snr(lam), t, atol=1e-12)


def test_vpdiscrete_rejects_bad_tables():
    with pytest.raises(ValueError, match="decreasing"):
        VPDiscrete(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        VPDiscrete(torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="1-D"):
        VPDiscrete(torch.ones(2, 2) * 0.5)
    with pytest.raises(TypeError):
        VPDiscrete()


def test_edm_uniform_t_is_karras():
    sch = EDM()
    t = torch.linspace(1, 0, 11, dtype=torch.float64)
    smin, smax, rho = 0.002, 80.0, 7.0
    i = torch.arange(11, dtype=torch.float64) / 10
    karras = (smax ** (1 / rho) + i * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    assert torch.allclose(sch.sigma(t), karras, rtol=1e-12)


def test_linear_flow_coefficients():
    sch = LinearFlow()
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    assert torch.equal(sch.alpha(t), 1 - t) and torch.equal(sch.sigma(t), t)
    assert float(sch.t_from_log_snr(torch.tensor(0.0))) == 0.5


@pytest.mark.parametrize("make, name", [
    (lambda: VE(sigma_min=50.0, sigma_max=0.01), "sigma_max"),   # swapped: sampled backwards (spread ~4949)
    (lambda: VE(sigma_min=1.0, sigma_max=1.0), "sigma_max"),     # equal: a grid of NaN
    (lambda: VE(sigma_min=0.0), "sigma_min"),
    (lambda: VE(sigma_max=float("inf")), "sigma_max"),
    (lambda: EDM(sigma_min=80.0, sigma_max=0.002), "sigma_max"),
    (lambda: EDM(sigma_min=-0.002), "sigma_min"),
    (lambda: EDM(rho=0.0), "rho"),
    (lambda: EDM(rho=float("nan")), "rho"),
    (lambda: VPLinear(beta_min=-1.0), "beta_min"),              # beta < 0 near t = 0: a garbage grid
    (lambda: VPLinear(beta_min=20.0, beta_max=0.1), "beta_max"),
    (lambda: VPLinear(beta_max=float("nan")), "beta_max"),
    (lambda: VPCosine(s=-0.5), "s"),
    (lambda: VPCosine(s=float("inf")), "s"),
    (lambda: VPDiscrete(torch.tensor([0.9, float("nan"), 0.5])), r"alphas_cumprod\[1\]"),
    (lambda: VPDiscrete(torch.tensor([0.9, 0.5, 0.5])), r"alphas_cumprod\[2\]"),
])
def test_bad_schedule_parameters_are_refused_by_name(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_schedule_parameters_must_be_numbers():
    with pytest.raises(TypeError, match="sigma_min"):
        VE(sigma_min="0.01")
    with pytest.raises(TypeError, match="beta_max"):
        VPLinear(beta_max=None)
    # valid edge cases still construct: beta_min = 0, s = 0, a 0-d tensor parameter
    VPLinear(beta_min=0.0, beta_max=1.0), VPCosine(s=0.0), VE(sigma_max=torch.tensor(10.0, dtype=torch.float64))
