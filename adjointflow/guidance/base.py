"""What every guidance method shares: the result type, input validation, objective evaluation,
and exact counting of network evaluations (NFE) and vector-Jacobian products (VJPs) through the network.

Every method is a frozen dataclass constructible without arguments, with
``run(denoiser, objective, x_init, cond=None) -> GuidanceResult``.

Objectives are callables ``objective(x0) -> (batch,)`` (lower is better). An objective whose
attribute ``time_dependent`` is true is called as ``objective(x0_hat, t)`` by the per-step methods
(DPS, FlowChef); e.g. an exact Gaussian likelihood ``p(y | x_t)`` whose variance depends on ``t``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..driver import _check_cond, check_sample
from ..errors import NonFiniteError
from ..grids import timesteps, validate_grid
from ..models import Denoiser

__all__ = ["GuidanceResult", "Counter", "CountedDenoiser", "evaluate_objective", "check_run_inputs", "sampling_grid",
           "resolve_noise", "progress_bar", "Timer"]


@dataclass
class GuidanceResult:
    """Outcome of a guidance run.

    * ``x``: the final clean sample ``(batch, *dims)`` (detached).
    * ``latent``: the start latent at ``grid[0]`` that produced ``x`` (optimised by DFlow and
      AdjointGuidance; the given ``x_init`` for DPS and FlowChef).
    * ``losses``: float64 ``(records, batch)`` objective history (per step for DPS/FlowChef at the
      clean estimate, per objective evaluation/iteration for DFlow/AdjointGuidance); the last row is
      always the objective at the returned ``x``.
    * ``nfe``: network evaluations in total (forward, including recomputation by checkpointing).
    * ``vjps``: vector-Jacobian products through the network (backward passes through a network call).
    * ``seconds``: wall time of the run.
    * ``cond``: the (optimised) conditioning, where a method optimises it (else the given one).
    """

    x: Tensor
    latent: Tensor
    losses: Tensor
    nfe: int
    vjps: int
    seconds: float
    cond: Any = None


# --- exact NFE / VJP counting -----------------------------------------------------------------
class Counter:
    """Mutable tally owned by one run: ``nfe`` network calls, ``vjps`` backward passes through them."""

    def __init__(self):
        self.nfe = 0
        self.vjps = 0


class _CountVJP(torch.autograd.Function):
    """Identity on the network output whose backward counts one VJP through the network."""

    @staticmethod
    def forward(raw, counter):
        return raw.view_as(raw)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.counter = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.vjps += 1
        return grad, None


class CountedDenoiser(Denoiser):
    """``denoiser`` with every network call and every backward pass through one counted in ``counter``.

    Shares the wrapped denoiser's network and parameters; outputs are identical.
    """

    def __init__(self, denoiser: Denoiser, counter: Counter):
        Denoiser.__init__(self, denoiser.net, denoiser.schedule, denoiser.prediction, denoiser.net_time,
                          denoiser.noise_at_zero)
        self.inner = denoiser
        self.counter = counter

    # NFE is counted before the call: checkpointing's recomputation may stop right after the
    # network returns (torch's early stop), and that evaluation still happened.
    def _count(self, raw: Tensor) -> Tensor:
        return _CountVJP.apply(raw, self.counter) if raw.requires_grad else raw

    def raw(self, x, t, cond=None):
        self.counter.nfe += 1
        return self._count(self.inner.raw(x, t, cond))

    def forward(self, x, t, cond=None):
        self.counter.nfe += 1
        pred = self.inner(x, t, cond)
        return dataclasses.replace(pred, raw=self._count(pred.raw))


# --- validation -------------------------------------------------------------------------------
def check_run_inputs(denoiser, objective, x_init, cond=None) -> None:
    """Type/shape checks shared by every ``run``; probes the objective once on ``x_init``'s shape."""
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be an adjointflow.Denoiser, got {type(denoiser).__name__}")
    if isinstance(objective, type) or not callable(objective):
        raise TypeError(f"objective must be a callable x0 -> (batch,) loss (an instance), got {objective!r}")
    check_sample(x_init, "x_init")
    if x_init.ndim < 2:
        raise ValueError(f"x_init must have shape (batch, *dims) with batch >= 1, got {tuple(x_init.shape)}")
    if not bool(torch.isfinite(x_init).all()):
        raise ValueError("x_init contains NaN/Inf")
    _check_cond(cond, x_init)
    if not getattr(objective, "time_dependent", False):
        # fail before a long run: the same checks every later evaluation gets
        with torch.no_grad():
            evaluate_objective(objective, x_init.detach(), where="on a probe of x_init's shape")


def evaluate_objective(objective: Callable, x0: Tensor, t=None, where: str = "") -> Tensor:
    """``objective(x0)`` (or ``objective(x0, t)`` if time dependent), checked: a tensor of shape
    ``(batch,)`` with finite entries."""
    out = objective(x0, t) if getattr(objective, "time_dependent", False) else objective(x0)
    sfx = f" {where}" if where else ""
    if not isinstance(out, Tensor):
        raise TypeError(f"the objective must return a tensor of shape (batch,) = ({x0.shape[0]},), "
                        f"got {type(out).__name__}{sfx}")
    if tuple(out.shape) != (x0.shape[0],):
        raise ValueError(f"the objective must return one loss per sample, shape ({x0.shape[0]},), "
                         f"got {tuple(out.shape)}{sfx}")
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"the objective returned NaN/Inf{sfx}")
    return out


def check_positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def check_nonneg_float(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0) or v == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def sampling_grid(denoiser: Denoiser, steps: int, grid) -> Tensor:
    """``grid`` if given (validated, must decrease), else ``timesteps(schedule, steps)``."""
    if grid is None:
        check_positive_int("steps", steps)
        return timesteps(denoiser.schedule, steps)
    g = validate_grid(grid)
    if not bool(g[1] < g[0]):
        raise ValueError("guidance samples from noise to data: the grid must be decreasing")
    return g


def resolve_noise(solver, noise, x: Tensor, grid: Tensor):
    """The noise a stochastic solver draws from (see :func:`adjointflow.driver.resolve_noise`)."""
    from ..driver import resolve_noise as _resolve

    return _resolve(solver, noise, x, grid, name="x_init")


def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar, or a no-op stand-in when ``enabled`` is false."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def stack_losses(records: list[Tensor]) -> Tensor:
    return torch.stack([r.detach().to(torch.float64).cpu() for r in records])
