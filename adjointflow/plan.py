"""Per-solve plans: everything that depends only on the schedule, the grid and the solver, computed once.

A solve evaluates ``alpha, sigma, lambda`` and their derivatives at a fixed set of times (the grid, plus
the intermediate points of singlestep methods), and every coefficient of every step is a function of
those numbers alone. :class:`Plan` computes them once, in float64 on the host, vectorised over the
steps; the solver turns them into one *row* per step (``Solver.rows``: a ``NamedTuple`` of floats,
flags and :class:`At` evaluation points, the paper's symbols as field names); :meth:`Plan.bind` casts
the rows once to the sample (network times, prediction conversions, dtype, device). The step then only
reads its row: no schedule evaluation, no float64 round trip, no host synchronisation.

Decisions (order of a warm-up step, first-order steps at singular ends, ``lower_order_final``,
conversions that do not exist where ``alpha = 0`` or ``sigma = 0``) are made here, from float64 values,
before the loop. See docs/design.md §4 (the step protocol) for a worked example.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .models import Conversion, EvalPoint, affine_coefficients
from .schedules import NoiseSchedule, as_time

__all__ = ["At", "Nodes", "Plan", "BoundPlan", "bound_plan"]


class At(int):
    """Index of an evaluation time in :attr:`Plan.nodes`. A row field of this type becomes an
    :class:`~adjointflow.models.EvalPoint` (network time + conversions) when the plan is bound."""

    __slots__ = ()


# row field of Nodes -> the schedule method that computes it
_METHODS = {"log_alpha": "log_alpha", "log_sigma": "log_sigma", "alpha": "alpha", "sigma": "sigma",
            "dalpha": "dalpha_dt", "dsigma": "dsigma_dt"}


@dataclass(frozen=True)
class Nodes:
    """Float64 schedule values (numpy arrays, host) at the times ``t``: ``log alpha``, ``log sigma``,
    ``alpha``, ``sigma`` and the time derivatives ``dalpha = alpha'``, ``dsigma = sigma'``;
    ``lam = log alpha - log sigma``."""

    t: np.ndarray
    log_alpha: np.ndarray
    log_sigma: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    dalpha: np.ndarray
    dsigma: np.ndarray

    @property
    def lam(self) -> np.ndarray:
        return self.log_alpha - self.log_sigma

    def __len__(self) -> int:
        return self.t.size

    def __getitem__(self, index) -> "Nodes":
        return Nodes(*(getattr(self, f.name)[index] for f in fields(self)))

    def cat(self, other: "Nodes") -> "Nodes":
        return Nodes(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))

    @staticmethod
    def of(schedule: NoiseSchedule, t) -> "Nodes":
        """Evaluate ``schedule`` at the 1-D times ``t`` (its methods act elementwise). A NaN, or an
        infinite ``alpha``/``sigma``, is the schedule's fault and raises ``ValueError`` saying so."""
        t = as_time(t).detach().cpu().reshape(-1)
        values = {}
        for name, method in _METHODS.items():
            v = np.broadcast_to(as_time(getattr(schedule, method)(t)).detach().cpu().numpy(), t.shape)
            bad = np.isnan(v) | (np.isinf(v) if name in ("alpha", "sigma") else False)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"{type(schedule).__name__}.{method}(t={float(t[j]):.6g}) = {float(v[j])}: the schedule itself "
                    f"returned a non-finite value there (not the model); fix the schedule or keep the grid off that time")
            values[name] = np.array(v, dtype=np.float64)
        return Nodes(t.numpy().copy(), **values)


