"""The ``Solver`` protocol: a small immutable object that declares its order, plans its coefficients
once per solve and takes one step.

One driver loop (:func:`adjointflow.solve`) owns iteration, NFE counting, NaN/Inf checks, saving the
trajectory and gradient modes. A solver provides

* ``rows(plan) -> list``: one row per step, from the float64 :class:`~adjointflow.plan.Plan` of the
  schedule on the grid (``plan.start``/``plan.end`` nodes, :meth:`~adjointflow.plan.Plan.stage` for
  intermediate times). A row is a ``NamedTuple`` whose fields are Python ``float`` coefficients,
  static decisions (``int``/``bool``/``str``: the order of this step, a first-order fallback, ...) and
  :class:`~adjointflow.plan.At` evaluation points. Everything that depends only on the schedule and the
  grid is computed here, vectorised, never in the step.
* ``step(model, state, c, noise=None) -> State``: advance ``state`` by one step reading only the row
  ``c`` (bound by the driver: ``At`` fields are :class:`~adjointflow.models.EvalPoint` s to call the model
  at, ``model(x, c.s)``; floats are 0-dim tensors of the state's dtype and device, so write ``c.a * x``
  or :func:`axpy`/:func:`lin`, never ``float(c.a)``). ``noise`` is the Brownian increment ``W(t_{i+1}) - W(t_i)``
  (a tensor shaped like ``x``) for stochastic solvers, ``None`` otherwise. A step must not read tensors
  on the host (``float(t)``, ``bool(x)``, ``.item()``): that synchronises with the device.

Multistep history travels inside the state (never on the solver object), so a step is a pure
function of ``(state, row, noise)`` and solving twice gives the same answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from ..models import Prediction
    from ..plan import Plan

__all__ = ["State", "Solver", "ModelFn", "axpy", "lin"]

#: ``model(x, t) -> Prediction``: the denoiser with ``cond`` bound, NFE counted and outputs recorded.
ModelFn = Callable[[Tensor, object], "Prediction"]


def axpy(x: Tensor, a, u: Tensor) -> Tensor:
    """``x + a u`` in one kernel, for a row coefficient ``a`` (0-dim tensor) or a Python float."""
    return torch.add(x, u, alpha=a) if isinstance(a, float) else torch.addcmul(x, a, u)


def lin(a, x: Tensor, b, y: Tensor) -> Tensor:
    """``a x + b y`` for 0-dim tensor coefficients ``a``, ``b`` (two kernels)."""
    return torch.addcmul(a * x, b, y)


class State(NamedTuple):
    """Solver state at one grid time: the sample ``x`` and solver-specific ``history`` tensors.

    ``history`` holds what a multistep method carries between steps (e.g. previous data
    predictions, newest first); its times are implied by the grid. Only tensors live here, so a
    gradient strategy can store, restore and differentiate through a state generically. (A named
    tuple: immutable, and built at every step at the cost of a tuple.)
    """

    x: Tensor
    history: tuple = ()

    def tensors(self) -> tuple[Tensor, ...]:
        """``(x, *history)``: the state as a flat tuple (what gradient strategies store and differentiate)."""
        return (self.x, *self.history)

    @staticmethod
    def from_tensors(ts) -> "State":
        """Inverse of :meth:`tensors`."""
        ts = tuple(ts)
        return State(ts[0], ts[1:])

    def with_x(self, x: Tensor) -> "State":
        """The same state with its sample replaced (history kept)."""
        return State(x, self.history)


@dataclass(frozen=True)
class Solver:
    """Base class of all solvers (frozen dataclass; ``nn.Module`` only for learned solvers).

    Subclasses set ``order`` (convergence order of the global error), ``stochastic`` (integrates the
    reverse SDE and takes a ``noise`` increment), ``nfe_per_step`` and implement :meth:`rows` and
    :meth:`step` (module docstring).
    """

    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = False
    nfe_per_step: ClassVar[int] = 1

    def plan(self, schedule, grid: Tensor) -> "Plan":
        """The float64 plan of this solver on ``grid`` (a validated float64 CPU grid), rows included."""
        from ..plan import Plan

        plan = Plan(schedule, grid)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf/NaN mark singular ends on purpose
            plan.rows = list(self.rows(plan))
        return plan

    def rows(self, plan: "Plan") -> list:
        """One row per step of ``plan`` (see the module docstring)."""
        raise NotImplementedError

    def init(self, model: ModelFn, x: Tensor, grid: Tensor) -> State:
        """State at ``grid[0]`` (no history for single-step methods)."""
        return State(x)

    def step(self, model: ModelFn, state: State, c, noise: Tensor | None = None) -> State:
        """Advance ``state`` by the step whose row is ``c``."""
        raise NotImplementedError

    def step_at(self, model: ModelFn, state: State, grid, i: int, noise=None) -> State:
        """One step from ``grid[i]`` to ``grid[i + 1]`` outside :func:`~adjointflow.solve` (plans the whole
        grid for this one step: for inspection and tests). ``noise`` is a ``BrownianNoise`` for stochastic
        solvers; ``state.history`` may be shorter than in a solve (the step then uses a lower order)."""
        from ..grids import validate_grid

        grid = validate_grid(grid)
        if len(state.history) > i:
            raise ValueError(
                f"{type(self).__name__}: state.history has {len(state.history)} entries at step {i}; a state at "
                f"grid[{i}] can carry at most {i} earlier predictions")
        from ..plan import Plan

        plan = Plan(model.schedule, grid)
        plan.history = {i: len(state.history)}
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            plan.rows = list(self.rows(plan))
        row = plan.bind(model.denoiser, state.x).rows[i]
        dw = None
        if self.stochastic:
            if noise is None:
                raise ValueError(f"{type(self).__name__}.step_at needs a noise source (BrownianNoise)")
            dw = noise(grid[i], grid[i + 1]).to(device=state.x.device, dtype=state.x.dtype)
        return self.step(model, state, row, dw)

    def adjoint_step(self, *args, **kwargs):
        """One step of this solver's continuous-adjoint scheme (used by ``ContinuousAdjoint``)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no continuous-adjoint step; use gradient=Checkpoint() or Backprop()"
        )

    # --- convenience -----------------------------------------------------------------------
    def solve(self, denoiser, x: Tensor, grid, **kwargs):
        """``adjointflow.solve(denoiser, x, grid, self, **kwargs)``."""
        from ..driver import solve

        return solve(denoiser, x, grid, self, **kwargs)

    def adjoint(self, denoiser, grid, x_end: Tensor, grad_end: Tensor, cond=None, params=None, **kwargs):
        """Gradients of ``<grad_end, x_end>`` w.r.t. the start latent, ``cond`` and ``params``
        for a solve of this solver over ``grid`` that ended in ``x_end`` (see ``adjointflow.adjoint``)."""
        from ..adjoint import adjoint

        return adjoint(self, denoiser, grid, x_end, grad_end, cond=cond, params=params, **kwargs)
