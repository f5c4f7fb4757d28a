"""Gradient strategies: how gradients flow back through :func:`adjointflow.solve`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GradientStrategy", "Backprop"]


class GradientStrategy:
    """Base class. ``run(problem)`` integrates ``problem`` and returns a ``Solution`` whose ``x`` is
    connected to the autograd graph in the strategy's own way."""

    def run(self, problem):  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Backprop(GradientStrategy):
    """Plain autograd through every step (discretise-then-optimise). The exact gradient of the
    solver that was run, for every tensor that affects the output; memory grows linearly with the
    number of steps (one network graph per NFE)."""

    def run(self, problem):
        from ..driver import Solution, integrate

        model = problem.model()
        state = problem.solver.init(model, problem.x, problem.grid)
        traj = [problem.x] if problem.save_trajectory else None
        state = integrate(problem, model, state, trajectory=traj)
        return Solution(state.x, torch.stack(traj) if traj is not None else None, model.nfe, problem.grid)