class Plan:
    """What one solve needs from the schedule and the grid, in float64 (host).

    ``nodes`` holds the schedule at the ``n + 1`` grid times (indices ``0..n``) followed by any extra
    evaluation times a solver registers with :meth:`stage`. ``start``/``end`` are the nodes at each step's
    start ``t_i`` and end ``t_{i+1}`` (length ``n``). ``rows`` (one per step) are set by the solver;
    ``history[i]`` overrides the number of history tensors the state carries at step ``i`` (only
    :meth:`~adjointflow.solvers.base.Solver.step_at` uses it).
    """

    def __init__(self, schedule: NoiseSchedule, grid: Tensor):
        self.schedule = schedule
        self.grid = grid
        self.n = grid.numel() - 1
        self.times: list[float] = grid.tolist()
        self.nodes = Nodes.of(schedule, grid)
        self.rows: list = []
        self.history: dict[int, int] = {}

    @property
    def start(self) -> Nodes:
        return self.nodes[: self.n]

    @property
    def end(self) -> Nodes:
        return self.nodes[1 : self.n + 1]

    def on_grid(self, like: Tensor, *names: str) -> tuple[Tensor, ...]:
        """The schedule values ``names`` (:class:`Nodes` fields, e.g. ``"alpha"``) at the ``n + 1`` grid times,
        in ``like``'s dtype on its device: the planned float64 values, one host-to-device copy for all."""
        values = np.stack([getattr(self.nodes, k)[: self.n + 1] for k in names])
        return torch.from_numpy(values).to(dtype=like.dtype, device=like.device).unbind(0)

    def at(self, i: int) -> At:
        """The evaluation point at grid time ``i``."""
        return At(i)

    def stage(self, t) -> tuple[Nodes, list[At]]:
        """Register extra evaluation times ``t`` (1-D float64 array or tensor, e.g. singlestep intermediate
        points): their schedule values and their evaluation points."""
        new = Nodes.of(self.schedule, torch.as_tensor(t))
        first = len(self.nodes)
        self.nodes = self.nodes.cat(new)
        return new, [At(first + k) for k in range(len(new))]

    def bind(self, denoiser, x: Tensor) -> "BoundPlan":
        """The rows for ``denoiser`` and samples like ``x``: every :class:`At` becomes an
        :class:`~adjointflow.models.EvalPoint` (network time of shape ``(batch,)`` and the float64
        conversion coefficients of ``denoiser.prediction``) and every float a 0-dim tensor of ``x``'s dtype
        and device (one host-to-device copy per solve; a 0-dim tensor operand is also cheaper than a
        Python float, which torch wraps into a new tensor at every op, and it lets a compiled step
        serve every row)."""
        floats: list[float] = []
        evals = _eval_points(self.nodes, denoiser, x, floats)  # conversion coefficients first, then the rows'
        for r in self.rows:
            _collect(r, floats)
        values = iter(torch.tensor(floats, dtype=x.dtype, device=x.device).unbind(0)) if floats else iter(())
        sch = self.schedule
        evals = [EvalPoint(j, t, tn, Conversion(kind, {tg: None if pq is None else
                                                      (None if pq[0] is None else next(values), next(values))
                                                      for tg, pq in table.items()}, where, sch))
                 for j, t, tn, kind, table, where in evals]
        rows = [_bind(r, evals, values) for r in self.rows]
        return BoundPlan(self, rows, evals)


@dataclass
class BoundPlan:
    """A :class:`Plan` bound to a model and a sample: ``rows[i]`` is what step ``i`` reads and
    ``evals[j]`` the evaluation point of node ``j`` (grid node ``j`` for ``j <= n``)."""

    plan: Plan
    rows: list
    evals: list = field(repr=False)


#: conversions planned per evaluation point (the ones solvers and guidance read); others are computed from
#: the schedule on demand (:meth:`~adjointflow.models.Prediction.as_`)
PLANNED = ("x0", "eps", "velocity")


