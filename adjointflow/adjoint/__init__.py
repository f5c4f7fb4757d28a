"""Gradients through sampling: strategies for ``solve(..., gradient=...)`` and the explicit adjoint.

* :class:`Backprop` -- plain autograd; :class:`Checkpoint` -- the exact discrete adjoint with one
  step's graph alive at a time; :class:`ContinuousAdjoint` -- the continuous adjoint (AdjointDEIS for
  exponential integrators, the solver's own scheme for Euler/Heun).
* :func:`adjoint` / ``solver.adjoint(...)`` -- the same gradients without calling ``.backward()``.
* :class:`~adjointflow.adjoint.memory.PeakMemory` -- peak live tensor bytes (for benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .memory import PeakMemory
from .strategies import Backprop, Checkpoint, ContinuousAdjoint, GradientStrategy

__all__ = ["Backprop", "Checkpoint", "ContinuousAdjoint", "GradientStrategy", "adjoint", "AdjointResult",
           "PeakMemory"]


@dataclass
class AdjointResult:
    """Gradients of ``<grad_end, x_end>``: ``x`` w.r.t. the start latent, ``cond`` in ``cond``'s structure
    (tensor, dict of tensors for its floating-point entries, or ``None``), ``params`` one per parameter
    (in order), and the backward cost ``nfe`` (network evaluations) / ``nvjp`` (vector-Jacobian products)."""

    x: Tensor
    cond: Any
    params: tuple[Tensor, ...]
    nfe: int
    nvjp: int


def _structure_cond(cond, grads):
    from .equations import cond_leaves

    if cond is None:
        return None
    keys = [k for k, _ in cond_leaves(cond)]
    if isinstance(cond, Tensor):
        return grads[0] if keys else None
    return dict(zip(keys, grads))


def adjoint(solver, denoiser, grid, x_end: Tensor, grad_end: Tensor, cond=None, params=None, *,
            x_start: Tensor | None = None, trajectory: Tensor | None = None, noise=None,
            gradient: GradientStrategy | None = None) -> AdjointResult:
    """Gradients of ``L = <grad_end, x_end>`` w.r.t. the start latent, ``cond`` and ``params`` for the solve
    ``x_end = solve(denoiser, x_start, grid, solver, cond=cond, noise=noise)``, without ``.backward()``.

    The forward states come from ``trajectory`` (``solve(..., save_trajectory=True).trajectory``), else
    from replaying the solve from ``x_start`` (with the same ``noise`` for an SDE), else (ODE solvers
    only) from re-solving backwards from ``x_end`` over the reversed grid, which adds that inversion's
    error (AdjointDPM's approach; Pan et al. 2024). ``gradient`` is the strategy: :class:`ContinuousAdjoint`
    (default; its ``form``/``order`` are used, ``params`` comes from this call) or :class:`Checkpoint` /
    :class:`Backprop` (exact discrete gradients; need ``x_start``). ``params`` defaults to every parameter
    of ``denoiser`` that requires grad. The continuous-adjoint result equals what ``.backward()`` gives
    with ``solve(..., gradient=ContinuousAdjoint())`` on the same states.
    """
    from ..driver import Problem, _check_cond, solve
    from ..grids import validate_grid
    from ..models import Denoiser
    from ..solvers.base import Solver
    from .equations import AdjointModel, check_params, cond_leaves, default_params, integrate_adjoint, with_cond_leaves
    from .strategies import _needs_adjoint_step, record_states

    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be an adjointflow Solver instance, got {type(solver).__name__}")
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be an adjointflow.Denoiser, got {type(denoiser).__name__}")
    for name, v in (("x_end", x_end), ("grad_end", grad_end)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(v).__name__}")
    if grad_end.shape != x_end.shape:
        raise ValueError(f"grad_end must have the shape of x_end {tuple(x_end.shape)}, got {tuple(grad_end.shape)}")
    if grad_end.dtype != x_end.dtype:
        raise TypeError(f"grad_end has dtype {grad_end.dtype} but x_end has {x_end.dtype}")
    grid = validate_grid(grid)
    _check_cond(cond, x_end)
    gradient = ContinuousAdjoint() if gradient is None else gradient
    if not isinstance(gradient, GradientStrategy):
        raise TypeError(f"gradient must be a strategy instance (ContinuousAdjoint(), Checkpoint(), ...), got {gradient!r}")
    params = default_params(denoiser) if params is None else check_params(params)
    keys = [k for k, _ in cond_leaves(cond)]
    grad_end = grad_end.detach()

    if not isinstance(gradient, ContinuousAdjoint):  # exact discrete gradients by autograd
        if x_start is None:
            raise ValueError(f"{type(gradient).__name__} needs x_start to replay the solve")
        xl = x_start.detach().requires_grad_(True)
        cl = [v.detach().requires_grad_(True) for _, v in cond_leaves(cond)]
        with torch.enable_grad():
            sol = solve(denoiser, xl, grid, solver, cond=with_cond_leaves(cond, keys, cl), noise=noise, gradient=gradient)
            wrt = [xl, *cl, *params]
            grads = torch.autograd.grad(sol.x, wrt, grad_end, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
        n_in = len(cl)
        return AdjointResult(grads[0], _structure_cond(cond, grads[1:1 + n_in]), tuple(grads[1 + n_in:]),
                             sol.nfe, 0)

    _needs_adjoint_step(solver)
    if trajectory is not None:
        if not isinstance(trajectory, Tensor) or trajectory.shape != (len(grid), *x_end.shape):
            raise ValueError(f"trajectory must be a tensor of shape {(len(grid), *x_end.shape)} (one state per grid "
                             f"time), got {getattr(trajectory, 'shape', type(trajectory).__name__)}")
        xs = list(trajectory.detach().unbind(0))
    elif x_start is not None:
        if not isinstance(x_start, Tensor) or x_start.shape != x_end.shape:
            raise ValueError("x_start must be a tensor shaped like x_end")
        if solver.stochastic and noise is None:
            raise ValueError("replaying an SDE solve needs the noise object of the forward pass (noise=...)")
        xs, _ = record_states(Problem(denoiser, x_start, grid, solver, cond, noise))
    else:
        if solver.stochastic:
            raise ValueError(f"{type(solver).__name__} is stochastic: its states cannot be re-solved backwards; "
                             "pass trajectory= or x_start= and noise=")
        with torch.no_grad():
            back = solve(denoiser, x_end.detach(), grid.flip(0), solver, cond=cond, save_trajectory=True)
        xs = list(back.trajectory.flip(0).unbind(0))
    from .thresholds import warn_if_too_few_steps

    warn_if_too_few_steps(solver, gradient.form, gradient.order, len(grid) - 1)
    model = AdjointModel(denoiser, xs, cond, params, sde=solver.stochastic, form=gradient.form, order=gradient.order)
    adj = integrate_adjoint(solver, model, grid, grad_end)
    n_in = len(keys)
    return AdjointResult(adj.a, _structure_cond(cond, adj.inputs[:n_in]), tuple(adj.inputs[n_in:]),
                         model.nfe, model.nvjp)
