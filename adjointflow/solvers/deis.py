"""DEIS (Zhang & Chen 2022, arXiv:2204.13902): exponential Adams--Bashforth on the noise prediction."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..plan import At
from .base import State, axpy, lin
from .exponential import (
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
    moment_weights,
    multistep_orders,
    phis,
    singlestep2,
    singlestep2_stages,
)

__all__ = ["DEIS", "deis_weights"]

VARIANTS = ("tAB", "rhoAB", "logrho")

# Gauss--Legendre nodes/weights on [0, 1]; 16 nodes integrate e^{-h u} times a smooth function of u
# to float64 precision for any step a sampling grid takes (|h| up to ~10).
_GL_X, _GL_V = np.polynomial.legendre.leggauss(16)
_GL_U, _GL_W = 0.5 * (_GL_X + 1.0), 0.5 * _GL_V


def _lagrange(nodes: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Lagrange basis polynomials through ``nodes`` (S, k) evaluated at ``v`` (S, Q) -> (S, k, Q)."""
    k = nodes.shape[1]
    out = []
    for j in range(k):
        b = np.ones_like(v)
        for m in range(k):
            if m != j:
                b = b * (v - nodes[:, m : m + 1]) / (nodes[:, j : j + 1] - nodes[:, m : m + 1])
        out.append(b)
    return np.stack(out, 1)


def _weights(schedule, t: np.ndarray, lam: np.ndarray, steps: np.ndarray, k: int, variant: str) -> np.ndarray:
    """Normalised AB-DEIS weights (S, k) for the steps ``steps`` (indices into the grid ``t``, ``lam``)."""
    lam_s, lam_t = lam[steps], lam[steps + 1]
    h = (lam_t - lam_s)[:, None]
    back = np.arange(1, k)
    if variant == "logrho":  # nodes u_m = (lambda_m - lambda_s)/h, moments m! phi_{m+1}(h)/phi_1(h)
        nodes = np.concatenate([np.zeros((len(steps), 1)), (lam[steps[:, None] - back] - lam_s[:, None]) / h], 1)
        moments = np.stack([math.factorial(m) * phis(m + 1, h[:, 0]) / phis(1, h[:, 0]) for m in range(k)], -1)
        return moment_weights(nodes, moments)
    if variant == "rhoAB":
        nodes = np.concatenate([np.zeros((len(steps), 1)),
                                np.expm1(lam_s[:, None] - lam[steps[:, None] - back]) / np.expm1(-h)], 1)
        return np.einsum("skq,q->sk", _lagrange(nodes, np.broadcast_to(_GL_U, (len(steps), _GL_U.size))), _GL_W)
    ts, tt = t[steps][:, None], t[steps + 1][:, None]
    nodes = np.concatenate([np.zeros((len(steps), 1)), (t[steps[:, None] - back] - ts) / (tt - ts)], 1)
    lam_q = torch.as_tensor(lam_s[:, None] + h * _GL_U, dtype=torch.float64)
    t_q = (schedule.t_from_log_snr(lam_q).numpy() - ts) / (tt - ts)
    kernel = _GL_W * np.exp(-h * _GL_U)
    return np.einsum("skq,sq->sk", _lagrange(nodes, t_q), kernel) / kernel.sum(1, keepdims=True)


def deis_weights(schedule, grid, i: int, k: int, variant: str) -> list[float]:
    """Normalised AB-DEIS weights ``w_j`` (``sum_j w_j = 1``) of ``eps_hat`` at ``grid[i - j]``, j < k.

    The exact step is ``x_t = (alpha_t/alpha_s) x_s + alpha_t int_{rho_s}^{rho_t} eps_hat drho`` with
    ``rho = sigma/alpha = e^{-lambda}``; replacing ``eps_hat`` by its Lagrange interpolant gives
    ``C_j = alpha_t int_{rho_s}^{rho_t} l_j drho = -sigma_t (e^h - 1) w_j`` with

    * ``"tAB"``:   ``l_j`` a polynomial in ``t``: ``w_j = int_0^1 e^{-h u} l_j(t(lambda_s + h u)) du / int_0^1 e^{-h u} du``
      (``drho = -rho dlambda``), by 16-point Gauss--Legendre in ``u``, all in float64;
    * ``"rhoAB"``: ``l_j`` a polynomial in ``rho``, integrated exactly: ``w_j = int_0^1 l_j(v) dv`` in
      ``v = (rho - rho_s)/(rho_t - rho_s)``, nodes ``v_m = expm1(lambda_s - lambda_m)/expm1(-h)``;
    * ``"logrho"``: ``l_j`` a polynomial in ``log rho = -lambda`` (diffusers' ``DEISMultistepScheduler``),
      integrated exactly: in ``u = (lambda - lambda_s)/h`` the weight ``e^{-h u}`` has the normalised moments
      ``int_0^1 e^{-h u} u^m du / int_0^1 e^{-h u} du = m! phi_{m+1}(h) / phi_1(h)``, and ``w`` solves
      ``sum_j w_j u_j^m = m! phi_{m+1}(h)/phi_1(h)``, ``m < k`` (the exact noise-form exponential
      Adams--Bashforth method).

    All use normalised variables, so no difference of large antiderivatives is formed (the float32
    closed form of diffusers' DEIS-3 loses its order on fine grids for exactly that reason). Solves
    compute the weights of all steps at once (:meth:`DEIS.rows`).
    """
    grid = torch.as_tensor(grid, dtype=torch.float64)
    lam = schedule.log_snr(grid).numpy()
    return _weights(schedule, grid.numpy(), lam, np.array([i]), k, variant)[0].tolist()


