"""Bespoke non-stationary solvers (Shaul et al., "Bespoke Non-Stationary Solvers for Fast Sampling of
Diffusion and Flow Models", ICML 2024): a learned linear multistep method with its own coefficients at
every step.

With ``n`` network evaluations at times ``t_0 = t_start > t_1 > ... > t_{n-1}`` (and ``t_n = t_end``),
every evaluation point and the output are linear combinations of the start sample and the drifts
computed so far (``u = dx/dt``, the PF-ODE velocity):

    u_k = u(p_k, t_k),   p_0 = x_0,   p_{k+1} = a_k x_0 + sum_{j <= k} b_kj u_j,   output p_n,

    b_kj = beta_kj (t_end - t_start) / n   (weights in units of the mean step),

so that ``a_k = beta_kj = 1`` with uniform times is Euler on the uniform grid. The weights do not
follow the learned times (tying them to each step's length trained to a 15% larger held-out error on
the digits model at NFE 5: moving one time then rescales every weight that uses it). Every multistep or predictor-corrector
solver that evaluates the model once per step and is linear in the model's outputs (Euler, DDIM,
DPM-Solver++ 2M/3M, DEIS, UniPC with or without its corrector) is a member of this family, with
coefficients that depend on its grid only: :meth:`BespokeNSSolver.from_solver` reads them off, so
training can start from the best generic solver and only improve on it. The family is richer than
the scale-time transformed RK1/RK2 solvers of :mod:`adjointflow.solvers.bespoke` (``n (n + 3) / 2 - 1``
numbers for ``n`` NFE, and any NFE), at the price of any guaranteed order: it is fitted to one model,
one interval and one NFE.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..plan import At
from .base import Solver, State, axpy
from .bespoke import BespokeSolver

__all__ = ["BespokeNSSolver", "FrozenNS"]


class FrozenNS(NamedTuple):
    """A frozen step ``k``: ``p_{k+1} = a x_0 + sum_{j <= k} b_j u_j`` with ``u_k`` evaluated at ``s``."""

    s: At
    a: float
    b: tuple


class BespokeNSSolver(BespokeSolver):
    """Learned non-stationary multistep solver with ``n_steps`` network evaluations (one per step).

    ``BespokeNSSolver(n_steps)`` starts as Euler on the uniform grid (to rounding);
    :meth:`from_solver` starts from a generic solver instead. Train with
    :func:`~adjointflow.fit_bespoke` (final-RMSE loss only), sample with
    ``solve(denoiser, x, solver.timesteps(), solver)``, persist with :meth:`save` / :meth:`load` (the
    same checked file format as :class:`BespokeSolver`, ``base="ns"``). The learned node times use
    :class:`BespokeSolver`'s parameterisation (``theta_t``); ``alpha`` holds ``a_k`` and ``beta`` the
    relative weights ``beta_kj`` (only ``j <= k`` is used). No continuous adjoint (use ``Backprop``
    or ``Checkpoint`` for gradients through a solve)."""

    _file_bases = ("ns",)
    adjoint_step = Solver.adjoint_step  # none: ContinuousAdjoint refuses it with a clear message

    def __init__(self, n_steps: int, base: str = "ns"):
        nn.Module.__init__(self)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
        if base != "ns":
            raise ValueError(f"BespokeNSSolver has base='ns', got base={base!r}")
        self.n_steps, self.base = n_steps, "ns"
        n = n_steps
        self.theta_t = nn.Parameter(torch.zeros(n - 1, dtype=torch.float64))
        self.alpha = nn.Parameter(torch.ones(n, dtype=torch.float64))
        self.beta = nn.Parameter(torch.tril(torch.ones(n, n, dtype=torch.float64)))
        self.register_buffer("mask", torch.tril(torch.ones(n, n, dtype=torch.float64)), persistent=False)
        self.register_buffer("interval", torch.full((2,), float("nan"), dtype=torch.float64))
        self.model_fingerprint: str | None = None
        self.info: dict | None = None

    @property
    def order(self) -> int:  # type: ignore[override]
        """1: nominal (learned coefficients carry no order guarantee; Euler at the start)."""
        return 1

    @property
    def nfe_per_step(self) -> int:  # type: ignore[override]
        return 1

    @classmethod
    def for_nfe(cls, nfe: int, base: str = "ns") -> "BespokeNSSolver":
        """A fresh solver spending exactly ``nfe`` evaluations (any positive int)."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe must be a positive int, got {nfe!r}")
        return cls(nfe, base)

    # --- the coefficients ----------------------------------------------------------------------
    def coefficients(self, t_start, t_end, times: Tensor | None = None) -> dict:
        """``t`` (n+1 node times), ``a`` (n,) and the masked absolute weights ``b`` (n, n) (differentiable)."""
        t = self._times(t_start, t_end) if times is None else times
        return {"t": t, "a": self.alpha, "b": self.beta * self.mask * ((t[-1] - t[0]) / self.n_steps)}

    def _frozen_rows(self, plan, c: dict) -> list:
        a, b = c["a"].tolist(), c["b"].tolist()
        return [FrozenNS(plan.at(k), a[k], tuple(b[k][: k + 1])) for k in range(self.n_steps)]

    def step(self, model, state: State, c, noise=None) -> State:
        """Evaluate ``u_k`` at ``p_k`` and form ``p_{k+1}``; the history is ``(x_0, u_0, ..., u_k)``."""
        x0 = state.history[0] if state.history else state.x
        frozen = type(c) is FrozenNS
        us = (*state.history[1:], model(state.x, c.s if frozen else c[1]["t"][c[0]]).velocity)
        if frozen:
            p = c.a * x0
            for b, u in zip(c.b, us):
                p = axpy(p, b, u)
        else:
            p = self._combine(x0, us, *c)
        return State(p, (x0, *us))

    @staticmethod
    def _combine(x0: Tensor, us, k: int, co: dict) -> Tensor:
        cast = lambda v: v.to(dtype=x0.dtype, device=x0.device)
        p = cast(co["a"][k]) * x0
        for j, u in enumerate(us):
            p = p + cast(co["b"][k, j]) * u
        return p

    def rollout(self, model, x: Tensor, c: dict) -> Tensor:
        """The whole solve from ``x`` with coefficients ``c`` (training; ``model`` a ``ModelCall``)."""
        us = []
        p = x
        for k in range(self.n_steps):
            us.append(model(p, c["t"][k]).velocity)
            p = self._combine(x, us, k, c)
        return p

    def advance(self, model, x, i, c):
        raise ValueError("a BespokeNSSolver step depends on all earlier evaluations: use rollout() (the final-RMSE "
                         "loss); the per-step bound loss applies to the scale-time BespokeSolver only")

    def lipschitz(self, c, lip_u: float = 1.0):
        raise ValueError("the bound loss applies to the scale-time BespokeSolver only; train a BespokeNSSolver "
                         "with loss='rmse'")

    # --- starting points -----------------------------------------------------------------------
    @classmethod
    def from_solver(cls, solver: Solver, n_steps: int, schedule, t_start: float, t_end: float,
                    kind: str = "uniform") -> "BespokeNSSolver":
        """The member of the family equal to ``solver`` on ``timesteps(schedule, n_steps, kind)``:
        its coefficients are read off one solve of a stand-in model whose ``k``-th velocity is the
        ``k``-th unit vector (so each state is its own coefficient vector), then checked on a random
        linear model. ``ValueError`` if ``solver`` is stochastic, does not evaluate once per step at the
        grid's times, or is not linear in the model's outputs. Tied to ``[t_start, t_end]``."""
        from ..driver import solve
        from ..grids import timesteps
        from ..models import Denoiser

        if not isinstance(solver, Solver) or isinstance(solver, BespokeSolver) or solver.stochastic:
            raise ValueError(f"solver must be a deterministic generic Solver, got {solver!r}")
        grid = timesteps(schedule, n_steps, kind, t_start=t_start, t_end=t_end)
        n, f64 = n_steps, torch.float64
        seen = []

        def unit(x, t, cond=None):
            e = torch.zeros_like(x)
            if len(seen) < n:  # more evaluations than steps: refused below
                e[..., len(seen) + 1] = 1.0
            seen.append((x[0].detach().clone(), float(t.reshape(-1)[0])))
            return e

        x0 = torch.zeros(1, n + 1, dtype=f64)
        x0[0, 0] = 1.0
        with torch.no_grad():
            out = solve(Denoiser(unit, schedule, "velocity"), x0, grid, solver).x[0]
        if len(seen) != n or any(abs(tk - float(grid[k])) > 1e-12 for k, (_, tk) in enumerate(seen)):
            raise ValueError(f"{type(solver).__name__} does not evaluate the model once per step at the grid's times "
                             f"({len(seen)} evaluations for {n} steps): it has no BespokeNSSolver form")
        pts = torch.stack([p for p, _ in seen[1:]] + [out])  # p_1 .. p_n as coefficient vectors
        new = cls(n)
        d = (grid[1:] - grid[:-1]).to(f64)
        with torch.no_grad():
            new.theta_t.copy_(torch.log(d[1:].abs()) - torch.log(d[0].abs()))
            new.alpha.copy_(pts[:, 0])
            new.beta.copy_(torch.tril(pts[:, 1:]) * (n / (float(grid[-1]) - float(grid[0]))))
            new.interval.copy_(torch.tensor([t_start, t_end], dtype=f64))
        if float((torch.triu(pts[:, 1:], 1)).abs().max()) > 0:
            raise ValueError(f"{type(solver).__name__} used a model output before evaluating it")
        new._check_against(solver, schedule, grid)
        return new

    def _check_against(self, solver: Solver, schedule, grid: Tensor) -> None:
        from ..driver import solve
        from ..models import Denoiser

        g = torch.Generator().manual_seed(0)
        w = torch.randn(3, 3, generator=g, dtype=torch.float64) / 3
        lin = lambda x, t, cond=None: x @ w + t[:, None] * 0.5  # noqa: E731
        den = Denoiser(lin, schedule, "velocity")
        x = torch.randn(4, 3, generator=g, dtype=torch.float64)
        with torch.no_grad():
            ref = solve(den, x, grid, solver).x
            mine = solve(den, x, self.timesteps(float(grid[0]), float(grid[-1])), self).x
        if not torch.allclose(mine, ref, rtol=1e-9, atol=1e-12):
            raise ValueError(f"{type(solver).__name__} is not linear in the model's outputs: it has no BespokeNSSolver "
                             f"form (mismatch {float((mine - ref).abs().max()):.3g})")

    def load_transform(self, other) -> None:
        """Copy ``other``'s coefficients (same ``n_steps``; warm start of another training run). A
        non-stationary solver has no transform to resample to another step count: start from
        :meth:`from_solver` instead."""
        if not isinstance(other, BespokeNSSolver):
            raise ValueError(f"cannot load a base={getattr(other, 'base', None)!r} solver into a BespokeNSSolver")
        if other.n_steps != self.n_steps:
            raise ValueError(f"init has n_steps={other.n_steps}, this BespokeNSSolver {self.n_steps}: non-stationary "
                             f"coefficients do not resample to another NFE; start from "
                             f"BespokeNSSolver.from_solver(<generic solver>, {self.n_steps}, ...)")
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(dict(other.named_parameters())[name])
