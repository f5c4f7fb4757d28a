"""Shared machinery of exponential integrators in log-SNR time (DDIM, DPM-Solver++, DEIS).

With ``lambda = log(alpha/sigma)`` and ``h = lambda_t - lambda_s`` for a step ``s -> t``, the PF-ODE
of every Gaussian path has two exact variation-of-constants forms (Lu et al. 2022, DPM-Solver,
arXiv:2206.00927, eq. 3.4; DPM-Solver++, arXiv:2211.01095, eq. 9):

    data form  ("x0"):  x_t = (sigma_t/sigma_s) x_s + alpha_t int_0^h e^{-(h - u)} x0_hat(lambda_s + u) du
    noise form ("eps"): x_t = (alpha_t/alpha_s) x_s - sigma_t int_0^h e^{+(h - u)} eps_hat(lambda_s + u) du

Replacing the prediction by its Taylor/Lagrange polynomial in ``u`` gives the integrals
``int_0^h e^{-(h-u)} u^{k-1}/(k-1)! du = h^k phi_k(-h)`` with the phi functions of exponential
integrators (Hochbruck & Ostermann 2010), evaluated here in float64 without cancellation.

Singular ends. ``lambda = -inf`` where ``alpha = 0`` (LinearFlow and VPCosine at ``t = 1``) and
``lambda = +inf`` where ``sigma = 0`` (``t = 0`` on VP paths and LinearFlow): there ``h`` is infinite
and only the first-order step has a finite limit, which :func:`first_order_update` evaluates in a
form that stays finite. That limit needs ``x0_hat`` where ``alpha_s = 0`` and ``eps_hat`` where
``sigma_s = 0``. A ``"velocity"``, ``"v"`` or ``"x0"`` model gives ``x0_hat`` at ``alpha = 0`` (the
Denoiser's conversion does not divide by ``alpha`` for them); an ``"eps"`` or ``"score"`` model cannot
(``x0 = (x - sigma eps)/alpha``), and such a step raises ``ValueError`` (start the grid at
``t < 1``). Symmetrically an ``"x0"`` model cannot give ``eps_hat`` at ``sigma = 0``, which only an
inversion grid starting at ``t = 0`` would need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Solver, State

__all__ = [
    "phi",
    "Interval",
    "first_order_update",
    "ExponentialIntegrator",
    "SOLVER_TYPES",
    "WARMUPS",
    "singlestep2_update",
]

#: second-order update forms: "midpoint" (the DPM-Solver papers' published update, diffusers'
#: default) and "heun" (exact integration of the interpolating polynomial, "taylor" in the
#: official DPM-Solver code).
SOLVER_TYPES = ("midpoint", "heun")

#: warm-up of multistep methods (see ``ExponentialIntegrator._multistep_plan``)
WARMUPS = ("singlestep", "multistep")

#: diffusers' rule: with fewer steps than this, ``lower_order_final`` lowers the last steps' order.
LOWER_ORDER_FINAL_STEPS = 15


def phi(k: int, z: float) -> float:
    """phi function of exponential integrators, ``phi_k(z) = sum_{j>=0} z^j / (j + k)!`` (float64).

    ``phi_0(z) = e^z``, ``phi_1(z) = (e^z - 1)/z`` and ``phi_{k+1}(z) = (phi_k(z) - 1/k!)/z``;
    equivalently ``phi_k(z) = int_0^1 e^{(1-v) z} v^{k-1}/(k-1)! dv`` for ``k >= 1``. The recurrence
    cancels catastrophically as ``z -> 0`` (``phi_3`` would lose ``~log10(1/|z|^2)`` digits), so
    ``|z| < 1`` uses the power series (30 terms: truncation below 1e-30) and ``|z| >= 1`` the
    recurrence started from ``expm1``. ``z = -inf`` gives ``phi_k = 0`` for ``k >= 1``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"phi needs an integer order k >= 0, got {k!r}")
    z = float(z)
    if k == 0:
        return math.exp(z)
    if abs(z) < 1.0:
        term = 1.0 / math.factorial(k)
        total = term
        for j in range(1, 30):
            term *= z / (j + k)
            total += term
        return total
    if math.isinf(z) and z < 0:
        return 0.0
    value = math.expm1(z) / z
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


