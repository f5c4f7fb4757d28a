"""Heun's method (explicit trapezoid) on the probability-flow ODE (order 2, 2 NFE/step)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Solver, State

__all__ = ["Heun"]


@dataclass(frozen=True)
class Heun(Solver):
    """Heun / explicit trapezoid (Karras et al. 2022, Alg. 1):

    ``x' = x_i + dt u(x_i, t_i)``, ``x_{i+1} = x_i + dt/2 (u(x_i, t_i) + u(x', t_{i+1}))``.

    A step that ends where ``sigma = 0`` (the data end of a VP path) has an infinite drift there,
    so it falls back to Euler, as EDM does for its last step. Global order 2.
    """

    order = 2
    nfe_per_step = 2

    def step(self, model, state, grid, i, noise=None):
        t, t_next = grid[i], grid[i + 1]
        dt = float(t_next - t)
        u = model(state.x, t).velocity
        x_euler = torch.add(state.x, u, alpha=dt)
        if float(model.schedule.sigma(t_next)) == 0.0:
            return State(x_euler)
        u_next = model(x_euler, t_next).velocity
        return State(torch.add(state.x, u + u_next, alpha=0.5 * dt))

    def adjoint_step(self, model, adj, grid, i):
        """Heun on the continuous adjoint ODE ``da/dt = -u_x^T a`` from ``t_{i+1}`` back to ``t_i``
        along the recorded states (2 VJPs/step, order 2):

        ``k1 = u_x(x_{i+1}, t_{i+1})^T a_{i+1}``, ``a' = a_{i+1} + dt k1``, ``k2 = u_x(x_i, t_i)^T a'``,
        ``a_i = a_{i+1} + dt/2 (k1 + k2)`` (and the same trapezoid for the input gradients),
        ``dt = t_{i+1} - t_i``. Like the forward step, a step ending where ``sigma = 0`` is Euler.
        """
        from ..adjoint.equations import AdjointState, drift_vjp
        from .euler import euler_adjoint_step

        t, t_next = grid[i], grid[i + 1]
        if float(model.schedule.sigma(t_next)) == 0.0:
            return euler_adjoint_step(model, adj, grid, i)
        dt = (t_next - t).to(adj.a.dtype)
        k1, k1_in = drift_vjp(model, model.x(i + 1), t_next, adj.a)
        a_pred = adj.a + dt * k1
        k2, k2_in = drift_vjp(model, model.x(i), t, a_pred)
        inputs = tuple(p + 0.5 * dt.to(u.dtype) * (u + v) for p, u, v in zip(adj.inputs, k1_in, k2_in))
        return AdjointState(adj.a + 0.5 * dt * (k1 + k2), inputs)
