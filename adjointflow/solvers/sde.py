"""Solvers of the reverse-time diffusion SDE (Song et al. 2021): Euler--Maruyama and SDE-DPM-Solver++."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Solver, State
from .exponential import (
    SOLVER_TYPES,
    ExponentialIntegrator,
    Interval,
    check_choice,
    check_flag,
    check_order,
    lam_at,
    needed,
    phi,
)

__all__ = ["EulerMaruyama", "SDEDPMSolverPP"]


@dataclass(frozen=True)
class EulerMaruyama(Solver):
    """Euler--Maruyama for the reverse SDE ``dx = [f x - g^2 grad log p_t] dt + g dW``, ``t`` decreasing:

    ``x_{i+1} = x_i + (f x_i + g^2/sigma eps_hat) dt + g(t_i) (W(t_{i+1}) - W(t_i))`` with ``dt < 0``.

    The noise is additive (``g`` depends on ``t`` only), so EM converges pathwise with strong order 1
    on a fixed Brownian path (Kloeden & Platen 1992, §10.2). Increments come from
    :class:`~adjointflow.noise.BrownianNoise`, so a run can be replayed exactly.
    """

    stochastic = True

    def step(self, model, state, grid, i, noise=None):
        if noise is None:
            raise ValueError("EulerMaruyama.step needs a noise source (BrownianNoise)")
        t, t_next = grid[i], grid[i + 1]
        sch, x = model.schedule, state.x
        eps = model(x, t).eps
        f, g2 = sch.f(t), sch.g2(t)
        if not (torch.isfinite(f) and torch.isfinite(g2)):
            raise ValueError(
                f"EulerMaruyama: the reverse SDE is singular at t={float(t):.6g} (f={float(f)}, g^2={float(g2)}; "
                "e.g. alpha = 0 at t = 1 of LinearFlow); start the grid below it (t_start=0.999) or use SDEDPMSolverPP"
            )
        f = f.to(x.dtype)
        g2_over_sigma = (g2 / sch.sigma(t)).to(x.dtype)
        g = g2.sqrt().to(x.dtype)
        dt = (t_next - t).to(x.dtype)
        dw = noise(t, t_next).to(device=x.device, dtype=x.dtype)
        return State(x + (f * x + g2_over_sigma * eps) * dt + g * dw)

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

    def step(self, model, state, grid, i, noise=None):
        if noise is None:
            raise ValueError("SDEDPMSolverPP.step needs a noise source (BrownianNoise)")
        sch, x = model.schedule, state.x
        t, t_next = grid[i], grid[i + 1]
        iv = Interval.of(sch, t, t_next)
        if not iv.h > 0:
            raise ValueError("SDEDPMSolverPP integrates the reverse-time SDE and needs a decreasing grid")
        pred = model(x, t)
        m0 = needed(pred, "x0", iv.t_s) if iv.alpha_s == 0.0 else pred.x0
        h = iv.h
        # (sigma_t/sigma_s) e^{-h}, and 1 - e^{-2h}: both finite at h = +inf (alpha_s = 0 or sigma_t = 0)
        decay = math.exp(iv.log_sigma_t - iv.log_sigma_s - h)
        one_m_e2h = -math.expm1(-2.0 * h)
        x_next = decay * x + (iv.alpha_t * one_m_e2h) * m0
        if self._multistep_plan(state, grid, i, sch, iv)[0] == 2:
            r0 = (iv.lam_s - lam_at(sch, grid[i - 1])) / h
            d1 = (m0 - state.history[0]) / r0
            if self.solver_type == "midpoint":
                x_next = x_next + (0.5 * iv.alpha_t * one_m_e2h) * d1
            else:
                x_next = x_next + (iv.alpha_t * 2.0 * h * phi(2, -2.0 * h)) * d1
        dw = noise(t, t_next).to(device=x.device, dtype=x.dtype)
        z = dw / math.sqrt(abs(float(t_next) - float(t)))
        x_next = x_next + (iv.sigma_t * math.sqrt(one_m_e2h)) * z
        return State(x_next, (m0, *state.history)[: self.order - 1])