class DEISRow(NamedTuple):
    s: At  # model evaluation at t_s
    k: int  # order of this step
    first: FirstOrder  # x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_hat, or its limit at a singular end
    c: tuple  # C_j = -sigma_t (e^h - 1) w_j, j < k (k >= 2)
    starter: Stage2 | None  # DPM-Solver-2 replacing the first-order warm-up step (warmup="singlestep")


@dataclass(frozen=True)
class DEIS(ExponentialIntegrator):
    """AB-DEIS of ``order`` k in the noise form (Zhang & Chen 2022, Sec. 4, "tAB-DEIS"/"rhoAB-DEIS"):

        x_t = (alpha_t/alpha_s) x_s + sum_{j<k} C_j eps_hat(x_{i-j}, t_{i-j}),   C_j = -sigma_t (e^h - 1) w_j

    ``h = lambda_t - lambda_s``; the weights ``w_j`` integrate the Lagrange interpolant of ``eps_hat``
    through the k newest grid points exactly against ``drho`` (``rho = sigma/alpha``), with the
    polynomial in ``t`` (``variant="tAB"``, the paper's recommended sampler), in ``rho`` (``"rhoAB"``) or
    in ``log rho`` (``"logrho"``, the variant diffusers ships); see :func:`deis_weights`. Coefficients are
    computed in float64 by Gauss--Legendre quadrature (tAB) or exactly (rhoAB, logrho), once per solve.
    Order 1 is DDIM. Warm-up, ``lower_order_final`` and the singular ends follow :class:`~adjointflow.solvers.DPMSolverPP` (a step from ``alpha = 0``
    takes the exact first-order limit ``alpha_t x0_hat + sigma_t eps_hat``; a step to ``sigma = 0`` is
    first order); with ``warmup="singlestep"`` DEIS-3's empty-history step is DPM-Solver-2 (noise form,
    midpoint, one extra NFE, on a first step of ``h <= 1``) so that the warm-up keeps local order 3.
    ``DEIS(variant="logrho", lower_order_final=True, warmup="multistep")`` is diffusers'
    ``DEISMultistepScheduler``.
    Global order k (for ``eps_hat`` smooth in the interpolation variable along the solution);
    1 NFE per step; the history holds previous ``eps_hat``, newest first.
    """

    order: int = 3
    variant: str = "tAB"
    lower_order_final: bool | None = None
    warmup: str = "singlestep"

    prediction = "eps"

    def __post_init__(self):
        check_order("DEIS", self.order, (1, 2, 3))
        check_choice("DEIS", "variant", self.variant, VARIANTS)
        check_flag("DEIS", "lower_order_final", self.lower_order_final, optional=True)
        check_choice("DEIS", "warmup", self.warmup, WARMUPS)

    def rows(self, plan):
        st = Steps(plan.start, plan.end)
        orders = multistep_orders(self, plan)
        firsts = first_order_coefficients(st, "eps")
        noise = st.noise_coefficient()
        t, lam = plan.grid.numpy(), plan.nodes.lam[: plan.n + 1]
        c = {}
        for k in (2, 3):
            steps = np.array([i for i, (kk, s) in enumerate(orders) if kk == k and not s], dtype=np.int64)
            if steps.size:
                w = _weights(plan.schedule, t, lam, steps, k, self.variant) * noise[steps, None]
                c.update(zip(steps.tolist(), map(tuple, w.tolist())))
        starters = singlestep2_stages(plan, st, "eps", "midpoint", [i for i, (_, s) in enumerate(orders) if s])
        return [DEISRow(plan.at(i), k, firsts[i], c.get(i, ()), starters.get(i)) for i, (k, _) in enumerate(orders)]

    def step(self, model, state, c, noise=None):
        x = state.x
        pred = model(x, c.s)
        e0 = pred.eps
        if c.starter is not None:
            x_next = singlestep2(model, x, pred, c.first, c.starter)
        elif c.k == 1:
            x_next = first_order(x, pred, c.first)
        else:
            x_next = lin(c.first.a, x, c.c[0], e0)
            for cj, ej in zip(c.c[1:], state.history):
                x_next = axpy(x_next, cj, ej)
        return State(x_next, (e0, *state.history)[: self.order - 1])