@dataclass(frozen=True)
class Interval:
    """Float64 scalars of one step ``s -> t``: ``log alpha``, ``log sigma`` at both ends.

    Everything else (``lambda``, ``h``, the ratios ``sigma_t/sigma_s``, ``alpha_t/alpha_s``) is derived
    in log space so that the singular ends (``alpha = 0`` or ``sigma = 0``, i.e. ``log = -inf``) give
    the exact limits ``0``/``inf`` instead of NaN.
    """

    t_s: float
    t_t: float
    log_alpha_s: float
    log_sigma_s: float
    log_alpha_t: float
    log_sigma_t: float

    @staticmethod
    def of(schedule, t_s, t_t) -> "Interval":
        ts, tt = torch.as_tensor(t_s, dtype=torch.float64), torch.as_tensor(t_t, dtype=torch.float64)
        return Interval(
            float(ts), float(tt),
            float(schedule.log_alpha(ts)), float(schedule.log_sigma(ts)),
            float(schedule.log_alpha(tt)), float(schedule.log_sigma(tt)),
        )

    @property
    def lam_s(self) -> float:
        return self.log_alpha_s - self.log_sigma_s

    @property
    def lam_t(self) -> float:
        return self.log_alpha_t - self.log_sigma_t

    @property
    def h(self) -> float:
        return self.lam_t - self.lam_s

    @property
    def alpha_s(self) -> float:
        return math.exp(self.log_alpha_s)

    @property
    def alpha_t(self) -> float:
        return math.exp(self.log_alpha_t)

    @property
    def sigma_s(self) -> float:
        return math.exp(self.log_sigma_s)

    @property
    def sigma_t(self) -> float:
        return math.exp(self.log_sigma_t)

    @property
    def sigma_ratio(self) -> float:
        """``sigma_t / sigma_s`` (``inf`` when ``sigma_s = 0``)."""
        return math.exp(self.log_sigma_t - self.log_sigma_s)

    @property
    def alpha_ratio(self) -> float:
        """``alpha_t / alpha_s`` (``inf`` when ``alpha_s = 0``)."""
        return math.exp(self.log_alpha_t - self.log_alpha_s)

    @property
    def finite(self) -> bool:
        """Both ends have finite ``lambda`` (the only case where orders above 1 are defined)."""
        return math.isfinite(self.lam_s) and math.isfinite(self.lam_t)

    def data_coefficient(self) -> float:
        """``alpha_t (1 - e^{-h}) = alpha_t h phi_1(-h)``, the weight of ``x0_hat`` in the first-order
        data-form step; written as ``-alpha_t expm1(-h)`` for ``h >= 0`` (finite at ``h = +inf``) and as
        ``(sigma_t/sigma_s) alpha_s expm1(h)`` for ``h < 0`` (finite at ``alpha_t = 0``)."""
        h = self.h
        if h >= 0:
            return -self.alpha_t * math.expm1(-h)
        return self.sigma_ratio * self.alpha_s * math.expm1(h)

    def noise_coefficient(self) -> float:
        """``-sigma_t (e^h - 1) = -sigma_t h phi_1(h)``, the weight of ``eps_hat`` in the first-order
        noise-form step; written as ``(alpha_t/alpha_s) sigma_s expm1(-h)`` for ``h >= 0`` (finite at
        ``sigma_t = 0``) and as ``-sigma_t expm1(h)`` for ``h < 0`` (finite at ``sigma_s = 0``)."""
        h = self.h
        if h >= 0:
            return self.alpha_ratio * self.sigma_s * math.expm1(-h)
        return -self.sigma_t * math.expm1(h)


