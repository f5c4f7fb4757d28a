"""Gradient strategies: how gradients flow back through :func:`adjointflow.solve`.

=====================  ==============================  =============================  ==========================
strategy               gradient                        memory (N steps)               reaches
=====================  ==============================  =============================  ==========================
``Backprop()``         exact, of the solver run        N network graphs               every tensor (autograd)
``Checkpoint()``       exact, of the solver run        N states + one step's graph    every tensor (autograd)
``ContinuousAdjoint``  continuous adjoint, O(h^p)      N states + one network graph   latent, ``cond``, ``params``
=====================  ==============================  =============================  ==========================
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = ["GradientStrategy", "Backprop", "Checkpoint", "ContinuousAdjoint"]


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
        from ..driver import Solution, integrate, rerun_checked

        model = problem.model()
        state = problem.solver.init(model, problem.x, problem.grid)
        traj = [problem.x] if problem.save_trajectory else None
        state = integrate(problem, model, state, trajectory=traj)
        model.record.check(locate=lambda: rerun_checked(problem))
        return Solution(state.x, torch.stack(traj) if traj is not None else None, model.nfe, problem.grid)


# --- Checkpoint ---------------------------------------------------------------------------------
def _checkpointed(base_step, preserve_rng_state: bool):
    """``base_step`` with its saved activations recomputed in the backward pass (:mod:`.recompute`): only
    the step's input state is kept. The recomputation calls the model again with a throwaway record (the
    forward pass already recorded and checked those evaluations)."""
    from ..solvers.base import State
    from .recompute import RecomputedStep

    live: list = []

    def step(model, state, c, noise=None):
        if not torch.is_grad_enabled():
            return base_step(model, state, c, noise)
        replay = model.replay()
        frame = RecomputedStep(lambda *ts: base_step(replay, State.from_tensors(ts), c, noise), state.tensors(), live)
        return frame.run(lambda: base_step(model, state, c, noise), preserve_rng_state)

    return step


@dataclass(frozen=True)
class Checkpoint(GradientStrategy):
    """Exact discrete adjoint with per-step recomputation (Griewank & Walther 2008, ch. 12).

    Forward: the states ``(x, history)`` at the grid points are kept (``N |state|``); each step's
    activations are dropped, except those of the last ``keep`` steps, whose full graphs are kept.
    Backward: walking the steps from last to first, a dropped step ``i`` is re-run from its stored
    state with a graph and its VJP taken, so one step's graph (``nfe_per_step`` network graphs) is alive
    at a time besides the kept ones. Stochastic solvers re-use the forward pass's Brownian increment, so
    the replayed step is the step that was run.

    ``keep`` is the memory/time dial: ``keep=k`` costs ``k`` step graphs of memory and saves ``k``
    recomputations; ``keep=N`` is :class:`Backprop`. The default ``keep=1`` is free in peak memory (the
    backward pass holds one step's graph anyway) and skips the last step's recomputation.

    It is autograd with the saved activations recomputed (:mod:`adjointflow.adjoint.recompute`, the
    mechanism of non-reentrant ``torch.utils.checkpoint`` without its general-purpose bookkeeping): the
    gradient equals :class:`Backprop`'s (bit-identical on CPU) and reaches every tensor that affects the
    output -- the latent, ``cond``, the network's parameters and tensors captured by closure -- through
    both ``.backward()`` and ``torch.autograd.grad``. Cost: one extra forward pass of the dropped steps
    per gradient. ``preserve_rng_state`` replays a network's own randomness (e.g. dropout) in the
    recomputation; a step that draws no random numbers (compared RNG state before/after) skips the
    save/restore.
    """

    keep: int = 1
    preserve_rng_state: bool = True

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
            raise ValueError(f"keep must be an int >= 0 (the number of final steps whose graphs are kept), got {self.keep!r}")
        if not isinstance(self.preserve_rng_state, bool):
            raise ValueError(f"preserve_rng_state must be a bool, got {self.preserve_rng_state!r}")

    def run(self, problem):
        from ..driver import Solution, integrate, rerun_checked

        model = problem.model()
        state = problem.solver.init(model, problem.x, problem.grid)
        traj = [problem.x] if problem.save_trajectory else None
        n = len(problem.bound.rows)
        split = max(n - self.keep, 0)
        state = integrate(problem, model, state, 0, split, trajectory=traj,
                          step=_checkpointed(problem.step(), self.preserve_rng_state))
        state = integrate(problem, model, state, split, n, trajectory=traj)
        model.record.check(locate=lambda: rerun_checked(problem))
        return Solution(state.x, torch.stack(traj) if traj is not None else None, model.nfe, problem.grid)


# --- ContinuousAdjoint --------------------------------------------------------------------------
def _needs_adjoint_step(solver) -> None:
    from ..solvers.base import Solver

    if getattr(type(solver), "adjoint_step", Solver.adjoint_step) is Solver.adjoint_step:
        raise ValueError(
            f"{type(solver).__name__} has no continuous-adjoint step (adjoint_step), so it cannot be used with "
            "ContinuousAdjoint; use gradient=Checkpoint() (exact, same memory class) or Backprop()")


def record_states(problem) -> tuple[list[Tensor], int]:
    """Run ``problem`` without a graph and return the states ``x`` at every grid point and the NFE.

    A callback that *replaces* the state cannot be differentiated by a continuous adjoint: refused.
    """
    from ..driver import integrate, rerun_checked

    cb = problem.callback
    if cb is not None:
        def observe_only(info):
            if cb(info) is not None:
                raise ValueError("ContinuousAdjoint cannot differentiate through a callback that changes the "
                                 "state (guidance); use gradient=Checkpoint() or Backprop()")
        problem = replace(problem, callback=observe_only)
    model = problem.model()
    with torch.no_grad():
        state = problem.solver.init(model, problem.x.detach(), problem.grid)
        xs = [state.x]
        integrate(problem, model, state, trajectory=xs)
    model.record.check(locate=lambda: rerun_checked(problem))
    return xs, model.nfe


class _AdjointFunction(torch.autograd.Function):
    """``x_end = solve(x, cond, params)`` whose backward integrates the continuous adjoint.

    The recorded states are saved with ``save_for_backward``, so autograd frees them after the backward
    pass and a second backward raises autograd's own error (unless the first used ``retain_graph=True``)."""

    @staticmethod
    def forward(ctx, job, xs, x, *inputs):
        ctx.job = job
        ctx.save_for_backward(*xs)
        return xs[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_end):
        from .equations import AdjointModel, integrate_adjoint

        xs = list(ctx.saved_tensors)
        job = ctx.job
        model = AdjointModel(job["denoiser"], xs, job["cond"], job["params"], sde=job["solver"].stochastic,
                             form=job["form"], order=job["order"], check_finite=job["check_finite"])
        adj = integrate_adjoint(job["solver"], model, job["grid"], grad_end.contiguous(), bound=job["bound"])
        job["stats"].update(backward_nfe=model.nfe, backward_vjp=model.nvjp)
        return (None, None, adj.a, *adj.inputs)


@dataclass(frozen=True)
class ContinuousAdjoint(GradientStrategy):
    """Continuous adjoint (optimise-then-discretise) along recorded forward states.

    Forward: the solve runs without a graph and keeps ``x`` at every grid point (``N |x|``; for an SDE
    these lie on the forward Brownian path). Backward: ``solver.adjoint_step`` integrates the adjoint
    ODE ``da/dt = -(dF/dx)^T a`` (and the input integrals) from the last grid time to the first, one
    network graph alive at a time (1 NFE + 1 VJP per evaluation). Exponential integrators use
    AdjointDEIS-1 / -2M (Blasingame & Liu 2024) in the paper's noise form (``form="eps"``), our data form
    (``form="x0"``), or -- the default -- ``form="auto"``: data form on the noisy side of ``lambda = 0``,
    noise form on the clean side, much more accurate than either alone (see ``adjoint_deis``);
    ``order=None`` picks 1 for first-order
    solvers and 2 (2M) otherwise. Euler/Heun integrate the adjoint with their own scheme.

    The result approximates the exact gradient with the solver's adjoint order (it is *not* the
    gradient of the discrete solver; for that use :class:`Checkpoint`).

    **What is differentiated -- exactly these, nothing else:** the start latent ``x``, the
    floating-point tensors of ``cond``, and ``params`` (default: every parameter of the denoiser that
    requires grad; ``params=[...]`` overrides; listed tensors the output does not depend on get zero).
    Tensors captured by closure in the network and parameters left out of ``params`` get no gradient
    from this strategy (``.grad`` stays ``None``). A callback that changes the state is refused, and
    the trajectory it returns is detached. Not twice differentiable.
    """

    form: str = "auto"
    order: int | None = None
    params: tuple | None = field(default=None, compare=False)

    def __post_init__(self):
        from .equations import ADJOINT_FORMS

        if self.form not in ADJOINT_FORMS:
            raise ValueError(f"unknown adjoint form {self.form!r}; choose one of {ADJOINT_FORMS}")
        if self.order is not None and self.order not in (1, 2):
            raise ValueError(f"order must be None, 1 or 2, got {self.order!r}")
        if self.params is not None:
            from .equations import check_params

            object.__setattr__(self, "params", tuple(check_params(self.params)))

    def run(self, problem):
        from ..driver import Solution
        from .equations import cond_leaves, default_params

        _needs_adjoint_step(problem.solver)
        xs, nfe = record_states(problem)
        params = list(self.params) if self.params is not None else default_params(problem.denoiser)
        cond_t = [v for _, v in cond_leaves(problem.cond)]
        traj = torch.stack(xs) if problem.save_trajectory else None
        stats: dict = {}
        x, inputs = problem.x, (*cond_t, *params)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *inputs)):
            from .thresholds import warn_if_too_few_steps

            warn_if_too_few_steps(problem.solver, self.form, self.order, len(problem.grid) - 1)
            job = dict(denoiser=problem.denoiser, cond=problem.cond, params=params, solver=problem.solver,
                       grid=problem.grid, bound=problem.bound, form=self.form, order=self.order, stats=stats,
                       check_finite=problem.check_finite)
            out = _AdjointFunction.apply(job, xs, x, *inputs)
        else:
            out = xs[-1]
        return Solution(out, traj, nfe, problem.grid, stats)
