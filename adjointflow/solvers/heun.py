"""Heun's method (explicit trapezoid) on the probability-flow ODE (order 2, 2 NFE/step)."""
from __future__ import annotations

from dataclasses import dataclass

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
        dt = (t_next - t).to(state.x.dtype)
        u = model(state.x, t).velocity
        x_euler = state.x + dt * u
        if float(model.schedule.sigma(t_next)) == 0.0:
            return State(x_euler)
        u_next = model(x_euler, t_next).velocity
        return State(state.x + 0.5 * dt * (u + u_next))
