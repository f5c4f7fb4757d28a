"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): data-prediction exponential integrators.

Multistep 2M/3M (one NFE per step, history of previous ``x0_hat`` in the state) and singlestep
2S/3S (``order`` NFE per step, intermediate points uniform in ``lambda``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import State
from .exponential import (
    SOLVER_TYPES,
    WARMUPS,
    ExponentialIntegrator,
    Interval,
    check_choice,
    check_flag,
    check_order,
    first_order_update,
    lam_at,
    needed,
    phi,
    singlestep2_update,
    stage,
)

__all__ = ["DPMSolverPP"]


@dataclass(frozen=True)
class DPMSolverPP(ExponentialIntegrator):
    """DPM-Solver++ in the data form, ``h = lambda_t - lambda_s``, ``m_j = x0_hat`` at earlier grid
    points (newest first), ``r_j = h_j / h`` the ratios of the previous steps to this one:

        x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) m_0 + (higher-order terms)

    * order 1: DDIM / DPM-Solver++(1) (no higher-order terms).
    * ``multistep=True`` (paper Alg. 2), order 2 ("2M"): ``D1 = (m_0 - m_1)/r_0`` and
      ``+ 1/2 alpha_t (1 - e^{-h}) D1`` (``solver_type="midpoint"``, the paper's and diffusers' form) or
      ``+ alpha_t h phi_2(-h) D1`` (``"heun"``: exact integral of the linear interpolant).
    * ``multistep=True``, order 3 ("3M"): exact integral of the quadratic interpolant in ``lambda``,
      ``D1_0 = (m_0 - m_1)/r_0``, ``D1_1 = (m_1 - m_2)/r_1``, ``D2 = (D1_0 - D1_1)/(r_0 + r_1)``,
      ``D1 = D1_0 + r_0 D2``: ``+ alpha_t h phi_2(-h) D1 + 2 alpha_t h phi_3(-h) D2``. The factor 2 is
      the exact moment ``int_0^h e^{-(h-u)} u^2 du = 2 h^3 phi_3(-h)``; diffusers/k-diffusion drop it
      (their 3M is only second order).
    * ``multistep=False`` ("2S", paper Alg. 1): one intermediate point at ``lambda_s + h/2``,
      ``u = DDIM(x_s -> s_1)``, ``+ (1/(2 r_1)) alpha_t (1 - e^{-h}) (x0_hat(u) - m_0)`` (midpoint) or
      ``+ (1/r_1) alpha_t h phi_2(-h) (x0_hat(u) - m_0)`` (heun).
    * ``multistep=False``, order 3 ("3S", DPM-Solver-3 of Lu et al. 2022 in data form): points at
      ``r_1 = 1/3``, ``r_2 = 2/3``; midpoint uses only ``x0_hat(u_2)`` (``+ (1/r_2) alpha_t h phi_2(-h) (m_2 - m_0)``),
      heun integrates the quadratic through all three (``'taylor'`` in the official code).

    Here ``phi_k`` are the phi functions of :func:`~adjointflow.solvers.exponential.phi`. Warm-up: a
    multistep step uses order ``1 + len(state.history)``, so 2M with an empty history takes exactly
    the first-order step. For 3M, ``warmup="singlestep"`` (default) makes the empty-history step the
    2S step instead (one extra NFE), because a first-order first step caps the global order at 2 on
    fine grids; ``warmup="multistep"`` is diffusers' first-order start. ``lower_order_final`` (multistep only; diffusers' rule for coarse grids): with
    fewer than 15 steps the last step is first order and the second-to-last at most second. A step
    to ``sigma = 0`` (denoise to ``t = 0``) is always first order, ``x_t = alpha_t x0_hat``, as in
    diffusers with ``final_sigmas_type="zero"``. Global order = ``order``; NFE per step 1
    (multistep) or ``order`` (singlestep).
    """

    order: int = 2
    multistep: bool = True
    lower_order_final: bool = True
    solver_type: str = "midpoint"
    warmup: str = "singlestep"

    prediction = "x0"

    def __post_init__(self):
        check_order("DPMSolverPP", self.order, (1, 2, 3))
        check_flag("DPMSolverPP", "multistep", self.multistep)
        check_flag("DPMSolverPP", "lower_order_final", self.lower_order_final)
        check_choice("DPMSolverPP", "solver_type", self.solver_type, SOLVER_TYPES)
        check_choice("DPMSolverPP", "warmup", self.warmup, WARMUPS)

    @property
    def nfe_per_step(self) -> int:
        return 1 if self.multistep else self.order

    def step(self, model, state, grid, i, noise=None):
        if self.multistep:
            return self._multistep(model, state, grid, i)
        return self._singlestep(model, state, grid, i)

    # ------------------------------------------------------------------------------------------
    def _multistep(self, model, state, grid, i):
        sch, x = model.schedule, state.x
        iv = Interval.of(sch, grid[i], grid[i + 1])
        pred = model(x, grid[i])
        m0 = needed(pred, "x0", iv.t_s) if iv.alpha_s == 0.0 else pred.x0
        k, starter = self._multistep_plan(state, grid, i, sch, iv)
        if starter:
            x_next = singlestep2_update(model, x, pred, iv, "x0", self.solver_type)
        elif k == 1:
            x_next = first_order_update(x, pred, iv, "x0")
        else:
            h, a_t = iv.h, iv.alpha_t
            lam_1 = lam_at(sch, grid[i - 1])
            r0 = (iv.lam_s - lam_1) / h
            m1 = state.history[0]
            d1_0 = (m0 - m1) / r0
            x_next = iv.sigma_ratio * x + iv.data_coefficient() * m0
            if k == 2:
                if self.solver_type == "midpoint":
                    x_next = x_next + (0.5 * iv.data_coefficient()) * d1_0
                else:
                    x_next = x_next + (a_t * h * phi(2, -h)) * d1_0
            else:
                r1 = (lam_1 - lam_at(sch, grid[i - 2])) / h
                d1_1 = (m1 - state.history[1]) / r1
                d2 = (d1_0 - d1_1) / (r0 + r1)
                d1 = d1_0 + r0 * d2
                x_next = x_next + (a_t * h * phi(2, -h)) * d1 + (2.0 * a_t * h * phi(3, -h)) * d2
        return State(x_next, (m0, *state.history)[: self.order - 1])

    # ------------------------------------------------------------------------------------------
    def _singlestep(self, model, state, grid, i):
        sch, x = model.schedule, state.x
        iv = Interval.of(sch, grid[i], grid[i + 1])
        pred = model(x, grid[i])
        m0 = needed(pred, "x0", iv.t_s) if iv.alpha_s == 0.0 else pred.x0
        k = self.order if iv.finite else 1
        if k == 1:
            return State(first_order_update(x, pred, iv, "x0"))
        if k == 2:
            return State(singlestep2_update(model, x, pred, iv, "x0", self.solver_type))
        h, a_t = iv.h, iv.alpha_t
        base = iv.sigma_ratio * x + iv.data_coefficient() * m0
        t1, iv1, r1 = stage(sch, iv, 1.0 / 3.0)
        t2, iv2, r2 = stage(sch, iv, 2.0 / 3.0)
        m1 = model(first_order_update(x, pred, iv1, "x0"), t1).x0
        h2 = iv2.h
        u2 = first_order_update(x, pred, iv2, "x0") + (r2 / r1 * iv2.alpha_t * h2 * phi(2, -h2)) * (m1 - m0)
        m2 = model(u2, t2).x0
        if self.solver_type == "midpoint":
            return State(base + (a_t * h * phi(2, -h) / r2) * (m2 - m0))
        d1_0, d1_1 = (m1 - m0) / r1, (m2 - m0) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return State(base + (a_t * h * phi(2, -h)) * d1 + (a_t * h * phi(3, -h)) * d2)
