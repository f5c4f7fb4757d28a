"""Gradient strategies and adjoint solvers (see ``strategies.py``)."""
from .strategies import Backprop, GradientStrategy

__all__ = ["Backprop", "GradientStrategy", "adjoint"]


def adjoint(solver, denoiser, grid, x_end, grad_end, cond=None, params=None, **kwargs):
    """Explicit continuous adjoint: not built yet (see the gradients issue)."""
    raise NotImplementedError("the explicit adjoint API is not built yet; use gradient=Backprop()")
