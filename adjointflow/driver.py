"""``solve``: the one driver loop shared by every solver and gradient strategy."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .errors import NonFiniteError
from .grids import validate_grid
from .models import Denoiser, Prediction
from .solvers.base import Solver, State

__all__ = ["solve", "Solution", "StepInfo", "Problem", "ModelCall", "integrate", "resolve_noise"]


@dataclass
class Solution:
    """Result of :func:`solve`: final state ``x``, optional ``trajectory`` of shape ``(len(grid), *x.shape)``,
    the number of network evaluations ``nfe`` and the float64 ``grid`` that was used."""

    x: Tensor
    trajectory: Tensor | None
    nfe: int
    grid: Tensor
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StepInfo:
    """What a per-step ``callback`` sees: step ``i`` from ``t`` to ``t_next``, the state before
    (``x``) and after (``x_next``) the solver's update. Returning a tensor replaces ``x_next``."""

    i: int
    t: Tensor
    t_next: Tensor
    x: Tensor
    x_next: Tensor


class ModelCall:
    """``model(x, t) -> Prediction`` as solvers see it: ``cond`` bound, NFE counted, NaN/Inf caught.

    ``step`` is set by the loop so a non-finite output can name the step it came from.
    """

    def __init__(self, denoiser: Denoiser, cond=None):
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.cond = cond
        self.nfe = 0
        self.step = None

    def __call__(self, x: Tensor, t) -> Prediction:
        self.nfe += 1
        pred = self.denoiser(x, t, self.cond)
        if not all_finite(pred.raw):
            raise NonFiniteError(
                f"the model returned NaN/Inf at step {self.step} (t={float(t):.6g})", step=self.step, t=float(t)
            )
        return pred


@dataclass
class Problem:
    """Everything a gradient strategy needs to run (and re-run) a solve."""

    denoiser: Denoiser
    x: Tensor
    grid: Tensor
    solver: Solver
    cond: Any = None
    noise: Any = None
    callback: Callable | None = None
    save_trajectory: bool = False
    progress: bool = False

    def model(self) -> ModelCall:
        return ModelCall(self.denoiser, self.cond)


def all_finite(x: Tensor) -> bool:
    """True iff every entry of ``x`` is finite.

    A sum is NaN/Inf whenever an entry is, and costs one reduction instead of a full boolean
    tensor (this check runs after every network call); only an overflowing sum of finite
    entries needs the exact check.
    """
    if math.isfinite(float(x.detach().sum())):
        return True
    return bool(torch.isfinite(x).all())


def _check_finite(x: Tensor, i: int, t) -> None:
    if not all_finite(x):
        raise NonFiniteError(f"the solver update produced NaN/Inf at step {i} (t={float(t):.6g})", step=i, t=float(t))


def integrate(problem: Problem, model: ModelCall, state: State, start: int = 0, stop: int | None = None,
              trajectory: list | None = None) -> State:
    """Run steps ``start .. stop-1`` of ``problem`` from ``state``; optionally collect each new
    ``x`` into ``trajectory``."""
    grid, solver, noise, cb = problem.grid, problem.solver, problem.noise, problem.callback
    stop = len(grid) - 1 if stop is None else stop
    steps = range(start, stop)
    bar = None
    if problem.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), desc=type(solver).__name__, leave=False)
    try:
        for i in steps:
            model.step = i
            new = solver.step(model, state, grid, i, noise)
            if cb is not None:
                out = cb(StepInfo(i, grid[i], grid[i + 1], state.x, new.x))
                if out is not None:
                    if not isinstance(out, Tensor) or out.shape != new.x.shape:
                        raise ValueError("a solve callback must return None or a tensor shaped like x")
                    new = new.with_x(out)
            _check_finite(new.x, i, grid[i + 1])
            state = new
            if trajectory is not None:
                trajectory.append(state.x)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return state


