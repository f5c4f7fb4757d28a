"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", arXiv:2302.04867): multistep predictor UniP-p and corrector UniC-p in the data form, one NFE per step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..plan import At
from .base import State, axpy
from .exponential import (
    ExponentialIntegrator,
    FirstOrder,
    Steps,
    check_choice,
    check_flag,
    check_order,
    first_order,
    first_order_coefficients,
    moment_weights,
    multistep_orders,
    phis,
)

__all__ = ["UniPC", "VARIANTS", "singular_start_correction"]

#: ``B(h)`` of the paper's two variants: ``"bh1"``: ``B(h) = -h``; ``"bh2"``: ``B(h) = e^{-h} - 1``.
VARIANTS = ("bh1", "bh2")

_NAN = math.nan


class UniPCRow(NamedTuple):
    s: At  # model evaluation at t_s, at the predicted (uncorrected) sample
    k: int  # order p of UniP on this step
    first: FirstOrder  # (sigma_t/sigma_s) x + alpha_t (1 - e^{-h}) m_0, or its limit at a singular end
    w: tuple  # UniP: weight of D_m = m_m - m_0, m = 1..p-1: -alpha_t B(h) a_m / r_m
    kc: int  # order of UniC applied at the start of this step to the previous step (0: no corrector)
    c_t: float  # UniC: weight of D_t = m_0 - m_1 (the new evaluation minus the previous step's m_0)
    c: tuple  # UniC: weights of m_{1+m} - m_1, m = 1..kc-1 (the previous step's D_m)


def _g(hh, variant: str, p: int):
    """``B(h)`` and the right-hand sides ``g_k / B(h) = k! hh phi_{k+1}(hh) / B(h)``, ``k = 1..p``, with
    ``hh = -h`` (data form); float64, vectorised over steps (all ``h`` finite)."""
    b = hh if variant == "bh1" else np.expm1(hh)
    g = np.stack([math.factorial(k) * hh * phis(k + 1, hh) / b for k in range(1, p + 1)], -1)
    return b, g


def _solve(nodes, g):
    """``a`` with ``R a = g/B(h)`` over ``nodes`` (one row per step); a single node takes the paper's ``a = 1/2``."""
    if nodes.shape[1] == 1:
        return np.full_like(nodes, 0.5)
    return moment_weights(nodes, g)


def singular_start_correction(st: Steps):
    """UniC's ``(kc, c_t, c)`` for step 0 when it leaves a singular start (``alpha_s = 0``, ``lambda_s = -inf``:
    a flow from ``t = 1``), else ``None``: UniC-1 in the limit ``h -> inf`` with ``B(h) = e^{-h} - 1 -> -1`` and
    ``a = 1/2`` is finite, ``x^c = x~ + alpha_t (m_t - m_s)/2``, the trapezoid rule in ``alpha`` for the exact
    integral, where ``x0_hat`` is affine in ``alpha`` to first order. bh1's ``B(h) = -h`` has no finite limit
    (and borrowing this one measured worse for UniPC-2 bh1), so bh1 keeps its first step uncorrected."""
    finite = st.finite
    if len(finite) > 1 and not finite[0] and finite[1] and st.alpha_s[0] == 0:
        return 1, 0.5 * float(st.alpha_t[0]), ()
    return None


