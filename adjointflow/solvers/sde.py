"""Euler--Maruyama on the reverse-time diffusion SDE (Song et al. 2021)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Solver, State

__all__ = ["EulerMaruyama"]


@dataclass(frozen=True)
class EulerMaruyama(Solver):
    """Euler--Maruyama for the reverse SDE ``dx = [f x - g^2 grad log p_t] dt + g dW``, ``t`` decreasing:

    ``x_{i+1} = x_i + (f x_i + g^2/sigma eps_hat) dt + g(t_i) (W(t_{i+1}) - W(t_i))`` with ``dt < 0``.

    The noise is additive (``g`` depends on ``t`` only), so EM converges pathwise with strong order 1
    on a fixed Brownian path (Kloeden & Platen 1992, §10.2). Increments come from
    :class:`~adjointflow.noise.BrownianNoise`, so a run can be replayed exactly.
    """

    stochastic = True

    def step(self, model, state, grid, i, noise=None):
        if noise is None:
            raise ValueError("EulerMaruyama.step needs a noise source (BrownianNoise)")
        t, t_next = grid[i], grid[i + 1]
        sch, x = model.schedule, state.x
        eps = model(x, t).eps
        f = sch.f(t).to(x.dtype)
        g2 = sch.g2(t)
        g2_over_sigma = (g2 / sch.sigma(t)).to(x.dtype)
        g = g2.sqrt().to(x.dtype)
        dt = (t_next - t).to(x.dtype)
        dw = noise(t, t_next).to(device=x.device, dtype=x.dtype)
        return State(x + (f * x + g2_over_sigma * eps) * dt + g * dw)
