"""Shared machinery of exponential integrators in log-SNR time (DDIM, DPM-Solver++, DEIS).

With ``lambda = log(alpha/sigma)`` and ``h = lambda_t - lambda_s`` for a step ``s -> t``, the PF-ODE
of every Gaussian path has two exact variation-of-constants forms (Lu et al. 2022, DPM-Solver,
arXiv:2206.00927, eq. 3.4; DPM-Solver++, arXiv:2211.01095, eq. 9):

    data form  ("x0"):  x_t = (sigma_t/sigma_s) x_s + alpha_t int_0^h e^{-(h - u)} x0_hat(lambda_s + u) du
    noise form ("eps"): x_t = (alpha_t/alpha_s) x_s - sigma_t int_0^h e^{+(h - u)} eps_hat(lambda_s + u) du

Replacing the prediction by its Taylor/Lagrange polynomial in ``u`` gives the integrals
``int_0^h e^{-(h-u)} u^{k-1}/(k-1)! du = h^k phi_k(-h)`` with the phi functions of exponential
integrators (Hochbruck & Ostermann 2010), evaluated here in float64 without cancellation.

Every coefficient is computed once per solve, vectorised over the steps (:class:`Steps`, from the
:class:`~adjointflow.plan.Plan`'s float64 nodes), and read by the step from its row.

Singular ends. ``lambda = -inf`` where ``alpha = 0`` (LinearFlow and VPCosine at ``t = 1``) and
``lambda = +inf`` where ``sigma = 0`` (``t = 0`` on VP paths and LinearFlow): there ``h`` is infinite
and only the first-order step has a finite limit, which :func:`first_order_coefficients` writes in a
form that stays finite. That limit needs ``x0_hat`` where ``alpha_s = 0`` and ``eps_hat`` where
``sigma_s = 0``. A ``"velocity"``, ``"v"`` or ``"x0"`` model gives ``x0_hat`` at ``alpha = 0``; an
``"eps"`` or ``"score"`` model cannot (``x0 = (x - sigma eps)/alpha``), and such a step raises
``ValueError`` (start the grid at ``t < 1``). Symmetrically an ``"x0"`` model cannot give ``eps_hat`` at
``sigma = 0``, which only an inversion grid starting at ``t = 0`` would need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..plan import At, Nodes, Plan
from .base import Solver, axpy, lin

__all__ = [
    "phi",
    "phis",
    "Steps",
    "Interval",
    "FirstOrder",
    "first_order",
    "first_order_coefficients",
    "Stage2",
    "singlestep2",
    "singlestep2_stages",
    "multistep_orders",
    "ExponentialIntegrator",
    "SOLVER_TYPES",
    "WARMUPS",
    "moment_weights",
]

#: second-order update forms: "midpoint" (the DPM-Solver papers' published update, diffusers'
#: default) and "heun" (exact integration of the interpolating polynomial, "taylor" in the
#: official DPM-Solver code).
SOLVER_TYPES = ("midpoint", "heun")

#: warm-up of multistep methods (see :func:`multistep_orders`)
WARMUPS = ("singlestep", "multistep")

#: diffusers' rule: with fewer steps than this, ``lower_order_final`` lowers the last steps' order.
LOWER_ORDER_FINAL_STEPS = 15


# inf/NaN in float64 plan arithmetic mark singular ends on purpose (``Solver.plan`` runs rows under it too)
def quiet():
    return np.errstate(divide="ignore", invalid="ignore", over="ignore")


#: ``lower_order_final=None``: a step of order ``k`` may be at most this many times the mean length (in
#: lambda) of the ``k - 1`` steps its history spans; otherwise its order is lowered.
MAX_STEP_RATIO = 2.0

#: ``lower_order_final=None``: third order only on steps of at most this length in lambda.
MAX_THIRD_ORDER_STEP = 1.0


def phis(k: int, z):
    """phi function of exponential integrators, elementwise on a float64 array ``z`` (see :func:`phi`)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"phi needs an integer order k >= 0, got {k!r}")
    z = np.asarray(z, dtype=np.float64)
    if k == 0:
        return np.exp(z)
    small = np.abs(z) < 1.0
    # series: sum_j z^j/(j+k)!, the terms as a running product (30 terms: truncation below 1e-30)
    factors = z[..., None] / (np.arange(1, 30) + k)
    series = (1.0 + np.cumprod(factors, axis=-1).sum(-1)) / math.factorial(k)
    zz = np.where(small, 1.0, z)
    value = np.expm1(zz) / zz
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / zz
    value = np.where(np.isneginf(z), 0.0, value)
    return np.where(small, series, value)


