"""Euler's method on the probability-flow ODE ``dx/dt = u(x, t)`` (order 1, 1 NFE/step)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Solver, State

__all__ = ["Euler"]


@dataclass(frozen=True)
class Euler(Solver):
    """Explicit Euler on the PF-ODE: ``x_{i+1} = x_i + (t_{i+1} - t_i) u(x_i, t_i)``.

    ``u`` is the PF-ODE drift (flow-matching velocity), so for ``LinearFlow`` this is the usual
    flow-matching Euler sampler; for VE/EDM it equals k-diffusion's ``sample_euler``
    (Karras et al. 2022, Alg. 2 without churn). Global order 1.
    """

    def step(self, model, state, grid, i, noise=None):
        t, t_next = grid[i], grid[i + 1]
        u = model(state.x, t).velocity
        return State(state.x + (t_next - t).to(state.x.dtype) * u)
