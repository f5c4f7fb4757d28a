"""Heun's method (explicit trapezoid) on the probability-flow ODE (order 2, 2 NFE/step)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..plan import At
from .base import Solver, State, axpy

__all__ = ["Heun"]


class HeunRow(NamedTuple):
    s: At  # model evaluation at t_i
    t: At  # model evaluation at t_{i+1}
    dt: float  # t_{i+1} - t_i
    half_dt: float  # dt / 2
    euler: bool  # the step ends where sigma = 0 (infinite drift): Euler instead


@dataclass(frozen=True)
class Heun(Solver):
    """Heun / explicit trapezoid on the PF-ODE in our time ``t``:

    ``x' = x_i + dt u(x_i, t_i)``, ``x_{i+1} = x_i + dt/2 (u(x_i, t_i) + u(x', t_{i+1}))``.

    This is the update of Karras et al. 2022, Alg. 1, but taken in ``t`` rather than in EDM's noise level
    ``sigma`` (and without EDM's ``1/alpha`` scaling), so on VE/EDM it does not reproduce k-diffusion's
    ``sample_heun`` (the two agree to the method's order, not step for step). A step that ends where
    ``sigma = 0`` (the data end of a VP path) has an infinite drift there, so it falls back to Euler, as
    EDM does for its last step. Global order 2.
    """

    order = 2
    nfe_per_step = 2

    def rows(self, plan):
        dt = plan.grid[1:] - plan.grid[:-1]
        euler = (plan.end.sigma == 0).tolist()
        return [HeunRow(plan.at(i), plan.at(i + 1), d, 0.5 * d, e) for i, (d, e) in enumerate(zip(dt.tolist(), euler))]

    def step(self, model, state, c, noise=None):
        u = model(state.x, c.s).velocity
        x_euler = axpy(state.x, c.dt, u)
        if c.euler:
            return State(x_euler)
        u_next = model(x_euler, c.t).velocity
        return State(axpy(state.x, c.half_dt, u + u_next))

    def adjoint_step(self, model, adj, grid, i):
        """Heun on the continuous adjoint ODE ``da/dt = -u_x^T a`` from ``t_{i+1}`` back to ``t_i``
        along the recorded states (2 VJPs/step, order 2):

        ``k1 = u_x(x_{i+1}, t_{i+1})^T a_{i+1}``, ``a' = a_{i+1} + dt k1``, ``k2 = u_x(x_i, t_i)^T a'``,
        ``a_i = a_{i+1} + dt/2 (k1 + k2)`` (and the same trapezoid for the input gradients),
        ``dt = t_{i+1} - t_i``. Like the forward step, a step ending where ``sigma = 0`` is Euler.
        """
        from ..adjoint.equations import AdjointState, drift_vjp
        from .euler import euler_adjoint_step

        if model.sigma[i + 1] == 0.0:
            return euler_adjoint_step(model, adj, grid, i)
        dt = model.times[i + 1] - model.times[i]
        k1, k1_in = drift_vjp(model, model.x(i + 1), i + 1, adj.a)
        a_pred = axpy(adj.a, dt, k1)
        k2, k2_in = drift_vjp(model, model.x(i), i, a_pred)
        inputs = tuple(axpy(p, 0.5 * dt, u + v) for p, u, v in zip(adj.inputs, k1_in, k2_in))
        return AdjointState(axpy(adj.a, 0.5 * dt, k1 + k2), inputs)