@dataclass(frozen=True)
class UniPC(ExponentialIntegrator):
    """UniPC-p (Zhao et al. 2023, arXiv:2302.04867) in the data form with ``B(h)`` ("bh1"/"bh2"),
    ``h = lambda_t - lambda_s``, ``m_j = x0_hat`` at the ``j``-th newest grid point (``m_0`` at ``t_s``) and
    ``r_m = (lambda_{s_m} - lambda_s)/h < 0`` the earlier nodes in units of this step:

        UniP-p:  x~_t  = (sigma_t/sigma_s) x_s  + alpha_t (1 - e^{-h}) m_0 - alpha_t B(h) sum_{m<p} a_m D_m / r_m
        UniC-p:  x_t^c = (sigma_t/sigma_s) x_s^c + alpha_t (1 - e^{-h}) m_0
                         - alpha_t B(h) (sum_{m<p} a^c_m D_m / r_m + a^c_p D_t)

    with ``D_m = m_m - m_0``, ``D_t = x0_hat(x~_t, t) - m_0``, ``B(h) = -h`` (``variant="bh1"``) or
    ``e^{-h} - 1`` (``"bh2"``), and ``a``, ``a^c`` solving the order conditions ``R_p a = g_p / B(h)``:
    ``(R_p)_{km} = r_m^{k-1}`` over the nodes ``r_1..r_{p-1}`` (UniP; ``k < p``) or ``r_1..r_{p-1}, r_p = 1``
    (UniC; ``k <= p``), ``g_k = k! (-h) phi_{k+1}(-h)``; UniP-2 and UniC-1 take ``a = 1/2`` as the paper
    does. UniC reuses the evaluation at ``x~_t`` that the next step makes anyway (the network sees the
    predicted, uncorrected sample), so UniPC costs one NFE per step; the last step is not corrected. Being
    linear in the ``m``'s, the correction is ``x^c = x~ + c_t D_t + sum_m c_m D_m`` with weights planned once.

    Order: UniC-p raises UniP-p's order by one, so the global order is ``p + 1`` for ``p = 1, 2``; for
    ``p = 3`` the first-order warm-up step caps it at 3 (measured in the order suite). ``corrector=False``
    is UniP-p alone (order ``p``; ``p = 2`` with bh2 is DPM-Solver++(2M)). ``lower_order_final``: ``True``
    is diffusers' rule for this scheduler (step ``i`` of ``n`` has order ``<= n - i``), ``False`` never lowers,
    ``None`` (default) lowers the order only where the step is long in ``lambda`` compared with the history
    (see :func:`~adjointflow.solvers.exponential.multistep_orders`). Steps to or from a singular end are
    first order; with bh2, UniC corrects a step from a singular start (``alpha_s = 0``: a flow from
    ``t = 1``) in its limit ``h -> inf`` (:func:`singular_start_correction`): the trapezoid rule in ``alpha``,
    in which ``x0_hat`` is affine to first order near pure noise, so the step becomes second order in
    ``alpha_t`` (measured: 10-20 % lower error at N = 5..10 on the digits flow, ``benchmarks/results/solvers.md``). Continuous adjoint: AdjointDEIS of order ``min(2, global order)``.
    """

    order: int = 3
    variant: str = "bh2"
    corrector: bool = True
    lower_order_final: bool | None = None

    prediction = "x0"
    warmup = "multistep"
    #: diffusers' UniPC lowers the last steps' order on every grid (DPM-Solver/DEIS: below 15 steps)
    lower_order_final_below = math.inf

    def __post_init__(self):
        check_order("UniPC", self.order, (1, 2, 3))
        check_choice("UniPC", "variant", self.variant, VARIANTS)
        check_flag("UniPC", "corrector", self.corrector)
        check_flag("UniPC", "lower_order_final", self.lower_order_final, optional=True)

    @property
    def history_size(self) -> int:
        """Previous predictions the state carries: UniC-p of the previous step needs ``p`` of them."""
        return self.order if self.corrector else self.order - 1

    def rows(self, plan):
        st = Steps(plan.start, plan.end)
        n = plan.n
        ks = [k for k, _ in multistep_orders(self, plan)]
        firsts = first_order_coefficients(st, "x0")
        finite = st.finite.tolist()
        lam, h = plan.nodes.lam[: n + 1], st.h
        # r[i, m-1] = (lambda_{i-m} - lambda_i)/h_i, m = 1..order-1 (NaN before the grid's start)
        r = np.full((n, max(self.order - 1, 1)), _NAN)
        for m in range(1, self.order):
            if n > m:
                r[m:, m - 1] = (lam[: n - m] - lam[m:n]) / h[m:]
        w = [()] * n
        corr = [(0, _NAN, ())] * (n + 1)  # corr[j]: UniC applied at the start of step j to step j - 1
        for p in range(1, self.order + 1):
            idx = [i for i in range(n) if ks[i] == p and finite[i]]
            if not idx:
                continue
            b, g = _g(-h[idx], self.variant, p)
            scale = -st.alpha_t[idx] * b  # -alpha_t B(h)
            nodes = r[idx, : p - 1]
            a = _solve(nodes, g[:, : p - 1])
            wp = scale[:, None] * a / nodes
            for j, i in enumerate(idx):
                w[i] = tuple(wp[j].tolist())
            if not self.corrector:
                continue
            ac = _solve(np.concatenate([nodes, np.ones((len(idx), 1))], 1), g)
            c_t = (scale * ac[:, -1]).tolist()
            cm = scale[:, None] * (ac[:, :-1] - a) / nodes
            for j, i in enumerate(idx):
                corr[i + 1] = (p, c_t[j], tuple(cm[j].tolist()))
        if self.corrector and self.variant == "bh2":
            corr[1] = singular_start_correction(st) or corr[1]
        rows = []
        for i in range(n):
            kc, c_t, c = corr[i]
            have = plan.history.get(i, min(i, self.history_size))
            if kc > have:  # step_at with a shorter history than a solve would carry: no correction
                kc, c_t, c = 0, _NAN, ()
            rows.append(UniPCRow(plan.at(i), ks[i], firsts[i], w[i], kc, c_t, c))
        return rows

    def step(self, model, state, c, noise=None):
        x, hist = state.x, state.history
        pred = model(x, c.s)
        m0 = pred.x0
        if c.kc:
            m1 = hist[0]
            x = axpy(x, c.c_t, m0 - m1)
            for cm, mm in zip(c.c, hist[1:]):
                x = axpy(x, cm, mm - m1)
        x_next = first_order(x, pred, c.first)
        for wm, mm in zip(c.w, hist):
            x_next = axpy(x_next, wm, mm - m0)
        return State(x_next, (m0, *hist)[: self.history_size])

    def adjoint_step(self, model, adj, grid, i):
        """AdjointDEIS of order ``min(2, global order)`` (``ContinuousAdjoint(order=...)`` overrides it)."""
        from ..adjoint.adjoint_deis import adjoint_deis_step

        order = model.order if model.order is not None else (1 if self.order == 1 and not self.corrector else 2)
        return adjoint_deis_step(model, adj, grid, i, form=model.form, order=order)
