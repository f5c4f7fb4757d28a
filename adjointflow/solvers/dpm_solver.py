"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): data-prediction exponential integrators.

Multistep 2M/3M (one NFE per step, history of previous ``x0_hat`` in the state) and singlestep
2S/3S (``order`` NFE per step, intermediate points uniform in ``lambda``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..plan import At
from .base import State, axpy
from .exponential import (
    SOLVER_TYPES,
    WARMUPS,
    ExponentialIntegrator,
    FirstOrder,
    Stage2,
    Steps,
    check_choice,
    check_flag,
    check_order,
    first_order,
    first_order_coefficients,
    multistep_orders,
    phis,
    ratios,
    singlestep2,
    singlestep2_stages,
    stages,
)

__all__ = ["DPMSolverPP"]

_NAN = math.nan


class MultistepRow(NamedTuple):
    s: At  # model evaluation at t_s
    k: int  # order of this step (warm-up, lower_order_final, singular ends)
    first: FirstOrder  # (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) m_0 (or its limit at a singular end)
    r0: float  # h_{i-1} / h (NaN where there is no previous step)
    r1: float | None  # h_{i-2} / h (3M only)
    w1: float  # weight of D1: k = 2: 1/2 alpha_t (1 - e^{-h}) (midpoint) or alpha_t h phi_2(-h) (heun); k = 3: the latter
    w2: float | None  # weight of D2 (3M only): 2 alpha_t h phi_3(-h)
    starter: Stage2 | None  # the 2S step replacing a first-order warm-up step (warmup="singlestep")


class SinglestepRow(NamedTuple):
    s: At
    k: int
    first: FirstOrder  # s -> t
    stage2: Stage2 | None  # 2S
    s1: At | None  # 3S: evaluation points at r_1 = 1/3, r_2 = 2/3 and the first-order steps to them
    s2: At | None
    first1: FirstOrder | None
    first2: FirstOrder | None
    r1: float
    r2: float
    c_u2: float  # weight of (m_1 - m_0) in u_2: (r_2/r_1) alpha_{s_2} h_2 phi_2(-h_2)
    c1: float  # midpoint: alpha_t h phi_2(-h) / r_2; heun: alpha_t h phi_2(-h) (weight of D1)
    c2: float  # heun: alpha_t h phi_3(-h) (weight of D2)


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
    fine grids; ``warmup="multistep"`` is diffusers' first-order start (the starter is taken only on a
    step of ``h <= 1``). ``lower_order_final`` (multistep only): ``None`` (default) lowers a step's order
    where it is long in lambda against its history or above ``h = 1`` for third order, ``True`` is
    diffusers' rule (with fewer than 15 steps the last step is first order and the second-to-last at most
    second), ``False`` never lowers (:func:`~adjointflow.solvers.exponential.multistep_orders`). A step
    to ``sigma = 0`` (denoise to ``t = 0``) is always first order, ``x_t = alpha_t x0_hat``, as in
    diffusers with ``final_sigmas_type="zero"``. Global order = ``order``; NFE per step 1
    (multistep) or ``order`` (singlestep). All coefficients are planned once per solve (``rows``).
    """

    order: int = 2
    multistep: bool = True
    lower_order_final: bool | None = None
    solver_type: str = "midpoint"
    warmup: str = "singlestep"

    prediction = "x0"

    def __post_init__(self):
        check_order("DPMSolverPP", self.order, (1, 2, 3))
        check_flag("DPMSolverPP", "multistep", self.multistep)
        check_flag("DPMSolverPP", "lower_order_final", self.lower_order_final, optional=True)
        check_choice("DPMSolverPP", "solver_type", self.solver_type, SOLVER_TYPES)
        check_choice("DPMSolverPP", "warmup", self.warmup, WARMUPS)

    @property
    def nfe_per_step(self) -> int:
        return 1 if self.multistep else self.order

    def rows(self, plan):
        return self._multistep_rows(plan) if self.multistep else self._singlestep_rows(plan)

    def step(self, model, state, c, noise=None):
        if self.multistep:
            return self._multistep(model, state, c)
        return self._singlestep(model, state, c)

    # ------------------------------------------------------------------------------------------
    def _multistep_rows(self, plan):
        st = Steps(plan.start, plan.end)
        orders = multistep_orders(self, plan)
        firsts = first_order_coefficients(st, "x0")
        h, a_t = st.h, st.alpha_t
        taylor = (a_t * h * phis(2, -h)).tolist()
        second = (0.5 * st.data_coefficient()).tolist() if self.solver_type == "midpoint" else taylor
        # D1's weight: the second-order form on a k = 2 step, the exact quadratic moment on a k = 3 step
        w1 = [second[i] if k == 2 else taylor[i] for i, (k, _) in enumerate(orders)]
        w2 = (2.0 * a_t * h * phis(3, -h)).tolist()
        lam = plan.nodes.lam
        r0, r1 = ratios(st, lam, 1), ratios(st, lam, 2)
        starters = singlestep2_stages(plan, st, "x0", self.solver_type, [i for i, (_, s) in enumerate(orders) if s])
        if self.order < 3:  # fields a 2M/1M step never reads (None, not NaN: no tensor bound for them)
            r1 = w2 = [None] * plan.n
        return [MultistepRow(plan.at(i), k, firsts[i], r0[i], r1[i], w1[i], w2[i], starters.get(i))
                for i, (k, _) in enumerate(orders)]

    def _multistep(self, model, state, c):
        x = state.x
        pred = model(x, c.s)
        m0 = pred.x0
        if c.starter is not None:
            x_next = singlestep2(model, x, pred, c.first, c.starter)
        elif c.k == 1:
            x_next = first_order(x, pred, c.first)
        else:
            m1 = state.history[0]
            d1_0 = (m0 - m1) / c.r0
            x_next = first_order(x, pred, c.first)
            if c.k == 2:
                x_next = axpy(x_next, c.w1, d1_0)
            else:
                d1_1 = (m1 - state.history[1]) / c.r1
                d2 = (d1_0 - d1_1) / (c.r0 + c.r1)
                d1 = axpy(d1_0, c.r0, d2)
                x_next = axpy(axpy(x_next, c.w1, d1), c.w2, d2)
        return State(x_next, (m0, *state.history)[: self.order - 1])

    # ------------------------------------------------------------------------------------------
    def _singlestep_rows(self, plan):
        st = Steps(plan.start, plan.end)
        finite = st.finite.tolist()
        firsts = first_order_coefficients(st, "x0")
        ks = [self.order if f else 1 for f in finite]
        two = singlestep2_stages(plan, st, "x0", self.solver_type, [i for i, k in enumerate(ks) if k == 2])
        three = [i for i, k in enumerate(ks) if k == 3]
        extra = {}
        if three:
            idx = np.asarray(three, dtype=np.int64)
            h, a_t = st.h[idx], st.alpha_t[idx]
            st1, r1, s1 = stages(plan, st, 1.0 / 3.0, three)
            st2, r2, s2 = stages(plan, st, 2.0 / 3.0, three)
            h2 = st2.h
            c_u2 = r2 / r1 * st2.alpha_t * h2 * phis(2, -h2)
            c1 = a_t * h * phis(2, -h) / r2 if self.solver_type == "midpoint" else a_t * h * phis(2, -h)
            c2 = a_t * h * phis(3, -h)
            cols = zip(s1, s2, first_order_coefficients(st1, "x0"), first_order_coefficients(st2, "x0"),
                       r1.tolist(), r2.tolist(), c_u2.tolist(), c1.tolist(), c2.tolist())
            extra = dict(zip(three, cols))
        rows = []
        for i, k in enumerate(ks):
            # 3S fields: NaN on a step that does not use them, None when the solver never does
            rest = extra.get(i, (None, None, None, None, *([_NAN if self.order == 3 else None] * 5)))
            rows.append(SinglestepRow(plan.at(i), k, firsts[i], two.get(i), *rest))
        return rows

    def _singlestep(self, model, state, c):
        x = state.x
        pred = model(x, c.s)
        if c.k == 1:
            return State(first_order(x, pred, c.first))
        if c.k == 2:
            return State(singlestep2(model, x, pred, c.first, c.stage2))
        m0 = pred.x0
        base = first_order(x, pred, c.first)
        m1 = model(first_order(x, pred, c.first1), c.s1).x0
        u2 = axpy(first_order(x, pred, c.first2), c.c_u2, m1 - m0)
        m2 = model(u2, c.s2).x0
        if self.solver_type == "midpoint":
            return State(axpy(base, c.c1, m2 - m0))
        d1_0, d1_1 = (m1 - m0) / c.r1, (m2 - m0) / c.r2
        d1 = (c.r2 * d1_0 - c.r1 * d1_1) / (c.r2 - c.r1)
        d2 = 2.0 * (d1_1 - d1_0) / (c.r2 - c.r1)
        return State(axpy(axpy(base, c.c1, d1), c.c2, d2))
