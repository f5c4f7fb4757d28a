"""The ``Solver`` protocol: a small immutable object that declares its order and takes one step.

One driver loop (:func:`adjointflow.solve`) owns iteration, NFE counting, NaN checks, saving the
trajectory and gradient modes; a solver only maps a :class:`State` at ``grid[i]`` to the state at
``grid[i + 1]``. Multistep history travels inside the state (never on the solver object), so a
step is a pure function of ``(state, grid, i)`` and solving twice gives the same answer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, ClassVar

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from ..models import Prediction

__all__ = ["State", "Solver", "ModelFn"]

#: ``model(x, t) -> Prediction``: the denoiser with ``cond`` bound, NFE counted and outputs checked.
ModelFn = Callable[[Tensor, Tensor], "Prediction"]


@dataclass(frozen=True)
class State:
    """Solver state at one grid time: the sample ``x`` and solver-specific ``history`` tensors.

    ``history`` holds what a multistep method carries between steps (e.g. previous data
    predictions, newest first); its times are implied by the grid. Only tensors live here, so a
    gradient strategy can store, restore and differentiate through a state generically.
    """

    x: Tensor
    history: tuple[Tensor, ...] = ()

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
        return replace(self, x=x)


@dataclass(frozen=True)
class Solver:
    """Base class of all solvers (frozen dataclass; ``nn.Module`` only for learned solvers).

    Subclasses set ``order`` (convergence order of the global error), ``stochastic`` (integrates the
    reverse SDE and takes a ``noise`` argument), ``nfe_per_step`` and implement :meth:`step`.
    """

    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = False
    nfe_per_step: ClassVar[int] = 1

    def init(self, model: ModelFn, x: Tensor, grid: Tensor) -> State:
        """State at ``grid[0]`` (no history for single-step methods)."""
        return State(x)

    def step(self, model: ModelFn, state: State, grid: Tensor, i: int, noise=None) -> State:
        """Advance ``state`` from ``grid[i]`` to ``grid[i + 1]``."""
        raise NotImplementedError

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
