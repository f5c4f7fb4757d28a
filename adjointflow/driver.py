"""``solve``: the one driver loop shared by every solver and gradient strategy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .finite import FiniteRecord, check_finite_mode
from .grids import validate_grid
from .models import Denoiser, EvalPoint, Prediction
from .plan import BoundPlan, bound_plan
from .schedules import as_time
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
    """``model(x, t) -> Prediction`` as solvers see it: ``cond`` bound, evaluations recorded.

    ``t`` is an :class:`~adjointflow.models.EvalPoint` of the solve's plan (precomputed network time and
    conversions: no schedule work, no host sync) or a time tensor (learned solvers, guidance). Each call
    is recorded in ``record`` (:class:`~adjointflow.finite.FiniteRecord`: NaN/Inf checks, checked after the
    loop so a bad output is named with its step and time); ``nfe`` counts the calls.
    """

    def __init__(self, denoiser: Denoiser, cond=None, check_finite=True):
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.kind = denoiser.prediction
        self.cond = cond
        self.record = FiniteRecord(check_finite)

    @property
    def nfe(self) -> int:
        return len(self.record.calls)

    def replay(self) -> "ModelCall":
        """The same model with a throwaway record (checkpointing's recomputation of recorded evaluations)."""
        # same check mode as the solve (a compiled step specialises on it); its record is never checked
        return ModelCall(self.denoiser, self.cond, self.record.mode)

    def __call__(self, x: Tensor, t) -> Prediction:
        raw = self.denoiser.raw(x, t, self.cond)
        self.record.model(raw, t)
        if type(t) is EvalPoint:
            return Prediction(x, t, raw, self.kind, t.conversion)
        return Prediction(x, as_time(t), raw, self.kind, self.schedule)


@dataclass
class Problem:
    """Everything a gradient strategy needs to run (and re-run) a solve: the inputs, the solver's
    :class:`~adjointflow.plan.BoundPlan` (``bound.rows[i]`` is step ``i``'s row) and the options."""

    denoiser: Denoiser
    x: Tensor
    grid: Tensor
    solver: Solver
    cond: Any = None
    noise: Any = None
    callback: Callable | None = None
    save_trajectory: bool = False
    progress: bool = False
    bound: BoundPlan | None = None
    check_finite: Any = True
    compile: Any = None  # a compiled.Compile (scope, backend, mode), or None for eager steps

    def __post_init__(self):
        if self.bound is None:
            self.bound = bound_plan(self.solver, self.denoiser, self.grid, self.x)

    def model(self) -> ModelCall:
        return ModelCall(self.denoiser, self.cond, self.check_finite)

    def step(self):
        """``step(model, state, row, noise)``: the solver's step, compiled with ``compile="step"``."""
        if self.compile is None or self.compile.scope != "step":
            return self.solver.step
        from .compiled import compiled_step

        return compiled_step(self.bound, self.solver, self.compile)

    @property
    def whole(self) -> bool:
        """Whether the loop runs as one compiled graph (``compile="solve"``)."""
        return self.compile is not None and self.compile.scope == "solve"


def integrate(problem: Problem, model: ModelCall, state: State, start: int = 0, stop: int | None = None,
              trajectory: list | None = None, step=None) -> State:
    """Run steps ``start .. stop-1`` of ``problem`` from ``state``; optionally collect each new ``x`` into
    ``trajectory``. ``step(model, state, row, noise)`` defaults to :meth:`Problem.step` (the solver's step,
    compiled with ``compile="step"``), or, with ``compile="solve"``, to the whole range as one compiled graph;
    an explicit ``step`` always runs the eager loop with it.

    The loop reads only host values (rows, Python-float times): NaN/Inf go to ``model.record`` and are
    checked after the loop (:meth:`~adjointflow.finite.FiniteRecord.check`), or after every step with
    ``check_finite="step"``.
    """
    rows, times, noise, cb = problem.bound.rows, problem.bound.plan.times, problem.noise, problem.callback
    stop = len(rows) if stop is None else stop
    if step is None and problem.whole:
        return _integrate_whole(problem, model, state, start, stop, trajectory)
    step = problem.step() if step is None else step
    record, x = model.record, state.x
    bar = None
    if problem.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop - start, desc=type(problem.solver).__name__, leave=False)
    try:
        for i in range(start, stop):
            dw = None if noise is None else _increment(noise, times, i, x)
            new = step(model, state, rows[i], dw)
            if cb is not None:
                g = problem.grid
                out = cb(StepInfo(i, g[i], g[i + 1], state.x, new.x))
                if out is not None:
                    if not isinstance(out, Tensor) or out.shape != new.x.shape:
                        raise ValueError("a solve callback must return None or a tensor shaped like x")
                    new = new.with_x(out)
            record.end_step(i, times[i + 1], new.x, start=times[i])
            state = new
            if trajectory is not None:
                trajectory.append(state.x)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return state


def _increment(noise, times: list, i: int, x: Tensor) -> Tensor:
    """The Brownian increment of step ``i``, on ``x``'s dtype and device, checked against its shape."""
    dw = noise(times[i], times[i + 1]).to(device=x.device, dtype=x.dtype)
    if dw.shape != x.shape:
        raise ValueError(f"noise(t, t_next) returned shape {tuple(dw.shape)} but x has {tuple(x.shape)} (step {i})")
    return dw