def phi(k: int, z: float) -> float:
    """phi function of exponential integrators, ``phi_k(z) = sum_{j>=0} z^j / (j + k)!`` (float64).

    ``phi_0(z) = e^z``, ``phi_1(z) = (e^z - 1)/z`` and ``phi_{k+1}(z) = (phi_k(z) - 1/k!)/z``;
    equivalently ``phi_k(z) = int_0^1 e^{(1-v) z} v^{k-1}/(k-1)! dv`` for ``k >= 1``. The recurrence
    cancels catastrophically as ``z -> 0`` (``phi_3`` would lose ``~log10(1/|z|^2)`` digits), so
    ``|z| < 1`` uses the power series and ``|z| >= 1`` the recurrence started from ``expm1``.
    ``z = -inf`` gives ``phi_k = 0`` for ``k >= 1``.
    """
    with quiet():
        return float(phis(k, float(z)))


class Steps:
    """Float64 quantities of the steps ``s -> t`` between two :class:`~adjointflow.plan.Nodes` (vectorised,
    numpy). ``lambda``, ``h``, the ratios ``sigma_t/sigma_s`` and ``alpha_t/alpha_s`` are derived in log
    space so that the singular ends (``alpha = 0`` or ``sigma = 0``, i.e. ``log = -inf``) give the exact
    limits ``0``/``inf`` instead of NaN.
    """

    def __init__(self, start: Nodes, end: Nodes):
        self._set(start.log_alpha, start.log_sigma, end.log_alpha, end.log_sigma)

    def _set(self, log_alpha_s, log_sigma_s, log_alpha_t, log_sigma_t) -> None:
        self.log_alpha_s, self.log_sigma_s, self.log_alpha_t, self.log_sigma_t = (
            log_alpha_s, log_sigma_s, log_alpha_t, log_sigma_t)
        self.lam_s, self.lam_t = log_alpha_s - log_sigma_s, log_alpha_t - log_sigma_t
        self.h = self.lam_t - self.lam_s
        self.alpha_s, self.alpha_t = np.exp(log_alpha_s), np.exp(log_alpha_t)
        self.sigma_s, self.sigma_t = np.exp(log_sigma_s), np.exp(log_sigma_t)
        #: ``sigma_t / sigma_s`` (``inf`` when ``sigma_s = 0``), ``alpha_t / alpha_s`` (``inf`` when ``alpha_s = 0``)
        self.sigma_ratio = np.exp(log_sigma_t - log_sigma_s)
        self.alpha_ratio = np.exp(log_alpha_t - log_alpha_s)

    @property
    def finite(self):
        """Both ends have finite ``lambda`` (the only case where orders above 1 are defined)."""
        return np.isfinite(self.lam_s) & np.isfinite(self.lam_t)

    def data_coefficient(self):
        """``alpha_t (1 - e^{-h}) = alpha_t h phi_1(-h)``, the weight of ``x0_hat`` in the first-order
        data-form step; written as ``-alpha_t expm1(-h)`` for ``h >= 0`` (finite at ``h = +inf``) and as
        ``(sigma_t/sigma_s) alpha_s expm1(h)`` for ``h < 0`` (finite at ``alpha_t = 0``)."""
        h = self.h
        return np.where(h >= 0, -self.alpha_t * np.expm1(-h), self.sigma_ratio * self.alpha_s * np.expm1(h))

    def noise_coefficient(self):
        """``-sigma_t (e^h - 1) = -sigma_t h phi_1(h)``, the weight of ``eps_hat`` in the first-order
        noise-form step; written as ``(alpha_t/alpha_s) sigma_s expm1(-h)`` for ``h >= 0`` (finite at
        ``sigma_t = 0``) and as ``-sigma_t expm1(h)`` for ``h < 0`` (finite at ``sigma_s = 0``)."""
        h = self.h
        return np.where(h >= 0, self.alpha_ratio * self.sigma_s * np.expm1(-h), -self.sigma_t * np.expm1(h))


