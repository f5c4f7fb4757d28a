"""The continuous adjoint equations and the vector-Jacobian products they need.

For a solve of ``dx/dt = F(x, t; z, theta)`` (the PF-ODE drift ``u``, or the reverse-SDE drift
``f x + g^2/sigma eps = 2 u - f x`` whose noise term is additive) and a loss ``L(x(t_end))``, the
adjoint ``a(t) = dL/dx(t)`` and the input gradients obey (Pontryagin; Chen et al. 2018)

    da/dt = -(dF/dx)^T a,        d a_z/dt = -(dF/dz)^T a,        d a_theta/dt = -(dF/dtheta)^T a,

integrated from ``a(t_end) = dL/dx_end``, ``a_z = a_theta = 0`` back to the start of the grid. For an SDE
with state-independent diffusion ``g(t)`` the adjoint is this ODE along the *same* Brownian path
(Blasingame & Liu 2024, Thm 3.1), which is why the forward states are recorded, never re-solved.

A solver's ``adjoint_step(model, adj, grid, i)`` maps the :class:`AdjointState` at ``grid[i + 1]``
to the one at ``grid[i]``; ``model`` is an :class:`AdjointModel` (the recorded states and a VJP of
the network with ``cond`` and the parameters as inputs), the adjoint counterpart of the forward
``ModelCall``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor


__all__ = [
    "AdjointState", "AdjointModel", "drift_vjp", "integrate_adjoint", "cond_leaves", "with_cond_leaves",
    "default_params", "check_params", "ADJOINT_FORMS",
]

#: AdjointDEIS forms for exponential integrators: data prediction (``"x0"``), noise prediction (``"eps"``), or
#: ``"auto"``: per step, the data form where the step's noisy end has ``lambda < 0`` and the noise form elsewhere.
ADJOINT_FORMS = ("auto", "x0", "eps")


@dataclass(frozen=True)
class AdjointState:
    """Adjoint at one grid time: ``a = dL/dx``, ``inputs`` = accumulated ``dL/d(input)`` for each
    differentiated input (``cond`` tensors, then parameters), and ``history`` tensors a multistep
    adjoint carries (newest first; their times are implied by the grid, as in :class:`~adjointflow.solvers.State`)."""

    a: Tensor
    inputs: tuple[Tensor, ...] = ()
    history: tuple[Tensor, ...] = ()


# --- conditioning plumbing ----------------------------------------------------------------------
def cond_leaves(cond) -> list[tuple[object, Tensor]]:
    """The differentiable (floating-point) tensors of ``cond`` as ``(key, tensor)`` pairs
    (``key`` is ``None`` for a tensor ``cond``; integer labels are passed through, not differentiated)."""
    if cond is None:
        return []
    if isinstance(cond, Mapping):
        return [(k, v) for k, v in cond.items() if isinstance(v, Tensor) and v.is_floating_point()]
    if isinstance(cond, Tensor):
        return [(None, cond)] if cond.is_floating_point() else []
    raise TypeError(f"cond must be a tensor or a dict of tensors, got {type(cond).__name__}")


def with_cond_leaves(cond, keys: Sequence, tensors: Sequence[Tensor]):
    """``cond`` with the tensors at ``keys`` (from :func:`cond_leaves`) replaced by ``tensors``."""
    if not keys:
        return cond
    if isinstance(cond, Mapping):
        out = dict(cond)
        out.update(zip(keys, tensors))
        return out
    return tensors[0]


def default_params(denoiser) -> list[Tensor]:
    """Every parameter of ``denoiser`` that requires grad (shared parameters once)."""
    seen, out = set(), []
    for p in denoiser.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def check_params(params) -> list[Tensor]:
    """Validate a user ``params=`` override: an iterable of tensors that require grad."""
    if isinstance(params, Tensor):
        params = [params]
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"params must be an iterable of tensors, got {type(params).__name__}") from None
    out, seen = [], set()
    for k, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{k}] is a {type(p).__name__}, not a tensor")
        if not p.requires_grad:
            raise ValueError(f"params[{k}] (shape {tuple(p.shape)}) does not require grad; "
                             "call .requires_grad_() on it or leave it out")
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# --- the adjoint model ----------------------------------------------------------------------------
class AdjointModel:
    """What an ``adjoint_step`` sees: recorded forward states, the grid's float64 schedule values and the
    network's VJP.

    ``x(i)`` is the recorded state at ``grid[i]`` (forward pass, same Brownian path for an SDE).
    ``vjp(x, t, cotangent, output)`` evaluates the denoiser once with a graph at ``(x, t)`` and returns
    ``(cotangent^T d out/dx, tuple(cotangent^T d out/d input))`` for ``out`` one of ``"eps"``, ``"x0"``,
    ``"velocity"``; ``t`` is a grid index (precomputed network time and conversion) or a time tensor.
    The inputs are the differentiable ``cond`` tensors, then ``params``; an input the network does not
    use gets zeros. After :meth:`prepare` (done by :func:`integrate_adjoint`) ``times``, ``alpha``,
    ``sigma``, ``lam`` and ``f`` are Python-float lists over the grid nodes (no host sync in a step) and
    ``cache`` holds per-grid tables of the adjoint schemes. ``sde`` says the forward was the reverse SDE
    (drift ``2u - f x``); ``form``/``order`` configure AdjointDEIS for exponential integrators
    (``order=None``: from the solver).
    """

    def __init__(self, denoiser, xs: Sequence[Tensor], cond=None, params: Sequence[Tensor] = (),
                 sde: bool = False, form: str = "auto", order: int | None = None, check_finite=True):
        from ..finite import FiniteRecord

        if form not in ADJOINT_FORMS:
            raise ValueError(f"unknown adjoint form {form!r}; choose one of {ADJOINT_FORMS}")
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.xs = xs
        self.cond = cond
        leaves = cond_leaves(cond)
        self.cond_keys = [k for k, _ in leaves]
        self.cond_tensors = [v for _, v in leaves]
        self.params = list(params)
        self.inputs = (*self.cond_tensors, *self.params)
        self.sde, self.form, self.order = bool(sde), form, order
        self.nfe = 0
        self.nvjp = 0
        self.record = FiniteRecord(check_finite, every_step=True)  # outputs feed VJPs only: witness each
        self.cache: dict = {}
        self.grid = None

    def prepare(self, grid: Tensor, bound=None) -> None:
        """Evaluate the schedule on ``grid`` once (float64) and bind the network times and conversions of
        its nodes (``bound``: an existing :class:`~adjointflow.plan.BoundPlan` of the same grid)."""
        from ..plan import Plan

        if self.grid is not None and torch.equal(self.grid, grid):
            return
        plan = bound.plan if bound is not None else Plan(self.schedule, grid)
        nodes = plan.nodes[: plan.n + 1]
        self.grid, self.nodes = grid, nodes
        self.times = plan.times
        self.alpha, self.sigma, self.lam = nodes.alpha.tolist(), nodes.sigma.tolist(), nodes.lam.tolist()
        self.f = self.schedule.f(grid).tolist() if self.sde else None
        self.evals = bound.evals[: plan.n + 1] if bound is not None else plan.bind(self.denoiser, self.xs[0]).evals
        self.cache = {}

    def x(self, i: int) -> Tensor:
        return self.xs[i]

    def zero_state(self, grad_end: Tensor) -> AdjointState:
        return AdjointState(grad_end, tuple(torch.zeros_like(p) for p in self.inputs))

    def vjp(self, x: Tensor, t, cotangent: Tensor, output: str = "velocity"):
        at = self.evals[t] if isinstance(t, int) else t
        with torch.enable_grad():
            xl = x.detach().requires_grad_(True)
            cl = [c.detach().requires_grad_(True) for c in self.cond_tensors]
            cond = with_cond_leaves(self.cond, self.cond_keys, cl)
            self.nfe += 1
            out = self.denoiser(xl, at, cond).as_(output)
            self.record.model(out, at)
            wrt = [xl, *cl, *self.params]
            if out.requires_grad:
                self.nvjp += 1
                grads = torch.autograd.grad(out, wrt, cotangent, allow_unused=True)
            else:
                grads = [None] * len(wrt)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
        return grads[0], tuple(grads[1:])


def drift_vjp(model: AdjointModel, x: Tensor, j: int, a: Tensor):
    """``(a^T dF/dx, a^T dF/d inputs)`` at grid node ``j`` for the drift ``F`` the forward solver integrated:
    the PF-ODE velocity ``u``, or for a reverse SDE ``F = 2u - f x`` (``g^2/sigma eps`` doubles the ODE's term)."""
    vx, vin = model.vjp(x, j, a, "velocity")
    if not model.sde:
        return vx, vin
    return 2 * vx - model.f[j] * a, tuple(2 * v for v in vin)


def integrate_adjoint(solver, model: AdjointModel, grid: Tensor, grad_end: Tensor, bound=None) -> AdjointState:
    """Walk ``solver.adjoint_step`` from ``grid[-1]`` back to ``grid[0]`` starting at ``a = grad_end``.

    NaN/Inf in the network outputs and in the adjoint (``a`` and every input gradient) are recorded on
    the device each step and checked once at the end (:class:`~adjointflow.finite.FiniteRecord`), which
    raises :class:`~adjointflow.errors.NonFiniteError` naming the first bad step and its time.
    """
    model.prepare(grid, bound)
    adj = model.zero_state(grad_end)
    rec = model.record
    for i in reversed(range(len(grid) - 1)):
        adj = solver.adjoint_step(model, adj, grid, i)
        rec.end_step(i, model.times[i], adj.a, *adj.inputs)
    rec.check(adjoint=True)
    return adj
