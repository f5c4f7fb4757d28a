"""Euler's method on the probability-flow ODE ``dx/dt = u(x, t)`` (order 1, 1 NFE/step)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Solver, State

__all__ = ["Euler", "euler_adjoint_step"]


@dataclass(frozen=True)
class Euler(Solver):
    """Explicit Euler on the PF-ODE: ``x_{i+1} = x_i + (t_{i+1} - t_i) u(x_i, t_i)``.

    ``u`` is the PF-ODE drift (flow-matching velocity), so for ``LinearFlow`` this is the usual
    flow-matching Euler sampler; for VE/EDM it equals k-diffusion's ``sample_euler``
    (Karras et al. 2022, Alg. 2 without churn). Global order 1.
    """

    def step(self, model, state, grid, i, noise=None):
        t, dt = grid[i], float(grid[i + 1] - grid[i])
        u = model(state.x, t).velocity
        return State(torch.add(state.x, u, alpha=dt))

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

    t, t_next = grid[i], grid[i + 1]
    j = i if float(model.schedule.sigma(t_next)) == 0.0 else i + 1
    dt = (t_next - t).to(adj.a.dtype)
    vx, vin = drift_vjp(model, model.x(j), grid[j], adj.a)
    return AdjointState(adj.a + dt * vx, tuple(p + dt.to(v.dtype) * v for p, v in zip(adj.inputs, vin)))