@dataclass(frozen=True)
class Interval:
    """One step ``s -> t`` as Python floats (the scalar view of :class:`Steps`, for inspection and tests)."""

    t_s: float
    t_t: float
    log_alpha_s: float
    log_sigma_s: float
    log_alpha_t: float
    log_sigma_t: float

    @staticmethod
    def of(schedule, t_s, t_t) -> "Interval":
        n = Nodes.of(schedule, torch.tensor([float(t_s), float(t_t)], dtype=torch.float64))
        return Interval(*n.t.tolist(), float(n.log_alpha[0]), float(n.log_sigma[0]), float(n.log_alpha[1]),
                        float(n.log_sigma[1]))

    def _steps(self) -> Steps:
        st = Steps.__new__(Steps)
        with quiet():
            st._set(*(np.float64(v) for v in (self.log_alpha_s, self.log_sigma_s, self.log_alpha_t, self.log_sigma_t)))
        return st

    def __getattr__(self, name):
        if name in ("lam_s", "lam_t", "h", "alpha_s", "alpha_t", "sigma_s", "sigma_t", "sigma_ratio", "alpha_ratio",
                    "finite"):
            v = getattr(self._steps(), name)
            return bool(v) if name == "finite" else float(v)
        raise AttributeError(name)

    def data_coefficient(self) -> float:
        with quiet():
            return float(self._steps().data_coefficient())

    def noise_coefficient(self) -> float:
        with quiet():
            return float(self._steps().noise_coefficient())


class FirstOrder(NamedTuple):
    """The first-order exponential-integrator step (DDIM, Song et al. 2021, eq. 12 with eta = 0), as
    ``form`` with two weights:

    * ``"x0"`` (data form):  ``x_t = a x_s + b x0_hat``, ``a = sigma_t/sigma_s``, ``b = alpha_t (1 - e^{-h})``
    * ``"eps"`` (noise form): ``x_t = a x_s + b eps_hat``, ``a = alpha_t/alpha_s``, ``b = -sigma_t (e^h - 1)``
    * ``"sym"``: ``x_t = a x0_hat + b eps_hat`` with ``a = alpha_t``, ``b = sigma_t`` -- the exact limit where
      the form's leading ratio is infinite (``sigma_s = 0`` for the data form, ``alpha_s = 0`` for the noise form).
    """

    form: str
    a: float
    b: float


def first_order_coefficients(st: Steps, form: str) -> list[FirstOrder]:
    """:class:`FirstOrder` rows of every step in ``st`` for the data (``"x0"``) or noise (``"eps"``) form."""
    if form == "x0":
        a, b, singular = st.sigma_ratio, st.data_coefficient(), st.sigma_s == 0
    else:
        a, b, singular = st.alpha_ratio, st.noise_coefficient(), st.alpha_s == 0
    a = np.where(singular, st.alpha_t, a).tolist()
    b = np.where(singular, st.sigma_t, b).tolist()
    forms = ["sym" if z else form for z in singular.tolist()]
    return [FirstOrder(*r) for r in zip(forms, a, b)]


def first_order(x: Tensor, pred, fo: FirstOrder) -> Tensor:
    """Apply a :class:`FirstOrder` step to ``x`` with the prediction ``pred`` made at ``(x, s)``."""
    if fo.form == "x0":
        return lin(fo.a, x, fo.b, pred.x0)
    if fo.form == "eps":
        return lin(fo.a, x, fo.b, pred.eps)
    return lin(fo.a, pred.x0, fo.b, pred.eps)


class Stage2(NamedTuple):
    """The intermediate point of a second-order singlestep step (see :func:`singlestep2`)."""

    s1: At  # evaluation at lambda_s + r_1 h
    first: FirstOrder  # first-order step s -> s_1
    c: float  # weight of D = p(u, s_1) - p(x_s, s)
    form: str  # "x0" (p = x0_hat) or "eps" (p = eps_hat)


def singlestep2(model, x: Tensor, pred, first: FirstOrder, st: Stage2) -> Tensor:
    """Second-order singlestep exponential integrator (Lu et al. 2022: DPM-Solver-2 for ``form="eps"``,
    DPM-Solver++(2S) for ``form="x0"``), intermediate point ``s_1`` at ``lambda_s + h/2``:

        u = first_order(x_s, s -> s_1);  D = p(u, s_1) - p(x_s, s)   (p = x0_hat or eps_hat)
        x_t = first_order(x_s, s -> t) + c D

    with ``c`` from :func:`singlestep2_stages`. Two NFE (``pred`` is the one at ``(x_s, s)``).
    """
    pred1 = model(first_order(x, pred, st.first), st.s1)
    d = pred1.x0 - pred.x0 if st.form == "x0" else pred1.eps - pred.eps
    return axpy(first_order(x, pred, first), st.c, d)


def stages(plan: Plan, st: Steps, r: float, where: list[int]):
    """Intermediate points at ``lambda_s + r h`` for the steps ``where``: the steps ``s -> s_r``, the actual
    ``r`` after the float64 round trip through ``t``, and their evaluation points."""
    idx = np.asarray(where, dtype=np.int64)
    lam_s, h = st.lam_s[idx], st.h[idx]
    t_r = plan.schedule.t_from_log_snr(torch.from_numpy(lam_s + r * h))
    nodes, at = plan.stage(t_r)
    sub = Steps(plan.start[idx], nodes)
    return sub, sub.h / h, at