def _conversion_tables(kind: str, nodes: Nodes, floats: list) -> list[dict]:
    """Per node, ``{target: None | (p, q)}`` in float64 (``p = None`` where it is 0); the coefficients are
    appended to ``floats`` in the order :meth:`Plan.bind` consumes them."""
    m = len(nodes)
    columns = []
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for target in PLANNED:
            if target == kind:
                continue
            p, q = (np.broadcast_to(np.asarray(v, dtype=np.float64), (m,)) for v in
                    affine_coefficients(kind, target, nodes.alpha, nodes.sigma, nodes.dalpha, nodes.dsigma))
            columns.append((target, p.tolist(), q.tolist(), (np.isfinite(p) & np.isfinite(q)).tolist()))
    tables = []
    for j in range(m):
        table = {}
        for target, p, q, ok in columns:
            if not ok[j]:
                table[target] = None
                continue
            if p[j] != 0.0:
                floats.append(p[j])
            floats.append(q[j])
            table[target] = (None if p[j] == 0.0 else p[j], q[j])
        tables.append(table)
    return tables


def _eval_points(nodes: Nodes, denoiser, x: Tensor, floats: list) -> list[tuple]:
    t_net = denoiser.network_times(torch.from_numpy(nodes.t), x).unbind(0)
    kind = denoiser.prediction
    tables = _conversion_tables(kind, nodes, floats)
    where = zip(nodes.t.tolist(), nodes.alpha.tolist(), nodes.sigma.tolist())
    return [(j, w[0], tn, kind, tb, w) for j, (tn, tb, w) in enumerate(zip(t_net, tables, where))]


def _collect(v: Any, out: list) -> None:
    if type(v) is float:
        out.append(v)
    elif isinstance(v, tuple):
        for e in v:
            _collect(e, out)


def _bind(v: Any, evals: list, values) -> Any:
    tv = type(v)
    if tv is At:
        return evals[v]
    if tv is float:
        return next(values)
    if isinstance(v, tuple):
        out = [_bind(e, evals, values) for e in v]
        return tv._make(out) if hasattr(tv, "_make") else tuple(out)
    return v


# --- caches --------------------------------------------------------------------------------------------
# Repeated solves on the same grid (sampling batch after batch, an optimisation loop) reuse the plan:
# the host part keyed by the *values* of the solver, the schedule and the grid; the bound part (network
# times, conversions, dtype/device) per denoiser, batch size, dtype and device.
_PLANS: OrderedDict = OrderedDict()
_BOUND: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CACHE_SIZE = 128  # plans per process and bound plans per denoiser (a few kB each; LRU)


def _state_key(obj):
    """``(type, every instance attribute)`` of an immutable object, or ``None`` if it cannot serve as a key
    (unhashable attributes, or a module: a learned solver's rows change as it trains, unless it gives a
    ``plan_key()`` of its current values)."""
    if isinstance(obj, torch.nn.Module):
        plan_key = getattr(obj, "plan_key", None)
        return plan_key() if plan_key is not None else None
    key = (type(obj), tuple(sorted(vars(obj).items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _lru_get(cache: OrderedDict, key, make):
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def bound_plan(solver, denoiser, grid: Tensor, x: Tensor) -> BoundPlan:
    """``solver.plan(denoiser.schedule, grid).bind(denoiser, x)``, from a cache when the same solver,
    schedule, grid, denoiser and sample layout (batch size, dtype, device) were planned before."""
    sk, ck = _state_key(solver), _state_key(denoiser.schedule)
    if sk is None or ck is None:
        return solver.plan(denoiser.schedule, grid).bind(denoiser, x)
    plan = _lru_get(_PLANS, (sk, ck, grid.numpy().tobytes()), lambda: solver.plan(denoiser.schedule, grid))
    per_denoiser = _BOUND.setdefault(denoiser, OrderedDict())
    key = (id(plan), denoiser.prediction, denoiser.net_time, denoiser.noise_at_zero, denoiser.schedule,
           x.shape[0], x.dtype, x.device)
    bound = _lru_get(per_denoiser, key, lambda: plan.bind(denoiser, x))
    if bound.plan is not plan:  # the id of an evicted plan was reused
        bound = per_denoiser[key] = plan.bind(denoiser, x)
    return bound