def check_sample(x, name: str = "x") -> None:
    """``x`` must be a floating-point tensor of shape ``(batch, *dims)`` with ``batch >= 1``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (batch, *dims) with batch >= 1, got {tuple(x.shape)}")


def _check_cond(cond, x: Tensor, name: str = "cond") -> None:
    if cond is None:
        return
    if isinstance(cond, Mapping):
        for k, v in cond.items():
            _check_cond(v, x, f"{name}[{k!r}]")
        return
    if not isinstance(cond, Tensor):
        raise TypeError(f"{name} must be a tensor or a dict of tensors, got {type(cond).__name__}")
    if cond.ndim == 0 or cond.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name} must have the batch size of x ({x.shape[0]}) as its first dimension, got shape {tuple(cond.shape)}"
        )
    if cond.device != x.device:
        raise ValueError(f"{name} is on device {cond.device} but x is on device {x.device}")
    if cond.is_floating_point() and cond.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {cond.dtype} but x has {x.dtype}; cast one of them")


def resolve_noise(solver: Solver, noise, x: Tensor, grid: Tensor, name: str = "x"):
    """The noise a stochastic solver draws from, checked against the state's shape, dtype and device;
    ``None`` for deterministic solvers (which refuse a noise). The default is a ``BrownianNoise`` whose
    seed is drawn from torch's global (CPU) generator, so ``torch.manual_seed`` reproduces it."""
    from .noise import BrownianNoise

    if not solver.stochastic:
        if noise is not None:
            raise ValueError(f"{type(solver).__name__} is deterministic; it takes no noise")
        return None
    if bool(grid[1] > grid[0]):
        raise ValueError(f"{type(solver).__name__} integrates the reverse-time SDE and needs a decreasing grid")
    if noise is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # once per solve, on the host generator
        return BrownianNoise(tuple(x.shape), seed=seed, dtype=x.dtype, device=x.device)
    if not callable(noise):
        raise TypeError(f"noise must be a BrownianNoise (callable as noise(t, t_next)), got {type(noise).__name__}")
    if tuple(getattr(noise, "shape", x.shape)) != tuple(x.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)} but {name} has {tuple(x.shape)}")
    if getattr(noise, "dtype", x.dtype) != x.dtype:
        raise TypeError(f"noise has dtype {noise.dtype} but {name} has {x.dtype}; build it with dtype={x.dtype}")
    if torch.device(getattr(noise, "device", x.device)) != x.device:
        raise ValueError(f"noise is on device {noise.device} but {name} is on device {x.device}")
    return noise


def solve(
    denoiser: Denoiser,
    x: Tensor,
    grid,
    solver: Solver,
    *,
    cond=None,
    gradient=None,
    noise=None,
    save_trajectory: bool = False,
    progress: bool = False,
    callback: Callable[[StepInfo], Tensor | None] | None = None,
) -> Solution:
    """Integrate ``x`` from ``grid[0]`` to ``grid[-1]`` with ``solver`` under ``denoiser``.

    ``grid`` is a strictly monotone 1-D sequence in ``[0, 1]``: decreasing to sample (noise to data),
    increasing to invert (ODE solvers only). ``cond`` (tensor or dict of tensors, batch-first) is
    passed to the network. ``gradient`` picks how gradients flow back (default
    :class:`~adjointflow.adjoint.Backprop`, plain autograd). Stochastic solvers draw from ``noise``
    (a :class:`~adjointflow.noise.BrownianNoise`; default: one seeded with 0). ``callback(StepInfo)``
    runs after every step and may return a replacement state (guidance uses it).

    Returns a :class:`Solution`. Raises :class:`~adjointflow.errors.NonFiniteError` naming the step
    and time if the model returns NaN/Inf.
    """
    from .adjoint.strategies import Backprop, GradientStrategy

    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be an adjointflow.Denoiser, got {type(denoiser).__name__}")
    if isinstance(solver, type):
        raise TypeError(f"solver must be an instance, e.g. {solver.__name__}(), not the class itself")
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be an adjointflow Solver instance, got {type(solver).__name__}")
    check_sample(x)
    grid = validate_grid(grid)
    _check_cond(cond, x)
    gradient = Backprop() if gradient is None else gradient
    if isinstance(gradient, type):
        raise TypeError(f"gradient must be an instance, e.g. {gradient.__name__}(), not the class itself")
    if not isinstance(gradient, GradientStrategy):
        raise TypeError(f"gradient must be a gradient strategy (Backprop(), Checkpoint(), ...), got {gradient!r}")
    noise = resolve_noise(solver, noise, x, grid)
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    problem = Problem(denoiser, x, grid, solver, cond, noise, callback, save_trajectory, progress)
    return gradient.run(problem)
