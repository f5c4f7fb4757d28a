"""Solvers of the reverse-time diffusion SDE (Song et al. 2021): Euler--Maruyama and SDE-DPM-Solver++."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..plan import At
from .base import Solver, State, axpy, lin
from .exponential import (
    SOLVER_TYPES,
    ExponentialIntegrator,
    Steps,
    check_choice,
    check_flag,
    check_order,
    multistep_orders,
    phis,
    ratios,
)

__all__ = ["EulerMaruyama", "SDEDPMSolverPP"]


class EulerMaruyamaRow(NamedTuple):
    s: At  # model evaluation at t_i
    a: float  # 1 + f(t_i) dt
    b: float  # g^2(t_i)/sigma(t_i) dt
    g: float  # g(t_i)


@dataclass(frozen=True)
class EulerMaruyama(Solver):
    """Euler--Maruyama for the reverse SDE ``dx = [f x - g^2 grad log p_t] dt + g dW``, ``t`` decreasing:

    ``x_{i+1} = x_i + (f x_i + g^2/sigma eps_hat) dt + g(t_i) (W(t_{i+1}) - W(t_i))`` with ``dt < 0``.

    The noise is additive (``g`` depends on ``t`` only), so EM converges pathwise with strong order 1
    on a fixed Brownian path (Kloeden & Platen 1992, §10.2). Increments come from
    :class:`~adjointflow.noise.BrownianNoise`, so a run can be replayed exactly.
    """

    stochastic = True

    def rows(self, plan):
        sch, t = plan.schedule, plan.grid[:-1]
        f, g2 = sch.f(t), sch.g2(t)
        bad = ~(torch.isfinite(f) & torch.isfinite(g2))
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise ValueError(
                f"EulerMaruyama: the reverse SDE is singular at t={plan.times[j]:.6g} (f={float(f[j])}, "
                f"g^2={float(g2[j])}; e.g. alpha = 0 at t = 1 of LinearFlow); start the grid below it "
                "(t_start=0.999) or use SDEDPMSolverPP")
        f, g2, dt = f.numpy(), g2.numpy(), (plan.grid[1:] - t).numpy()
        cols = (1.0 + f * dt, g2 / plan.start.sigma * dt, np.sqrt(g2))
        return [EulerMaruyamaRow(plan.at(i), *r) for i, r in enumerate(zip(*(c.tolist() for c in cols)))]

    def step(self, model, state, c, noise=None):
        """``x_{i+1} = (1 + f dt) x_i + (g^2/sigma dt) eps_hat + g dW``: the update above, regrouped."""
        if noise is None:
            raise ValueError("EulerMaruyama.step needs the Brownian increment")
        x = state.x
        eps = model(x, c.s).eps
        return State(axpy(lin(c.a, x, c.b, eps), c.g, noise))

    def adjoint_step(self, model, adj, grid, i):
        """Euler on the SDE adjoint ``da/dt = -(dF/dx)^T a`` with ``F = 2u - f x`` (the reverse drift;
        additive noise adds no Jacobian term, so the adjoint is an ODE along the recorded forward path;
        Blasingame & Liu 2024, Thm 3.1). Order 1, see :func:`~adjointflow.solvers.euler.euler_adjoint_step`."""
        from .euler import euler_adjoint_step

        return euler_adjoint_step(model, adj, grid, i)


@dataclass(frozen=True)
class SDEDPMSolverPP(ExponentialIntegrator):
    """SDE-DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095, Sec. 5) for the reverse diffusion SDE.

    In ``lambda = log(alpha/sigma)`` (``h = lambda_t - lambda_s > 0``) the reverse SDE
    ``dx = [f x - g^2 grad log p_t] dt + g dW`` has the exact variation-of-constants form

        x_t = (sigma_t/sigma_s) e^{-h} x_s + 2 alpha_t int_0^h e^{-2(h-u)} x0_hat(lambda_s + u) du + noise,

    whose noise term is Gaussian with covariance ``sigma_t^2 (1 - e^{-2h}) I``. Steps:

    * order 1: ``x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) m_0 + sigma_t sqrt(1 - e^{-2h}) z``
    * order 2 (multistep, history ``m_1`` = previous ``x0_hat``; ``D1 = (m_0 - m_1)/r_0``, ``r_0 = h_0/h``):
      ``+ 1/2 alpha_t (1 - e^{-2h}) D1`` (``solver_type="midpoint"``, diffusers' form) or
      ``+ alpha_t 2h phi_2(-2h) D1`` (``"heun"``, the exact integral of the linear interpolant).

    **Noise.** ``z`` is built from the Brownian path of ``noise`` (a
    :class:`~adjointflow.noise.BrownianNoise` in ``t``): ``z = (W(t_next) - W(t)) / sqrt(|t_next - t|)``.
    The exact term is the exponentially weighted integral ``int Phi(t, tau) g(tau) dW(tau)``; we replace
    it by the plain increment scaled to unit variance (k-diffusion's Brownian-tree sampler does the
    same in ``sigma/alpha``). Why: ``z`` is exactly ``N(0, I)`` and independent across steps, so every
    step has the exact noise law (weak behaviour as with i.i.d. draws); and because its increments
    come from one Brownian path, refining the grid converges *pathwise* to the SDE solution driven by
    that path (the same one :class:`EulerMaruyama` converges to), and a run is replayable by
    re-querying the same ``noise``. The weighting mismatch is ``O(dt^{3/2})`` per step, so the
    pathwise (strong) order is 1 for both orders (``order`` is that of the drift's ``x0_hat``
    interpolation). NFE 1 per step. Warm-up and ``lower_order_final`` as in
    :class:`~adjointflow.solvers.DPMSolverPP`; the last step to ``sigma = 0`` gives ``x = alpha_t x0_hat``.
    """

    order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True

    stochastic = True
    prediction = "x0"

    def __post_init__(self):
        check_order("SDEDPMSolverPP", self.order, (1, 2))
        check_choice("SDEDPMSolverPP", "solver_type", self.solver_type, SOLVER_TYPES)
        check_flag("SDEDPMSolverPP", "lower_order_final", self.lower_order_final)

    def rows(self, plan):
        st = Steps(plan.start, plan.end)
        if not (st.h > 0).all():
            raise ValueError("SDEDPMSolverPP integrates the reverse-time SDE and needs a decreasing grid")
        h, a_t = st.h, st.alpha_t
        one_m_e2h = -np.expm1(-2.0 * h)
        # (sigma_t/sigma_s) e^{-h} and 1 - e^{-2h}: both finite at h = +inf (alpha_s = 0 or sigma_t = 0)
        decay = np.exp(st.log_sigma_t - st.log_sigma_s - h)
        w1 = 0.5 * a_t * one_m_e2h if self.solver_type == "midpoint" else a_t * 2.0 * h * phis(2, -2.0 * h)
        noise = st.sigma_t * np.sqrt(one_m_e2h) / np.sqrt(np.abs(np.diff(plan.grid.numpy())))
        r0 = ratios(st, plan.nodes.lam, 1)
        ks = [k for k, _ in multistep_orders(self, plan)]
        cols = zip(decay.tolist(), (a_t * one_m_e2h).tolist(), r0, w1.tolist(), noise.tolist())
        return [SDEDPMRow(plan.at(i), ks[i], *r) for i, r in enumerate(cols)]

    def step(self, model, state, c, noise=None):
        if noise is None:
            raise ValueError("SDEDPMSolverPP.step needs the Brownian increment")
        x = state.x
        m0 = model(x, c.s).x0
        x_next = lin(c.decay, x, c.b, m0)
        if c.k == 2:
            d1 = (m0 - state.history[0]) / c.r0
            x_next = axpy(x_next, c.w1, d1)
        x_next = axpy(x_next, c.noise, noise)
        return State(x_next, (m0, *state.history)[: self.order - 1])


class SDEDPMRow(NamedTuple):
    s: At  # model evaluation at t_s
    k: int  # 1 or 2 (warm-up, lower_order_final, singular ends)
    decay: float  # (sigma_t/sigma_s) e^{-h}
    b: float  # alpha_t (1 - e^{-2h})
    r0: float  # h_{i-1} / h
    w1: float  # weight of D1: 1/2 alpha_t (1 - e^{-2h}) (midpoint) or alpha_t 2h phi_2(-2h) (heun)
    noise: float  # sigma_t sqrt(1 - e^{-2h}) / sqrt(|t - s|): z = dW / sqrt(|t - s|) scaled
