"""Euler's method on the probability-flow ODE ``dx/dt = u(x, t)`` (order 1, 1 NFE/step)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..plan import At
from .base import Solver, State, axpy

__all__ = ["Euler", "euler_adjoint_step"]


class EulerRow(NamedTuple):
    s: At  # model evaluation at t_i
    dt: float  # t_{i+1} - t_i


@dataclass(frozen=True)
class Euler(Solver):
    """Explicit Euler on the PF-ODE in our time ``t``: ``x_{i+1} = x_i + (t_{i+1} - t_i) u(x_i, t_i)``.

    ``u`` is the PF-ODE drift (flow-matching velocity), so for ``LinearFlow`` this is the usual
    flow-matching Euler sampler. On VE/EDM it is *not* k-diffusion's ``sample_euler`` (Karras et al. 2022,
    Alg. 2 without churn), which steps in the noise level ``sigma`` (linear in ``t`` only for
    ``VE``-like paths with ``sigma(t) = t``); the first-order method that equals ``sample_euler`` on every
    path is :class:`~adjointflow.solvers.DDIM` (Euler in ``sigma/alpha``, Karras et al. 2022, Sec. 4).
    Global order 1.
    """

    def rows(self, plan):
        return [EulerRow(plan.at(i), dt) for i, dt in enumerate((plan.grid[1:] - plan.grid[:-1]).tolist())]

    def step(self, model, state, c, noise=None):
        return State(axpy(state.x, c.dt, model(state.x, c.s).velocity))

    def adjoint_step(self, model, adj, grid, i):
        """Explicit Euler on the continuous adjoint ODE (see :func:`euler_adjoint_step`)."""
        return euler_adjoint_step(model, adj, grid, i)


def euler_adjoint_step(model, adj, grid, i):
    """Explicit Euler on ``da/dt = -F_x^T a``, ``d a_in/dt = -F_in^T a`` from ``t_{i+1}`` back to ``t_i``:

    ``a_i = a_{i+1} + dt F_x(x_{i+1}, t_{i+1})^T a_{i+1}``, ``a_in,i = a_in,i+1 + dt F_in^T a_{i+1}``, ``dt = t_{i+1} - t_i``,

    with ``x_{i+1}`` the recorded forward state and ``F`` the drift (``u``, or ``2u - f x`` for the
    reverse SDE). Order 1; it differs from the exact discrete adjoint of Euler (which evaluates the
    Jacobian at ``x_i``) by ``O(dt)``. A step ending where ``sigma = 0`` (infinite drift on a VP path)
    evaluates at ``(x_i, t_i)`` instead, i.e. it is the exact adjoint of that Euler step.
    """
    from ..adjoint.equations import AdjointState, drift_vjp

    j = i if model.sigma[i + 1] == 0.0 else i + 1
    dt = model.times[i + 1] - model.times[i]
    vx, vin = drift_vjp(model, model.x(j), j, adj.a)
    return AdjointState(axpy(adj.a, dt, vx), tuple(axpy(p, dt, v) for p, v in zip(adj.inputs, vin)))