def needed(pred, kind: str, t: float) -> Tensor:
    """``pred.x0`` or ``pred.eps``, checked finite where the conversion divides by zero."""
    value = pred.x0 if kind == "x0" else pred.eps
    if not bool(torch.isfinite(value).all()):
        if kind == "x0":
            why = (f"alpha(t={t:.6g}) = 0 and a model that predicts {getattr(pred, 'kind', '?')!r} cannot give x0 there "
                   f"(x0 = (x - sigma eps)/alpha); start the grid at t < 1 (e.g. timesteps(schedule, n, "
                   f"t_start=0.999)) or use a 'velocity', 'v' or 'x0' model")
        else:
            why = (f"sigma(t={t:.6g}) = 0 and a model that predicts {getattr(pred, 'kind', '?')!r} cannot give eps "
                   f"there (eps = (x - alpha x0)/sigma); start the inversion grid at t > 0")
        raise ValueError(f"exponential-integrator step from a singular end of the path: {why}")
    return value


def first_order_update(x: Tensor, pred, iv: Interval, form: str) -> Tensor:
    """The first-order exponential-integrator step (DDIM, Song et al. 2021, eq. 12 with eta = 0):

    * data form:  ``x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) x0_hat``
    * noise form: ``x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_hat``

    both equal to ``alpha_t x0_hat + sigma_t eps_hat``. Where the form's leading ratio is infinite
    (``sigma_s = 0`` for the data form, ``alpha_s = 0`` for the noise form) that symmetric DDIM form,
    which is the exact limit, is used instead.
    """
    if iv.alpha_s == 0.0:
        x0 = needed(pred, "x0", iv.t_s)
        if form == "eps":
            return iv.alpha_t * x0 + iv.sigma_t * pred.eps
    if iv.sigma_s == 0.0:
        eps = needed(pred, "eps", iv.t_s)
        if form == "x0":
            return iv.alpha_t * pred.x0 + iv.sigma_t * eps
    if form == "x0":
        return iv.sigma_ratio * x + iv.data_coefficient() * pred.x0
    return iv.alpha_ratio * x + iv.noise_coefficient() * pred.eps


def lam_at(schedule, t) -> float:
    return float(schedule.log_snr(torch.as_tensor(t, dtype=torch.float64)))


def stage(schedule, iv: Interval, r: float):
    """The intermediate point of a singlestep method at ``lambda_s + r h``: its time (float64 tensor),
    the interval ``s -> s_r`` and the actual ``r`` after the float64 round trip through ``t``."""
    t_r = schedule.t_from_log_snr(torch.tensor(iv.lam_s + r * iv.h, dtype=torch.float64))
    iv_r = Interval.of(schedule, iv.t_s, t_r)
    return t_r, iv_r, iv_r.h / iv.h


def singlestep2_update(model, x: Tensor, pred, iv: Interval, form: str, solver_type: str) -> Tensor:
    """Second-order singlestep exponential integrator (Lu et al. 2022: DPM-Solver-2 for
    ``form="eps"``, DPM-Solver++(2S) for ``form="x0"``), intermediate point ``s_1`` at ``lambda_s + h/2``:

        u = first_order(x_s, s -> s_1);  D = p(u, s_1) - p(x_s, s)   (p = x0_hat or eps_hat)
        data form:  x_t = first_order(x_s, s -> t) + c D,  c = (1 - e^{-h})/(2 r_1) alpha_t     ("midpoint")
                                                            c = alpha_t h phi_2(-h) / r_1         ("heun")
        noise form: x_t = first_order(x_s, s -> t) + c D,  c = -sigma_t (e^h - 1)/(2 r_1)        ("midpoint")
                                                            c = -sigma_t h phi_2(h) / r_1          ("heun")

    Two NFE (``pred`` is the one at ``(x_s, s)``); ``h`` must be finite.
    """
    t1, iv1, r1 = stage(model.schedule, iv, 0.5)
    pred1 = model(first_order_update(x, pred, iv1, form), t1)
    h = iv.h
    if form == "x0":
        d = pred1.x0 - pred.x0
        c = 0.5 / r1 * iv.data_coefficient() if solver_type == "midpoint" else iv.alpha_t * h * phi(2, -h) / r1
    else:
        d = pred1.eps - pred.eps
        c = 0.5 / r1 * iv.noise_coefficient() if solver_type == "midpoint" else -iv.sigma_t * h * phi(2, h) / r1
    return first_order_update(x, pred, iv, form) + c * d


