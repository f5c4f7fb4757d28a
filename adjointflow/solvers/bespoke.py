"""Bespoke solvers (Shaul et al., "Bespoke Solvers for Generative Flow Models", ICLR 2024).

A bespoke solver is a base Runge--Kutta method (RK1 = Euler, RK2 = explicit midpoint) applied to a
*scale-time transformed* sampling path ``xbar(r) = s_r x(t_r)``, ``r in [0, 1]``, whose ODE is

    dxbar/dr = ubar_r(xbar) = (sdot_r / s_r) xbar + tdot_r s_r u(xbar / s_r, t_r),

with ``u = dx/dt`` the model's PF-ODE drift. One base step of size ``h = 1/n`` in ``r``, mapped back to
``x``, is (``i+1/2`` marks the midpoint stage; derived here from the transformed ODE):

* RK1: ``x_{i+1} = (s_i + h sdot_i)/s_{i+1} x_i + h tdot_i s_i / s_{i+1} u(x_i, t_i)``
* RK2: ``z = (s_i + h sdot_i/2) x_i + h/2 tdot_i s_i u(x_i, t_i)``  (``xbar`` at ``r_{i+1/2}``),
  ``x_{i+1} = s_i/s_{i+1} x_i + h/s_{i+1} [sdot_m/s_m z + tdot_m s_m u(z/s_m, t_m)]``, ``m = i+1/2``.

The learned quantities are ``t_i``, ``tdot_i``, ``s_i``, ``sdot_i`` (plus the midpoint ones for RK2):
``4n - 1`` (RK1) or ``8n - 1`` (RK2) numbers. For every smooth transform the solver keeps the order of
its base method (the paper's consistency theorem), so it converges to the exact ODE as ``n`` grows.

**Our time convention.** The paper's time runs noise (0) to data (1); ours runs from the grid's
``t_start`` to its ``t_end`` (sampling: ``1 -> t_end``, noise to data). The transform is learned on a
normalised time ``phi in [0, 1]``, increasing, mapped to ours by ``t = t_start + (t_end - t_start) phi``,
so ``tdot = (t_end - t_start) phi'(r)`` is negative when sampling; ``phi`` plays the paper's ``t_r``.

**Parameterisation** (all float64, identity = all zeros, constraints hold by construction):

* ``phi`` increments ``phi_{i+1} - phi_i = softmax([0, theta_t])_i`` (t strictly monotone, ends fixed);
* ``h tdot_i = (t_{i+1} - t_i) exp(kappa_i)`` (``tdot`` has the sign of the step; the secant slope
  times a positive factor, so the identity gives Euler's ``t_{i+1} - t_i`` to the last bit);
* ``s_i = exp(log_s_i)`` for ``i = 1..n`` and ``s_0 = 1`` (a global scale of ``s`` is redundant);
* ``sdot_i`` free; RK2 midpoint time ``t_m = t_i + sigmoid(theta_m)(t_{i+1} - t_i)``, and
  ``h tdot_m``, ``s_m``, ``sdot_m`` as above.

**The grid in** ``solve``. The solver's own times live inside the interval ``[grid[0], grid[-1]]``; pass
``grid = solver.timesteps(t_start, t_end)`` (``n_steps + 1`` points). ``solve`` refuses a grid with another
number of points, one whose interior differs from the learned times (so that ``Solution.grid``,
callbacks and error messages name the times the model was really evaluated at) and, for a trained
solver, one whose ends differ from the interval it was trained on.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..fingerprint import describe_error, digest, model_fingerprint, save_atomic
from ..plan import At
from .base import Solver, State, axpy, lin

__all__ = ["BespokeSolver", "model_fingerprint"]

_BASES = ("rk1", "rk2")
_FORMAT = "adjointflow.BespokeSolver"
_VERSION = 2  # 2: SHA-256 of the metadata and every tensor
# interior grid points must match the learned times to this fraction of the interval length
_GRID_RTOL = 1e-9


def _add_scaled(y: Tensor, b: Tensor, u: Tensor) -> Tensor:
    """``y + b u`` for a 0-dim float64 tensor ``b`` (differentiable in all three), without reading ``b`` on
    the host: ``addcmul`` with ``b`` cast to ``y``'s dtype rounds as ``torch.add(y, u, alpha=float(b))``, the
    kernel Euler and Heun use, so the identity transform reproduces them bit for bit
    (``tests/test_bespoke.py``), and the step makes no host sync (``tests/test_syncs.py``)."""
    return torch.addcmul(y, u, b.to(dtype=y.dtype, device=y.device))


class FrozenRK1(NamedTuple):
    """A frozen RK1 step (:meth:`BespokeSolver.advance`): ``x_{i+1} = a x_i + b u(x_i, t_i)``,
    ``a = (s_i + h sdot_i)/s_{i+1}``, ``b = h tdot_i s_i/s_{i+1}``; ``s`` evaluates at ``t_i``."""

    s: At
    a: float
    b: float


class FrozenRK2(NamedTuple):
    """A frozen RK2 step: ``z = cz x_i + bz u(x_i, t_i)``, ``x_{i+1} = cx x_i + cm z + bm u(z/sm, t_m)`` with
    ``cz = s_i + h sdot_i/2``, ``bz = h tdot_i s_i/2``, ``cx = s_i/s_{i+1}``, ``cm = h sdot_m/(s_m s_{i+1})``,
    ``bm = h tdot_m s_m/s_{i+1}``; ``s`` and ``m`` evaluate at ``t_i`` and ``t_m``."""

    s: At
    m: At
    cz: float
    bz: float
    sm: float
    cx: float
    cm: float
    bm: float


class BespokeSolver(nn.Module, Solver):
    """Learned scale-time RK1/RK2 solver (Shaul et al. 2024); an ``nn.Module`` and a :class:`Solver`.

    ``BespokeSolver(n_steps, base="rk1" | "rk2")`` starts at the identity transform, where it is
    Euler (RK1) or the explicit midpoint method (RK2) on ``timesteps(t_start, t_end)`` (uniform), bit
    for bit. Train it with :func:`~adjointflow.solvers.bespoke_train.fit_bespoke`; sample with
    ``solve(denoiser, x, solver.timesteps(), solver)``; persist with :meth:`save` / :meth:`load`.

    It subclasses ``nn.Module`` first (parameters, ``state_dict``, devices) and the frozen
    :class:`Solver` dataclass second (so ``isinstance(s, Solver)`` holds and the driver's protocol is
    inherited). ``Solver`` has no dataclass fields, so its frozen ``__setattr__`` lets subclasses set
    attributes; its field-based ``__eq__``/``__hash__`` would make every instance equal, so identity
    semantics are restored here, as for any module.
    """

    __eq__ = object.__eq__
    __hash__ = object.__hash__
    #: the ``base`` values a saved file may declare for this class
    _file_bases: tuple = _BASES

    def __init__(self, n_steps: int, base: str = "rk1"):
        nn.Module.__init__(self)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
        if base not in _BASES:
            raise ValueError(f"base must be one of {_BASES}, got {base!r}")
        self.n_steps = n_steps
        self.base = base
        n, z = n_steps, lambda k: nn.Parameter(torch.zeros(k, dtype=torch.float64))
        self.theta_t = z(n - 1)  # log phi-increments relative to the first one
        self.kappa = z(n)  # log(h tdot_i / (t_{i+1} - t_i))
        self.log_s = z(n)  # log s_1 .. log s_n
        self.sdot = z(n)  # ds/dr at r_i
        if base == "rk2":
            self.theta_mid = z(n)  # logit of (t_m - t_i)/(t_{i+1} - t_i)
            self.kappa_mid = z(n)
            self.log_s_mid = z(n)
            self.sdot_mid = z(n)
        # the (t_start, t_end) it was trained on; NaN until fit_bespoke sets it
        self.register_buffer("interval", torch.full((2,), math.nan, dtype=torch.float64))
        #: fingerprint of the model it was trained for (set by fit_bespoke / load; saved with it)
        self.model_fingerprint: str | None = None
        #: free-form provenance saved with it (e.g. training seconds), JSON-serialisable; None if unknown
        self.info: dict | None = None

    # --- Solver protocol ---------------------------------------------------------------------
    @property
    def order(self) -> int:  # type: ignore[override]
        """1 for ``base="rk1"`` (Euler), 2 for ``"rk2"`` (midpoint): kept by any smooth transform."""
        return 1 if self.base == "rk1" else 2

    @property
    def nfe_per_step(self) -> int:  # type: ignore[override]
        """Network evaluations per step: 1 (RK1) or 2 (RK2)."""
        return 1 if self.base == "rk1" else 2

    def extra_repr(self) -> str:
        iv = "untrained" if not self.trained else f"trained on [{self.interval[0]:.6g}, {self.interval[1]:.6g}]"
        return f"n_steps={self.n_steps}, base={self.base!r}, {iv}"

    @property
    def trained(self) -> bool:
        """Whether :func:`fit_bespoke` (or a load) has tied this solver to an interval."""
        return bool(torch.isfinite(self.interval).all())

    def frozen(self) -> bool:
        """Whether a solve run now can treat the coefficients as constants: no parameter needs a gradient
        (``torch.no_grad()``, or ``requires_grad_(False)``). Then :meth:`rows` are plain floats and
        planned evaluation points, cast once per solve and cached with the plan (:meth:`plan_key`);
        otherwise they are the differentiable float64 coefficients, read step by step."""
        # _parameters, not parameters(): no submodules, and this runs once per solve
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self._parameters.values()))

    def plan_key(self):
        """Cache key of a frozen solver's plan (its class, size and every parameter value), else ``None``."""
        if not self.frozen():
            return None
        values = [t.detach() for t in (*self._parameters.values(), self.interval)]
        if values[0].device.type != "cpu":  # one copy to the host, not one per tensor
            values = [torch.cat([v.reshape(-1) for v in values]).cpu()]
        return (type(self).__name__, self.n_steps, self.base, b"".join(v.numpy().tobytes() for v in values))

    def rows(self, plan) -> list:
        """One row per step: frozen (see :meth:`frozen`), the step's coefficients as floats
        (:class:`FrozenRK1`, :class:`FrozenRK2`); else ``(i, coefficients)`` with the transform's
        differentiable coefficients on the grid, computed once per solve. Checks first that ``grid`` is this
        solver's (:meth:`timesteps`); a cached frozen plan was checked for the same values and grid."""
        grid = plan.grid
        learned = self._times(grid[0], grid[-1])
        self._check_grid(grid, learned)
        if self.frozen():
            with torch.no_grad():
                return self._frozen_rows(plan, self.coefficients(grid[0], grid[-1], times=grid.to(learned)))
        # Forward values are the grid's own times (equal to the learned ones, checked), gradients
        # reach the learned times: t = grid + (t_learned - sg(t_learned)).
        c = self.coefficients(grid[0], grid[-1], times=grid.to(learned) + (learned - learned.detach()))
        return [(i, c) for i in range(self.n_steps)]

    def _frozen_rows(self, plan, c: dict) -> list:
        s, hsd, dt = c["s"], c["hsdot"], c["dt"]
        ds = s[:-1] / s[1:]
        if self.base == "rk1":
            a, b = ((s[:-1] + hsd) / s[1:]).tolist(), (dt * ds).tolist()
            return [FrozenRK1(plan.at(i), a[i], b[i]) for i in range(self.n_steps)]
        sm = c["s_mid"]
        _, mids = plan.stage(c["t_mid"].cpu())
        cols = [(s[:-1] + 0.5 * hsd), 0.5 * dt * s[:-1], sm, ds, c["hsdot_mid"] / (sm * s[1:]), c["dt_mid"] * sm / s[1:]]
        cols = torch.stack(cols).tolist()
        return [FrozenRK2(plan.at(i), mids[i], *(col[i] for col in cols)) for i in range(self.n_steps)]

    def step(self, model, state: State, c, noise=None) -> State:
        """One RK1/RK2 step of the scale-time transformed ODE from node ``i`` to ``i + 1`` (see :meth:`advance`)."""
        x = state.x
        if type(c) is FrozenRK1:
            return State(axpy(c.a * x, c.b, model(x, c.s).velocity))
        if type(c) is FrozenRK2:
            z = axpy(c.cz * x, c.bz, model(x, c.s).velocity)
            u_m = model(z / c.sm, c.m).velocity
            return State(axpy(lin(c.cx, x, c.cm, z), c.bm, u_m))
        i, coefficients = c
        return State(self.advance(model, x, i, coefficients))

    # --- the transform -----------------------------------------------------------------------
    def _phi(self) -> Tensor:
        """Normalised node times ``phi_0 = 0 < phi_1 < ... < phi_n = 1``."""
        d = torch.softmax(torch.cat([self.theta_t.new_zeros(1), self.theta_t]), 0)
        one = self.theta_t.new_ones(1)
        return torch.cat([self.theta_t.new_zeros(1), torch.cumsum(d, 0)[:-1], one])

    def _times(self, t_start, t_end) -> Tensor:
        t0, t1 = (torch.as_tensor(v, dtype=torch.float64, device=self.theta_t.device) for v in (t_start, t_end))
        t = t0 + (t1 - t0) * self._phi()
        # the ends are the interval's exactly (no rounding in t0 + (t1 - t0))
        return torch.cat([t0.reshape(1).detach(), t[1:-1], t1.reshape(1).detach()])

    def timesteps(self, t_start: float | None = None, t_end: float | None = None) -> Tensor:
        """The solver's ``n_steps + 1`` node times from ``t_start`` to ``t_end`` (float64, detached):
        the grid to pass to ``solve``. Defaults to the trained interval."""
        if t_start is None or t_end is None:
            if not self.trained:
                raise ValueError("this BespokeSolver is untrained: give t_start and t_end, e.g. solver.timesteps(1.0, 1e-3)")
            t_start = float(self.interval[0]) if t_start is None else t_start
            t_end = float(self.interval[1]) if t_end is None else t_end
        t_start, t_end = float(t_start), float(t_end)
        for name, v in (("t_start", t_start), ("t_end", t_end)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v} is outside [0, 1]")
        if t_start == t_end:
            raise ValueError("t_start and t_end must differ")
        return self._times(t_start, t_end).detach().cpu()

    def coefficients(self, t_start, t_end, times: Tensor | None = None) -> dict:
        """Per-step float64 quantities of the transform on ``[t_start, t_end]`` (differentiable):

        ``t`` (n+1 node times), ``dt = h tdot_i``, ``s`` (n+1, ``s_0 = 1``), ``hsdot = h sdot_i``; for
        RK2 also ``t_mid``, ``dt_mid``, ``s_mid``, ``hsdot_mid``. ``times`` overrides the node times
        (used to evaluate at a given grid, or at straight-through times during training).
        """
        h = 1.0 / self.n_steps
        t = self._times(t_start, t_end) if times is None else times
        dtn = t[1:] - t[:-1]
        one = self.log_s.new_ones(1)
        c = {
            "t": t,
            "dt": dtn * torch.exp(self.kappa),
            "s": torch.cat([one, torch.exp(self.log_s)]),
            "hsdot": h * self.sdot,
        }
        if self.base == "rk2":
            c["t_mid"] = t[:-1] + torch.sigmoid(self.theta_mid) * dtn
            c["dt_mid"] = dtn * torch.exp(self.kappa_mid)
            c["s_mid"] = torch.exp(self.log_s_mid)
            c["hsdot_mid"] = h * self.sdot_mid
        return c

    def advance(self, model, x: Tensor, i: int, c: dict) -> Tensor:
        """One bespoke step ``x_i -> x_{i+1}`` with coefficients ``c`` from :meth:`coefficients`."""
        cast = lambda v: v.to(dtype=x.dtype, device=x.device)
        t, dt, s, hsd = c["t"], c["dt"], c["s"], c["hsdot"]
        u = model(x, t[i]).velocity
        if self.base == "rk1":
            return _add_scaled(cast((s[i] + hsd[i]) / s[i + 1]) * x, dt[i] * s[i] / s[i + 1], u)
        sm, hsdm = c["s_mid"][i], c["hsdot_mid"][i]
        z = _add_scaled(cast(s[i] + 0.5 * hsd[i]) * x, 0.5 * dt[i] * s[i], u)
        u_m = model(z / cast(sm), c["t_mid"][i]).velocity
        y = cast(s[i] / s[i + 1]) * x + cast(hsdm / (sm * s[i + 1])) * z
        return _add_scaled(y, c["dt_mid"][i] * sm / s[i + 1], u_m)

    def adjoint_step(self, model, adj, grid: Tensor, i: int):
        """Adjoint of one step from ``grid[i + 1]`` back to ``grid[i]`` along the recorded states
        (used by ``ContinuousAdjoint``; ``model`` is an ``AdjointModel``).

        It is the transpose of the step's Jacobian at the recorded ``x_i``: RK1
        ``a_i = (s_i + h sdot_i)/s_{i+1} a + h tdot_i s_i/s_{i+1} u_x(x_i, t_i)^T a`` (1 VJP), which in
        ``abar = a/s`` reads ``abar_i = abar_{i+1} + h (sdot_i/s_i + tdot_i u_x^T) abar_{i+1}``: a
        first-order step of the transformed adjoint ODE ``dabar/dr = -(sdot/s + tdot u_x^T) abar``
        with the transform's coefficients at ``r_i`` (the solver has none at ``r_n``, where an explicit
        backward Euler step would need them). RK2 is transposed stage by stage (1 NFE to rebuild the
        midpoint stage, 2 VJPs), a second-order scheme for the same ODE. Hence the result equals the
        exact gradient of the bespoke solve (as ``Checkpoint`` gives) to rounding.
        """
        from ..adjoint.equations import AdjointState

        a = adj.a
        cast = lambda v: v.detach().to(dtype=a.dtype, device=a.device)
        with torch.no_grad():
            c = self.coefficients(grid[0], grid[-1], times=grid.to(self.theta_t))
        t, dt, s, hsd = c["t"], c["dt"], c["s"], c["hsdot"]
        x = model.x(i)
        if self.base == "rk1":
            vx, vin = model.vjp(x, t[i], cast(dt[i] * s[i] / s[i + 1]) * a, "velocity")
            new_a = cast((s[i] + hsd[i]) / s[i + 1]) * a + vx
            return AdjointState(new_a, tuple(p + v for p, v in zip(adj.inputs, vin)), adj.history)
        sm, hsdm = c["s_mid"][i], c["hsdot_mid"][i]
        with torch.no_grad():
            model.nfe += 1
            u = model.denoiser(x, t[i], model.cond).velocity
        z = cast(s[i] + 0.5 * hsd[i]) * x + cast(0.5 * dt[i] * s[i]) * u
        v_m, vin_m = model.vjp(z / cast(sm), c["t_mid"][i], cast(c["dt_mid"][i] * sm / s[i + 1]) * a, "velocity")
        g_z = cast(hsdm / (sm * s[i + 1])) * a + v_m / cast(sm)
        v_i, vin_i = model.vjp(x, t[i], cast(0.5 * dt[i] * s[i]) * g_z, "velocity")
        new_a = cast(s[i] / s[i + 1]) * a + cast(s[i] + 0.5 * hsd[i]) * g_z + v_i
        inputs = tuple(p + v + w for p, v, w in zip(adj.inputs, vin_m, vin_i))
        return AdjointState(new_a, inputs, adj.history)

    def rollout(self, model, x: Tensor, c: dict) -> Tensor:
        """The whole solve from ``x`` with coefficients ``c`` (training; ``model`` a ``ModelCall``)."""
        for i in range(self.n_steps):
            x = self.advance(model, x, i, c)
        return x

    def lipschitz(self, c: dict, lip_u: float = 1.0) -> Tensor:
        """Per-step Lipschitz bounds ``L_i`` of the step map in ``x`` given ``Lip(u) <= lip_u``
        (the paper's RMSE bound): RK1 ``L_i = s_i/s_{i+1} (1 + h Lbar_i)``, RK2
        ``L_i = s_i/s_{i+1} (1 + h Lbar_m (1 + h Lbar_i / 2))``, ``h Lbar = h|sdot|/s + |h tdot| lip_u``."""
        s = c["s"]
        hl = c["hsdot"].abs() / s[:-1] + c["dt"].abs() * lip_u
        if self.base == "rk1":
            return s[:-1] / s[1:] * (1.0 + hl)
        hl_m = c["hsdot_mid"].abs() / c["s_mid"] + c["dt_mid"].abs() * lip_u
        return s[:-1] / s[1:] * (1.0 + hl_m * (1.0 + 0.5 * hl))

    # --- checks ------------------------------------------------------------------------------
    def _check_grid(self, grid: Tensor, learned: Tensor | None = None) -> None:
        n = self.n_steps
        if grid.ndim != 1 or len(grid) != n + 1:
            raise ValueError(
                f"BespokeSolver(n_steps={n}) takes a grid of exactly {n + 1} points, got {len(grid)}; "
                f"pass grid=solver.timesteps(t_start, t_end)"
            )
        t0, t1 = float(grid[0]), float(grid[-1])
        if self.trained:
            i0, i1 = float(self.interval[0]), float(self.interval[1])
            if abs(t0 - i0) > 1e-12 or abs(t1 - i1) > 1e-12:
                raise ValueError(
                    f"this BespokeSolver was trained on the interval t={i0:.6g} -> {i1:.6g}, but the grid runs "
                    f"{t0:.6g} -> {t1:.6g}; pass grid=solver.timesteps() (or retrain for the new interval)"
                )
        learned = self._times(t0, t1) if learned is None else learned
        err = float((grid.to(learned) - learned.detach()).abs().max())
        if err > _GRID_RTOL * abs(t1 - t0):
            raise ValueError(
                f"the grid's interior times differ from this BespokeSolver's learned times by up to {err:.3g}; "
                f"pass grid=solver.timesteps({t0:.6g}, {t1:.6g})"
            )

    # --- construction from a known transform ---------------------------------------------------
    @classmethod
    def from_transform(cls, n_steps: int, base: str, phi: Callable, dphi: Callable, s: Callable, ds: Callable):
        """The bespoke solver of a given smooth transform: ``phi(r)`` (normalised time, increasing,
        ``phi(0) = 0``, ``phi(1) = 1``), its derivative ``dphi``, the scale ``s(r) > 0`` with ``s(0) = 1``
        and ``ds``; each maps a float64 tensor of ``r`` values to a tensor. Sets
        ``t_i = phi(i/n)``, ``tdot_i = phi'(i/n)``, ``s_i``, ``sdot_i`` (and the values at ``r_{i+1/2}``)."""
        solver = cls(n_steps, base)
        n, h = n_steps, 1.0 / n_steps
        r = torch.arange(n + 1, dtype=torch.float64) * h
        rm = (torch.arange(n, dtype=torch.float64) + 0.5) * h
        f = lambda fn, x: torch.as_tensor(fn(x), dtype=torch.float64).expand_as(x)
        p = f(phi, r)
        if abs(float(p[0])) > 1e-12 or abs(float(p[-1]) - 1.0) > 1e-12:
            raise ValueError("phi must satisfy phi(0) = 0 and phi(1) = 1")
        if abs(float(f(s, r[:1])[0]) - 1.0) > 1e-12:
            raise ValueError("s must satisfy s(0) = 1")
        d = p[1:] - p[:-1]
        if bool((d <= 0).any()) or bool((f(dphi, r[:-1]) <= 0).any()) or bool((f(dphi, rm) <= 0).any()):
            raise ValueError("phi must be strictly increasing with a positive derivative")
        if bool((f(s, r) <= 0).any()) or bool((f(s, rm) <= 0).any()):
            raise ValueError("s must be positive")
        with torch.no_grad():
            solver.theta_t.copy_(torch.log(d[1:]) - torch.log(d[0]))
            solver.kappa.copy_(torch.log(h * f(dphi, r[:-1]) / d))
            solver.log_s.copy_(torch.log(f(s, r[1:])))
            solver.sdot.copy_(f(ds, r[:-1]))
            if base == "rk2":
                rho = (f(phi, rm) - p[:-1]) / d
                if bool((rho <= 0).any()) or bool((rho >= 1).any()):
                    raise ValueError("phi(r_{i+1/2}) must lie strictly between phi(r_i) and phi(r_{i+1})")
                solver.theta_mid.copy_(torch.log(rho) - torch.log1p(-rho))
                solver.kappa_mid.copy_(torch.log(h * f(dphi, rm) / d))
                solver.log_s_mid.copy_(torch.log(f(s, rm)))
                solver.sdot_mid.copy_(f(ds, rm))
        return solver

    @classmethod
    def for_nfe(cls, nfe: int, base: str = "rk2") -> "BespokeSolver":
        """A fresh solver spending exactly ``nfe`` network evaluations: ``nfe`` RK1 steps or ``nfe / 2``
        RK2 steps. ``ValueError`` naming the nearest achievable budgets if ``base`` cannot spend ``nfe``."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe must be a positive int, got {nfe!r}")
        if base not in _BASES:
            raise ValueError(f"base must be one of {_BASES}, got {base!r}")
        per = 1 if base == "rk1" else 2
        if nfe % per:
            lo, hi = nfe - nfe % per, nfe - nfe % per + per
            near = f"nfe={hi}" if lo < per else f"nfe={lo} or nfe={hi}"
            raise ValueError(f"NFE {nfe} is not achievable with base={base!r} ({per} evaluations per step): use "
                             f"{near}, or base='rk1' or BespokeNSSolver for any NFE")
        return cls(nfe // per, base)

    # --- warm start ----------------------------------------------------------------------------
    def _transform_samples(self) -> dict:
        """The learned transform as samples at ``r``: ``phi`` and ``s`` at every node and midpoint,
        ``dphi = phi'`` and ``sdot`` where a step evaluates them (float64 numpy arrays, sorted by ``r``)."""
        n, h = self.n_steps, 1.0 / self.n_steps
        with torch.no_grad():
            phi = self._phi()
            d = phi[1:] - phi[:-1]
            r = torch.arange(n + 1, dtype=torch.float64) * h
            s = torch.cat([self.log_s.new_ones(1), torch.exp(self.log_s)])
            out = {"phi": [(r, phi)], "s": [(r, s)], "dphi": [(r[:-1], d * torch.exp(self.kappa) / h)],
                   "sdot": [(r[:-1], self.sdot.detach())]}
            if self.base == "rk2":
                rm = r[:-1] + 0.5 * h
                out["phi"].append((rm, phi[:-1] + torch.sigmoid(self.theta_mid) * d))
                out["s"].append((rm, torch.exp(self.log_s_mid)))
                out["dphi"].append((rm, d * torch.exp(self.kappa_mid) / h))
                out["sdot"].append((rm, self.sdot_mid.detach()))
        samples = {}
        for k, parts in out.items():
            rr = torch.cat([p[0] for p in parts]).numpy()
            vv = torch.cat([p[1].detach().cpu() for p in parts]).numpy()
            order = np.argsort(rr, kind="stable")
            samples[k] = (rr[order], vv[order])
        return samples

    def load_transform(self, other: "BespokeSolver") -> None:
        """Set this solver's parameters to ``other``'s transform resampled at this solver's ``r``
        nodes (warm start at another step count, same base): ``phi`` and ``log s`` are interpolated
        piecewise linearly between ``other``'s samples (nodes and, for RK2, midpoints), ``log phi'``
        and ``sdot`` likewise, held constant beyond the last sample. Monotonicity and positivity are
        kept, so the result is a valid transform; its interval and fingerprint are not copied."""
        if not isinstance(other, BespokeSolver):
            raise TypeError(f"other must be a BespokeSolver, got {type(other).__name__}")
        if other.base != self.base:
            raise ValueError(f"cannot load a base={other.base!r} transform into a base={self.base!r} solver")
        smp = other._transform_samples()

        def interp(key, log=False):
            rr, vv = smp[key]
            vv = np.log(vv) if log else vv

            def f(r):
                y = np.interp(np.asarray(r, dtype=np.float64), rr, vv)
                return torch.as_tensor(np.exp(y) if log else y, dtype=torch.float64)
            return f

        src = BespokeSolver.from_transform(self.n_steps, self.base, interp("phi"), interp("dphi", log=True),
                                           interp("s", log=True), interp("sdot"))
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(dict(src.named_parameters())[name])

    # --- persistence -------------------------------------------------------------------------
    def save(self, path, denoiser=None, fingerprint: str | None = None, *, model_id: str | None = None,
             info: dict | None = None) -> None:
        """Write the parameters with the metadata :meth:`load` checks: format version, ``n_steps``,
        ``base``, the trained interval, the fingerprint of the model it was trained for (taken from
        ``denoiser`` and ``model_id``, else from ``fingerprint``, else the one :func:`fit_bespoke`
        recorded), ``info`` (a JSON-serialisable dict, default :attr:`info`; read back as ``solver.info``)
        and a SHA-256 of all of it. The file is replaced atomically (written next to ``path``, then
        renamed): an interrupted save leaves the previous file intact."""
        fp = model_fingerprint(denoiser, model_id) if denoiser is not None else fingerprint
        if fp is not None and self.model_fingerprint is not None and fp != self.model_fingerprint:
            raise ValueError("this solver was trained for a different model than the one given to save(); "
                             "a bespoke solver is only valid for the model it was fitted to")
        fp = fp if fp is not None else self.model_fingerprint
        if fp is None:
            raise ValueError("unknown model: pass the denoiser this solver was trained for, save(path, denoiser)")
        info = self.info if info is None else info
        if info is not None:
            if not isinstance(info, dict):
                raise TypeError(f"info must be a dict, got {type(info).__name__}")
            try:
                info = json.loads(json.dumps(info, allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"info must be JSON-serialisable with finite numbers: {exc}") from exc
        meta = {"format": _FORMAT, "version": _VERSION, "n_steps": self.n_steps, "base": self.base,
                "model_fingerprint": fp, "info": info}
        tensors = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        save_atomic({**meta, "state_dict": tensors, "sha256": digest(meta, tensors)}, path)

    @classmethod
    def load(cls, path, *, denoiser, n_steps: int | None = None, base: str | None = None,
             model_id: str | None = None) -> "BespokeSolver":
        """Load a solver saved by :meth:`save` for ``denoiser`` (and ``model_id``, if it was saved with
        one). ``ValueError`` naming the file if it is unreadable, incomplete or altered (checksum), or
        was trained for a different model (fingerprint) or another ``n_steps``/``base`` than asked;
        ``FileNotFoundError`` if there is no file."""
        blob = _read_blob(path)
        if blob["base"] not in cls._file_bases:
            other = "BespokeNSSolver" if blob["base"] == "ns" else "BespokeSolver"
            raise ValueError(f"{path} holds a base={blob['base']!r} solver: load it with {other}.load")
        if n_steps is not None and n_steps != blob["n_steps"]:
            raise ValueError(
                f"{path} holds a BespokeSolver trained for n_steps={blob['n_steps']}, but n_steps={n_steps} was "
                f"requested; a bespoke solver's learned times are specific to its step count, so retrain"
            )
        if base is not None and base != blob["base"]:
            raise ValueError(f"{path} holds a base={blob['base']!r} BespokeSolver, but base={base!r} was requested")
        fp = model_fingerprint(denoiser, model_id)
        if fp != blob["model_fingerprint"]:
            raise ValueError(
                f"{path} was trained for a different model (fingerprint {blob['model_fingerprint']}, this denoiser "
                f"has {fp}); a bespoke solver only fits the model it was trained for, so retrain it"
            )
        solver = cls(blob["n_steps"], blob["base"])
        try:
            solver.load_state_dict(blob["state_dict"])
        except RuntimeError as exc:  # missing/unexpected keys, wrong shapes
            raise ValueError(f"{path}: the saved parameters do not fit a BespokeSolver({blob['n_steps']}, "
                             f"{blob['base']!r}): {describe_error(exc)}") from exc
        if not all(bool(torch.isfinite(p).all()) for p in solver.parameters()):
            raise ValueError(f"{path}: the saved parameters are not all finite")
        solver.model_fingerprint = fp
        solver.info = blob.get("info")
        return solver


def _read_blob(path) -> dict:
    """The checked contents of a saved solver: every key present with its type, checksum verified."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no saved BespokeSolver at {path}")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, ...: torch's messages do not name the file
        raise ValueError(f"{path} is not a readable BespokeSolver file ({describe_error(exc)})") from exc
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a saved BespokeSolver")
    if blob.get("version") != _VERSION:
        raise ValueError(f"{path} has BespokeSolver format version {blob.get('version')!r}, expected {_VERSION} "
                         f"(version 1 files carry no checksum: retrain, or load with the release that wrote it)")
    kinds = {"n_steps": int, "base": str, "model_fingerprint": str, "state_dict": dict, "sha256": str}
    for key, kind in kinds.items():
        if not isinstance(blob.get(key), kind) or isinstance(blob.get(key), bool):
            raise ValueError(f"{path} is an incomplete BespokeSolver file: {key!r} is missing or not a {kind.__name__}")
    tensors = blob["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()):
        raise ValueError(f"{path} is a damaged BespokeSolver file: its state_dict holds non-tensors")
    if not isinstance(blob.get("info"), (dict, type(None))):
        raise ValueError(f"{path} is a damaged BespokeSolver file: 'info' is not a dict")
    meta = {k: blob.get(k) for k in ("format", "version", "n_steps", "base", "model_fingerprint", "info")}
    if digest(meta, tensors) != blob["sha256"]:
        raise ValueError(f"{path} fails its checksum: the file was altered or damaged after it was saved")
    if blob["n_steps"] < 1 or blob["base"] not in _BASES + ("ns",):
        raise ValueError(f"{path} declares an invalid BespokeSolver(n_steps={blob['n_steps']!r}, base={blob['base']!r})")
    return blob