def _integrate_whole(problem: Problem, model: ModelCall, state: State, start: int, stop: int,
                     trajectory: list | None) -> State:
    """:func:`integrate` with the steps as one compiled graph (``compile="solve"``): the noise increments are
    drawn first, the steps are recorded after it (same record as the eager loop: the evaluations of each step,
    the final state for the deferred NaN/Inf check)."""
    from .compiled import compiled_loop

    times, x, noise = problem.bound.plan.times, state.x, problem.noise
    noises = (None,) * (stop - start) if noise is None else tuple(_increment(noise, times, i, x) for i in range(start, stop))
    run = compiled_loop(problem.bound, problem.solver, problem.compile, start, stop, trajectory is not None)
    state, xs, points, counts = run(model, state, noises)
    record, done, evals = model.record, 0, problem.bound.evals
    for i, n in zip(range(start, stop), counts):
        record.calls.extend((None, times[i] if j is None else evals[j]) for j in points[done:n])
        done = n
        record.end_step(i, times[i + 1], xs[i - start] if xs else state.x, start=times[i])
    if trajectory is not None:
        trajectory.extend(xs)
    return state


def rerun_checked(problem: Problem) -> None:
    """Run ``problem`` again without a graph, checking every step (``check_finite="step"``): it raises
    :class:`~adjointflow.errors.NonFiniteError` at the first bad step, naming it, its time and whether the
    model or the update went bad. The deferred check (:mod:`adjointflow.finite`) calls it only after the
    final state came out NaN/Inf; it costs at most the steps up to the bad one (eager, same noise and
    callback)."""
    model = ModelCall(problem.denoiser, problem.cond, "step")
    with torch.no_grad():
        state = problem.solver.init(model, problem.x.detach(), problem.grid)
        integrate(problem, model, state, step=problem.solver.step)


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
    if not hasattr(noise, "shape"):
        raise TypeError(f"noise must have a .shape equal to {name}'s {tuple(x.shape)} (e.g. a BrownianNoise): a callable "
                        "without one may return a single draw that every sample of the batch would share")
    if tuple(noise.shape) != tuple(x.shape):
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
    check_finite=True,
    compile=False,
) -> Solution:
    """Integrate ``x`` from ``grid[0]`` to ``grid[-1]`` with ``solver`` under ``denoiser``.

    ``grid`` is a strictly monotone 1-D sequence in ``[0, 1]``: decreasing to sample (noise to data),
    increasing to invert (ODE solvers only). ``cond`` (tensor or dict of tensors, batch-first) is
    passed to the network. ``gradient`` picks how gradients flow back (default
    :class:`~adjointflow.adjoint.Backprop`, plain autograd). Stochastic solvers draw from ``noise``
    (a :class:`~adjointflow.noise.BrownianNoise`; default: one seeded from torch's generator, so
    ``torch.manual_seed`` reproduces it). ``callback(StepInfo)``
    runs after every step and may return a replacement state (guidance uses it).

    Everything that depends only on the schedule and the grid is planned once, in float64, before the
    loop (:class:`~adjointflow.plan.Plan`); the loop makes no host-device synchronisation. NaN/Inf in the
    final state (which a bad model output or update reaches in its own step and keeps) are checked once
    after the loop; only if it is bad is the solve run again checking every step, so that
    :class:`~adjointflow.errors.NonFiniteError` names the first bad step, its time and whether the model or
    the update went bad (:mod:`adjointflow.finite`). ``check_finite="step"`` checks after every step as the
    solve runs (debugging; one sync per step), ``False`` turns the check off. ``compile=True`` runs each
    step through ``torch.compile`` (``fullgraph=True``; the rows are tensors, so one compiled step serves the whole
    grid); ``compile="solve"`` compiles the whole loop as one graph (one compiled call per solve, longer to
    compile; for ``Backprop``/``ContinuousAdjoint`` without callback; on CPU 0.77-1.03x eager when one method
    is sampled repeatedly, ``benchmarks/results/vs_diffusers_focused.md``); another string picks the backend (e.g. ``"aot_eager"``),
    :class:`~adjointflow.compiled.Compile` all three (:mod:`adjointflow.compiled`). Where torch.compile cannot
    run it raises, never falls back.

    Returns a :class:`Solution`.
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
    check_finite_mode(check_finite)
    from .compiled import check_compile

    compile = check_compile(compile)
    if compile is not None and compile.scope == "solve":
        _check_whole(gradient, callback, progress, check_finite)
    problem = Problem(denoiser, x, grid, solver, cond, noise, callback, save_trajectory, progress,
                      check_finite=check_finite, compile=compile)
    return gradient.run(problem)


def _check_whole(gradient, callback, progress, check_finite) -> None:
    """What ``compile="solve"`` (the loop as one graph) cannot do: anything that acts between steps, and gradient
    strategies other than the two that run the plain loop (one that passes its own step would run eagerly)."""
    from .adjoint.strategies import Backprop, Checkpoint, ContinuousAdjoint

    why = ("gradient=Checkpoint() (it recomputes each step on its own)" if isinstance(gradient, Checkpoint) else
           f"gradient={gradient!r} (only Backprop and ContinuousAdjoint run the plain loop)"
           if type(gradient) not in (Backprop, ContinuousAdjoint) else
           "a callback (it runs between steps)" if callback is not None else
           "progress=True (it updates between steps)" if progress else
           "check_finite='step' (it checks between steps)" if check_finite == "step" else None)
    if why is not None:
        raise ValueError(f"compile='solve' runs the whole loop as one graph, which rules out {why}; use "
                         "compile=True (one compiled step per row) instead")