def singlestep2_stages(plan: Plan, st: Steps, form: str, solver_type: str, where: list[int]) -> dict[int, Stage2]:
    """:class:`Stage2` of the steps ``where`` (finite ``h``):

        data form:  c = (1 - e^{-h})/(2 r_1) alpha_t ("midpoint"),  c = alpha_t h phi_2(-h) / r_1 ("heun")
        noise form: c = -sigma_t (e^h - 1)/(2 r_1)   ("midpoint"),  c = -sigma_t h phi_2(h) / r_1  ("heun")
    """
    if not where:
        return {}
    idx = np.asarray(where, dtype=np.int64)
    sub, r1, at = stages(plan, st, 0.5, where)
    h = st.h[idx]
    if form == "x0":
        c = 0.5 / r1 * st.data_coefficient()[idx] if solver_type == "midpoint" else st.alpha_t[idx] * h * phis(2, -h) / r1
    else:
        c = 0.5 / r1 * st.noise_coefficient()[idx] if solver_type == "midpoint" else -st.sigma_t[idx] * h * phis(2, h) / r1
    firsts = first_order_coefficients(sub, form)
    return {i: Stage2(s1, fo, ci, form) for i, s1, fo, ci in zip(where, at, firsts, c.tolist())}


def multistep_orders(solver, plan: Plan) -> list[tuple[int, bool]]:
    """``(k, starter)`` for every step of a multistep method: the order ``k`` of step ``i`` and whether it
    is instead a second-order singlestep starter.

    ``k`` is the declared order, lowered

    * by the warm-up to ``1 + (number of history nodes with finite lambda)`` (a node at ``lambda = -inf``,
      e.g. ``t = 1`` of LinearFlow, contributes nothing in the limit); a step to or from a singular end
      (infinite ``h``) is always first order;
    * by ``solver.lower_order_final``: ``True`` is diffusers' rule (step ``i`` of ``n`` has order at most
      ``n - i`` when ``n`` is below ``solver.lower_order_final_below``, 15 for DPM-Solver/DEIS, every grid
      for UniPC), ``False`` never lowers, and ``None`` (the default) lowers where extrapolating the
      history does not pay, judged on the grid in lambda alone:

      - a step of order ``k`` may be at most ``MAX_STEP_RATIO`` (2) times the mean length of the ``k - 1``
        steps its history spans, otherwise ``k`` drops until it is (the last step of a uniform-t flow grid
        spans ``h ~ 4`` after steps of ``~0.5``: a polynomial through the history, extrapolated that far,
        is worse than none; diffusers' fixed ``n < 15`` rule lowers it below 15 steps only, hence the
        cliff of its multistep solvers at 15 steps on flows);
      - third order only on steps of at most ``MAX_THIRD_ORDER_STEP`` (1.0) in lambda (coarser steps
        extrapolate the curvature of the prediction further than it is smooth: on the closed-form VP
        problem of ``benchmarks/test_bench_solvers.py`` 3M and UniPC-3 are worse than 2M and UniPC-2
        with ``h > 1``, better below).

      On grids uniform in lambda with ``h <= 1`` nothing is lowered, so the declared orders hold.

    The history at step ``i`` holds ``min(i, order - 1)`` predictions (``plan.history`` overrides it for a
    single step).

    Warm-up and order: a first-order step has local error ``O(h^2)``, which caps the global order
    of a third-order method at 2 once the grid is fine enough (measured: DPM-Solver++(3M) with a
    first-order first step has local orders 4.2 then 2.0 between 128, 256 and 512 steps). With
    ``warmup="singlestep"`` an order-3 method whose history is still empty therefore takes a
    second-order singlestep step (``starter``, one extra NFE; Lu et al.'s DPM-Solver-2 /
    DPM-Solver++(2S)) -- on steps of at most ``MAX_THIRD_ORDER_STEP``, where third order is the aim: on a
    coarse step the starter buys nothing and the noise-form one is unstable (DEIS-3 on a one-step grid
    with ``h ~ 10`` was 55x worse than DDIM). ``warmup="multistep"`` is diffusers' plain lower-order warm-up.
    """
    lam = plan.nodes.lam[: plan.n + 1].tolist()
    finite = [math.isfinite(v) for v in lam]
    step_len = [abs(b - a) for a, b in zip(lam[:-1], lam[1:])]
    if lam[-1] < lam[0]:  # an inversion grid: lambda decreases; history spans are measured the same way
        lam = [-v for v in lam]
    n, order = plan.n, solver.order
    lof = getattr(solver, "lower_order_final", None)
    # a solver class may move the thresholds (benchmarks/test_bench_solver_variants.py measures other values)
    max_ratio = getattr(solver, "max_step_ratio", MAX_STEP_RATIO)
    max_third = getattr(solver, "max_third_order_step", MAX_THIRD_ORDER_STEP)
    out = []
    for i in range(n):
        if not (finite[i] and finite[i + 1]):
            out.append((1, False))
            continue
        n_hist = plan.history.get(i, min(i, order - 1))
        usable = 1
        while usable <= n_hist and finite[i - usable]:
            usable += 1
        cap = order
        if lof is True and n < getattr(solver, "lower_order_final_below", LOWER_ORDER_FINAL_STEPS):
            cap = min(cap, n - i)
        if (getattr(solver, "warmup", "multistep") == "singlestep" and usable < order - 1 and cap >= 2
                and step_len[i] <= max_third):
            out.append((2, True))
            continue
        k = min(cap, usable)
        if lof is None:
            while k > 1 and step_len[i] > max_ratio * (lam[i] - lam[i - k + 1]) / (k - 1):
                k -= 1
            if step_len[i] > max_third:
                k = min(k, 2)
        out.append((k, False))
    return out


