"""An exact full-covariance Gaussian prior for the guidance tests (``GaussianData`` is diagonal), and
checks that it is exact: it equals ``GaussianData`` on diagonal covariances and its PF-ODE map is the
limit of fine solves.

Data ``x_0 ~ N(m, S)``, ``S = U diag(lam) U^T`` (``lam >= 0``: rank-deficient priors allowed):

    E[x_0 | x_t] = m + U diag(alpha lam / (alpha^2 lam + sigma^2)) U^T (x_t - alpha m)
    Cov[x_0 | x_t] = U diag(lam sigma^2 / (alpha^2 lam + sigma^2)) U^T
    PF-ODE map t -> t':  x' = alpha' m + U diag(sqrt(alpha'^2 lam + sigma'^2) / sqrt(alpha^2 lam + sigma^2)) U^T (x - alpha m)
"""
from __future__ import annotations

import torch
from torch import nn

import adjointflow as af
from adjointflow.models import Coefficients, convert
from adjointflow.testing import GaussianData


class VJPCount(torch.autograd.Function):
    """Identity whose backward counts the passes (independent of the library's own counter)."""

    @staticmethod
    def forward(x, box):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.box = inputs[1]

    @staticmethod
    def backward(ctx, g):
        ctx.box["vjps"] += 1
        return g, None


class FullGaussian:
    """Exact prior ``N(mean, cov)`` on vectors ``(batch, d)``, float64."""

    def __init__(self, mean, cov):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.cov = torch.as_tensor(cov, dtype=torch.float64)
        lam, U = torch.linalg.eigh(self.cov)
        self.lam, self.U = lam.clamp_min(0.0), U
        self.box = {"vjps": 0, "calls": 0, "graph_calls": 0}

    @property
    def d(self):
        return self.mean.numel()

    def _ab(self, schedule, t, x):
        t = af.schedules.as_time(t)
        t = t.reshape(-1, 1) if t.ndim else t
        return schedule.alpha(t).to(x.dtype), schedule.sigma(t).to(x.dtype)

    def posterior_mean_x0(self, schedule, x, t):
        a, s = self._ab(schedule, t, x)
        gain = a * self.lam / (a * a * self.lam + s * s)
        return self.mean + ((x - a * self.mean) @ self.U * gain) @ self.U.T

    def posterior_cov_x0(self, schedule, t):
        a, s = self._ab(schedule, t, self.mean)
        return (self.U * (self.lam * s * s / (a * a * self.lam + s * s))) @ self.U.T

    def flow_map(self, schedule, x, t, t_next):
        a0, s0 = self._ab(schedule, t, x)
        a1, s1 = self._ab(schedule, t_next, x)
        r = torch.sqrt(a1 * a1 * self.lam + s1 * s1) / torch.sqrt(a0 * a0 * self.lam + s0 * s0)
        return a1 * self.mean + ((x - a0 * self.mean) @ self.U * r) @ self.U.T

    def denoiser(self, schedule, prediction="velocity"):
        prior = self

        class Net(nn.Module):
            def forward(self, x, t, cond=None):
                prior.box["calls"] += 1
                prior.box["graph_calls"] += int(torch.is_grad_enabled() and x.requires_grad)
                x0 = prior.posterior_mean_x0(schedule, x, t)
                if cond is not None:
                    x0 = x0 + cond
                tt = t.reshape(-1, 1)
                out = convert(x0, "x0", prediction, x, Coefficients.at(schedule, tt, x))
                return VJPCount.apply(out, prior.box) if out.requires_grad else out

        return af.Denoiser(Net(), schedule, prediction)


def random_cov(d, rank, gen, scale=(0.5, 2.0)):
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = torch.zeros(d, dtype=torch.float64)
    lam[:rank] = torch.linspace(*scale, rank, dtype=torch.float64)
    return (U * lam) @ U.T, U[:, :rank]


# --------------------------------------------------------------------------------------------
def test_matches_gaussian_data_on_diagonal_covariance():
    sch = af.VPLinear()
    m, s = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    full = FullGaussian(m, torch.diag(s**2))
    ref = GaussianData(m, s)
    x = torch.randn(5, 3, dtype=torch.float64)
    for t in (0.9, 0.3, 0.01):
        torch.testing.assert_close(full.posterior_mean_x0(sch, x, t), ref.posterior_mean_x0(sch, x, t).detach())
        torch.testing.assert_close(full.flow_map(sch, x, t, t / 3), ref.flow_map(sch, x, t, t / 3).detach())


def test_flow_map_is_limit_of_fine_heun_solve():
    g = torch.Generator().manual_seed(0)
    cov, _ = random_cov(4, 4, g)
    full = FullGaussian(torch.randn(4, generator=g, dtype=torch.float64), cov)
    sch = af.LinearFlow()
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    grid = af.timesteps(sch, 400, t_end=0.0)
    out = af.solve(full.denoiser(sch), x, grid, af.Heun()).x
    torch.testing.assert_close(out, full.flow_map(sch, x, 1.0, 0.0), rtol=0, atol=1e-5)