@dataclass(frozen=True)
class ExponentialIntegrator(Solver):
    """Base class of exponential integrators in ``lambda = log(alpha/sigma)``.

    Subclasses say which exact form they discretise through :attr:`prediction` (``"x0"``: data form,
    DPM-Solver++; ``"eps"``: noise form, DPM-Solver/DEIS). The continuous adjoint (AdjointDEIS,
    Blasingame & Liu 2024) picks its own form with ``ContinuousAdjoint(form=...)``. ``nfe_per_step``
    is nominal: a singlestep warm-up or a final step changes the real count, which ``solve`` reports
    exactly in ``Solution.nfe``. Multistep history
    (previous predictions, newest first) lives in :class:`State`; a step is a pure function of
    ``(state, grid, i, noise)``.
    """

    prediction: ClassVar[str] = "x0"

    def adjoint_step(self, *args, **kwargs):
        """One AdjointDEIS step for this solver (``adjointflow.adjoint.adjoint_deis``)."""
        try:
            from ..adjoint.adjoint_deis import exponential_adjoint_step
        except ModuleNotFoundError as e:  # pragma: no cover - depends on the adjoint module being built
            if e.name != "adjointflow.adjoint.adjoint_deis":
                raise
            raise NotImplementedError(
                f"{type(self).__name__}: the AdjointDEIS steps are not available; use gradient=Checkpoint() or Backprop()"
            ) from e
        return exponential_adjoint_step(self, *args, **kwargs)

    # --- helpers shared by the multistep solvers -------------------------------------------
    def _multistep_plan(self, state: State, grid: Tensor, i: int, schedule, iv: Interval) -> tuple[int, bool]:
        """``(k, starter)``: the order ``k`` of multistep step ``i`` and whether it is instead a
        second-order singlestep starter.

        ``k`` is the declared order, lowered to ``1 + (number of history nodes with finite lambda)``
        (warm-up; a node at ``lambda = -inf``, e.g. ``t = 1`` of LinearFlow, contributes nothing in the
        limit) and by ``lower_order_final`` (diffusers' rule: with fewer than 15 steps the last step is
        first order and the one before at most second). A step to or from a singular end (infinite
        ``h``) is always first order.

        Warm-up and order: a first-order step has local error ``O(h^2)``, which caps the global order
        of a third-order method at 2 once the grid is fine enough (measured: DPM-Solver++(3M) with a
        first-order first step has local orders 4.2 then 2.0 between 128, 256 and 512 steps). With
        ``warmup="singlestep"`` an order-3 method whose history is still empty therefore takes a
        second-order singlestep step (``starter``, one extra NFE; Lu et al.'s DPM-Solver-2 /
        DPM-Solver++(2S)); the next step is second-order multistep (local ``O(h^3)``).
        ``warmup="multistep"`` reproduces diffusers' plain lower-order warm-up.
        """
        n_hist = len(state.history)
        if n_hist > i:
            raise ValueError(
                f"{type(self).__name__}: state.history has {n_hist} entries at step {i}; a state at grid[{i}] "
                f"can carry at most {i} earlier predictions"
            )
        if not iv.finite:
            return 1, False
        cap = self.order
        n = len(grid) - 1
        if getattr(self, "lower_order_final", False) and n < LOWER_ORDER_FINAL_STEPS:
            if i == n - 1:
                cap = 1
            elif i == n - 2:
                cap = min(cap, 2)
        usable = 1
        while usable <= n_hist and math.isfinite(lam_at(schedule, grid[i - usable])):
            usable += 1
        k = min(cap, usable)
        if getattr(self, "warmup", "multistep") == "singlestep" and usable < self.order - 1 and cap >= 2:
            return 2, True
        return k, False


def check_order(name: str, order, allowed) -> None:
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"{name}: order must be an int, got {type(order).__name__}")
    if order not in allowed:
        raise ValueError(f"{name}: order must be one of {tuple(allowed)}, got {order}")


def check_flag(name: str, field: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: {field} must be a bool, got {value!r}")


def check_choice(name: str, field: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: {field} must be one of {tuple(choices)}, got {value!r}")