def ratios(st: Steps, lam, back: int) -> list[float]:
    """``r = h_{i-back} / h_i`` for every step ``i`` (NaN where step ``i - back`` does not exist):
    ``h_{i-1} = lambda_s - lambda_{i-1}`` for ``back = 1``, ``lambda_{i-1} - lambda_{i-2}`` for ``back = 2``."""
    h = st.h
    n = h.size
    prev = np.full(n, np.nan)
    if n > back:
        prev[back:] = lam[1 : n - back + 1] - lam[: n - back]
    return (prev / h).tolist()


@dataclass(frozen=True)
class ExponentialIntegrator(Solver):
    """Base class of exponential integrators in ``lambda = log(alpha/sigma)``.

    Subclasses say which exact form they discretise through :attr:`prediction` (``"x0"``: data form,
    DPM-Solver++; ``"eps"``: noise form, DPM-Solver/DEIS). The continuous adjoint (AdjointDEIS,
    Blasingame & Liu 2024) picks its own form with ``ContinuousAdjoint(form=...)``. ``nfe_per_step``
    is nominal: a singlestep warm-up or a final step changes the real count, which ``solve`` reports
    exactly in ``Solution.nfe``. Multistep history (previous predictions, newest first) lives in the
    :class:`~adjointflow.solvers.base.State`; a step is a pure function of ``(state, row, noise)``.
    """

    prediction: ClassVar[str] = "x0"

    def adjoint_step(self, *args, **kwargs):
        """One AdjointDEIS step for this solver (``adjointflow.adjoint.adjoint_deis``)."""
        from ..adjoint.adjoint_deis import exponential_adjoint_step

        return exponential_adjoint_step(self, *args, **kwargs)


def check_order(name: str, order, allowed) -> None:
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"{name}: order must be an int, got {type(order).__name__}")
    if order not in allowed:
        raise ValueError(f"{name}: order must be one of {tuple(allowed)}, got {order}")


def check_flag(name: str, field: str, value, optional: bool = False) -> None:
    if not isinstance(value, bool) and not (optional and value is None):
        raise TypeError(f"{name}: {field} must be {'None or ' if optional else ''}a bool, got {value!r}")


def check_choice(name: str, field: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: {field} must be one of {tuple(choices)}, got {value!r}")


def moment_weights(nodes, moments):
    """Weights ``w`` (S, k) of an interpolatory rule with ``k`` nodes: ``sum_j w_j nodes_j^m = moments_m`` for
    ``m = 0..k-1`` (a batched transposed Vandermonde system, float64 numpy; S independent steps).

    Integrating the Lagrange interpolant through ``nodes`` against a weight whose normalised moments are
    ``moments`` gives exactly these weights, which is how DEIS (logrho) and UniPC's ``R_p a = g`` read.
    """
    nodes, moments = np.asarray(nodes, dtype=np.float64), np.asarray(moments, dtype=np.float64)
    k = nodes.shape[-1]
    if k == 0:
        return np.zeros_like(nodes)
    vander = nodes[..., None, :] ** np.arange(k)[:, None]  # [m, j] = node_j^m
    return np.linalg.solve(vander, moments[..., None])[..., 0]
