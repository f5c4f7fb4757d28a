"""Silent-wrong-answer and unclear-error cases of the core (issue "trust", items 7, 8, 9 and 12)."""
import math

import pytest
import torch

import adjointflow as af
from adjointflow import NonFiniteError, VPCosine, VPLinear, solve, timesteps
from adjointflow.adjoint import ContinuousAdjoint
from adjointflow.testing import GaussianData, empirical_order

F64 = torch.float64


def data():
    return GaussianData(torch.linspace(-1.0, 1.5, 4, dtype=F64), torch.logspace(-0.5, 0.2, 4, dtype=F64))


# --- item 7: noise without a shape, grid that requires grad ---------------------------------------
def test_noise_without_shape_is_refused():
    den = data().denoiser(VPLinear(), "eps")
    x = torch.randn(3, 4, dtype=F64)

    def shared(t, t_next):  # one draw for the whole batch
        return torch.randn(4, dtype=F64) * math.sqrt(abs(t_next - t))

    with pytest.raises(TypeError, match="shape"):
        solve(den, x, timesteps(VPLinear(), 5), af.EulerMaruyama(), noise=shared)


def test_noise_returning_another_shape_is_refused():
    class Wrong:
        shape, dtype, device = (3, 4), F64, torch.device("cpu")

        def __call__(self, t, t_next):
            return torch.zeros(1, 4, dtype=F64)

    den = data().denoiser(VPLinear(), "eps")
    with pytest.raises(ValueError, match="returned shape"):
        solve(den, torch.randn(3, 4, dtype=F64), timesteps(VPLinear(), 5), af.EulerMaruyama(), noise=Wrong())


def test_grid_requiring_grad_is_refused_not_detached():
    den = data().denoiser(VPLinear(), "eps")
    grid = timesteps(VPLinear(), 5).requires_grad_(True)
    with pytest.raises(ValueError, match="requires grad"):
        solve(den, torch.randn(3, 4, dtype=F64), grid, af.Euler())


# --- item 8: VPCosine's derivatives at t = 1; non-finite schedule values ---------------------------
def test_vpcosine_time_derivatives_are_finite_limits_at_t1():
    sch = VPCosine()
    one = torch.tensor(1.0, dtype=F64)
    c0 = math.cos(0.5 * math.pi * sch.s / (1 + sch.s))
    assert float(sch.dalpha_dt(one)) == pytest.approx(-0.5 * math.pi / (1 + sch.s) / c0, rel=1e-14)
    assert float(sch.dsigma_dt(one)) == 0.0 and float(sch.dlog_sigma_dt(one)) == 0.0
    # one-sided differences at t = 1 agree with the limits
    h = 1e-6
    t = torch.tensor([1.0 - h, 1.0], dtype=F64)
    for f, df in ((sch.alpha, sch.dalpha_dt), (sch.sigma, sch.dsigma_dt)):
        v = f(t)
        assert float((v[1] - v[0]) / h) == pytest.approx(float(df(one)), abs=1e-5)


@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize("solver, order", [(af.Euler(), 1), (af.Heun(), 2)], ids=["euler", "heun"])
def test_euler_heun_from_t1_on_vpcosine(solver, order, prediction):
    """Was: NaN d alpha/dt at t = 1 made the velocity NaN and a NonFiniteError blamed the model."""
    sch, d = VPCosine(), data()
    den = d.denoiser(sch, prediction)
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    ns, errs = [40, 80, 160], []
    for n in ns:
        g = timesteps(sch, n, "uniform", t_start=1.0, t_end=0.05)
        with torch.no_grad():
            out = solve(den, x, g, solver).x
            errs.append(float((out - d.flow_map(sch, x, 1.0, 0.05)).abs().max()))
        assert torch.isfinite(out).all()
    assert empirical_order(ns, errs) >= order - 0.2, errs


class BrokenSchedule(VPLinear):
    """A schedule whose d alpha/dt is NaN below t = 0.5 (e.g. a user formula with 0/0)."""

    def dalpha_dt(self, t):
        t = torch.as_tensor(t, dtype=F64)
        return torch.where(t < 0.5, torch.full_like(t, math.nan), super().dalpha_dt(t))


def test_non_finite_schedule_value_is_blamed_on_the_schedule():
    sch = BrokenSchedule()
    den = data().denoiser(VPLinear(), "eps")
    den = af.Denoiser(den.net, sch, "eps")
    with pytest.raises(ValueError, match=r"BrokenSchedule\.dalpha_dt\(t=0\.4.*schedule itself") as e:
        solve(den, torch.randn(3, 4, dtype=F64), timesteps(sch, 10, "uniform", t_start=1.0, t_end=0.05), af.Euler())
    assert not isinstance(e.value, NonFiniteError)


# --- item 12: a second backward through ContinuousAdjoint ------------------------------------------
def test_second_backward_through_continuous_adjoint_is_autograds_error():
    d = data()
    den = d.denoiser(VPLinear(), "eps")
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    out = solve(den, x, timesteps(VPLinear(), 8), af.DPMSolverPP(), gradient=ContinuousAdjoint()).x.sum()
    out.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.backward()


def test_retain_graph_allows_a_second_continuous_adjoint_backward():
    d = data()
    den = d.denoiser(VPLinear(), "eps")
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    out = solve(den, x, timesteps(VPLinear(), 8), af.DPMSolverPP(), gradient=ContinuousAdjoint()).x.sum()
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x)
    assert torch.equal(g1, g2)


def test_ddim_is_k_diffusion_sample_euler_and_euler_is_not_on_edm():
    """#12 item 9: the docstrings say DDIM (Euler in sigma/alpha) is k-diffusion's ``sample_euler``
    (Karras et al. 2022, Alg. 2 without churn: ``x += (sigma_next - sigma) (x - D(x, sigma)) / sigma``) and our
    Euler (a step in t) is not, on EDM where sigma(t) is not linear in t. Checked against that loop, written here."""
    torch.manual_seed(0)
    sch = af.EDM()

    class X0Net(torch.nn.Module):  # a smooth nonlinear denoiser D(x, sigma)
        def forward(self, x, t):
            s = sch.sigma(t.double()).to(x.dtype)[:, None]
            return torch.tanh(x) / (1 + s**2) + 0.1 * s * x.sin()

    net = X0Net()
    den = af.Denoiser(net, sch, "x0")
    grid = torch.linspace(1.0, 0.05, 9, dtype=torch.float64)
    x = 5.0 * torch.randn(3, 4, dtype=torch.float64)
    sig = sch.sigma(grid).tolist()
    y = x.clone()
    for i in range(len(grid) - 1):
        d = (y - net(y, grid[i].expand(3))) / sig[i]
        y = y + (sig[i + 1] - sig[i]) * d
    ddim = af.solve(den, x, grid, af.DDIM()).x
    euler = af.solve(den, x, grid, af.Euler()).x
    assert torch.allclose(ddim, y, rtol=1e-12, atol=1e-12)
    assert (euler - y).abs().max() > 1e-3 * y.abs().max()  # a step in t is another method on EDM
