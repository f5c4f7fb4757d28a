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
before the loop. See ``notes/PLAN_API.md`` in the repository's notes for a worked example.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from .models import PREDICTIONS, Conversion, EvalPoint, affine_coefficients
from .schedules import NoiseSchedule, as_time

__all__ = ["At", "Nodes", "Plan", "BoundPlan"]


class At(int):
    """Index of an evaluation time in :attr:`Plan.nodes`. A row field of this type becomes an
    :class:`~adjointflow.models.EvalPoint` (network time + conversions) when the plan is bound."""

    __slots__ = ()


# row field of Nodes -> the schedule method that computes it
_METHODS = {"log_alpha": "log_alpha", "log_sigma": "log_sigma", "alpha": "alpha", "sigma": "sigma",
            "dalpha": "dalpha_dt", "dsigma": "dsigma_dt"}


@dataclass(frozen=True)
class Nodes:
    """Float64 (CPU) schedule values at the times ``t``: ``log alpha``, ``log sigma``, ``alpha``, ``sigma``
    and the time derivatives ``dalpha = alpha'``, ``dsigma = sigma'``; ``lam = log alpha - log sigma``."""

    t: Tensor
    log_alpha: Tensor
    log_sigma: Tensor
    alpha: Tensor
    sigma: Tensor
    dalpha: Tensor
    dsigma: Tensor

    @property
    def lam(self) -> Tensor:
        return self.log_alpha - self.log_sigma

    def __len__(self) -> int:
        return self.t.numel()

    def __getitem__(self, index) -> "Nodes":
        return Nodes(*(getattr(self, f.name)[index] for f in fields(self)))

    def cat(self, other: "Nodes") -> "Nodes":
        return Nodes(*(torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))

    @staticmethod
    def of(schedule: NoiseSchedule, t) -> "Nodes":
        """Evaluate ``schedule`` at the 1-D times ``t`` (its methods act elementwise). A NaN, or an
        infinite ``alpha``/``sigma``, is the schedule's fault and raises ``ValueError`` saying so."""
        t = as_time(t).detach().cpu().reshape(-1)
        values = {}
        for name, method in _METHODS.items():
            v = torch.broadcast_to(as_time(getattr(schedule, method)(t)).detach().cpu(), t.shape)
            bad = torch.isnan(v) | (torch.isinf(v) if name in ("alpha", "sigma") else torch.zeros_like(v, dtype=torch.bool))
            if bool(bad.any()):
                j = int(bad.nonzero()[0])
                raise ValueError(
                    f"{type(schedule).__name__}.{method}(t={float(t[j]):.6g}) = {float(v[j])}: the schedule itself "
                    f"returned a non-finite value there (not the model); fix the schedule or keep the grid off that time")
            values[name] = v
        return Nodes(t, **values)


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

    def at(self, i: int) -> At:
        """The evaluation point at grid time ``i``."""
        return At(i)

    def stage(self, t: Tensor) -> tuple[Nodes, list[At]]:
        """Register extra evaluation times ``t`` (1-D float64, e.g. singlestep intermediate points):
        their schedule values and their evaluation points."""
        new = Nodes.of(self.schedule, t)
        first = len(self.nodes)
        self.nodes = self.nodes.cat(new)
        return new, [At(first + k) for k in range(len(new))]

    def bind(self, denoiser, x: Tensor, *, tensors: bool = False) -> "BoundPlan":
        """The rows for ``denoiser`` and samples like ``x``: every :class:`At` becomes an
        :class:`~adjointflow.models.EvalPoint` (network time of shape ``(batch,)`` and the float64
        conversion coefficients of ``denoiser.prediction``). With ``tensors=True`` every float becomes a
        0-dim tensor of ``x``'s dtype and device (rows of a compiled step; one host-to-device copy)."""
        evals = _eval_points(self.nodes, denoiser, x, tensors)
        if not tensors:
            rows = [_bind(r, evals, None) for r in self.rows]
        else:
            floats: list[float] = []
            for r in self.rows:
                _collect(r, floats)
            values = iter(torch.tensor(floats, dtype=x.dtype, device=x.device).unbind(0)) if floats else iter(())
            rows = [_bind(r, evals, values) for r in self.rows]
        return BoundPlan(self, rows, evals)


@dataclass
class BoundPlan:
    """A :class:`Plan` bound to a model and a sample: ``rows[i]`` is what step ``i`` reads and
    ``evals[j]`` the evaluation point of node ``j`` (grid node ``j`` for ``j <= n``)."""

    plan: Plan
    rows: list
    evals: list = field(repr=False)


def _conversions(kind: str, nodes: Nodes, x: Tensor, tensors: bool) -> list[Conversion]:
    a, s, da, ds = nodes.alpha, nodes.sigma, nodes.dalpha, nodes.dsigma
    m = len(nodes)
    columns = {}
    for target in PREDICTIONS:
        if target == kind:
            continue
        p, q = (torch.broadcast_to(torch.as_tensor(v, dtype=torch.float64), (m,)) for v in
                affine_coefficients(kind, target, a, s, da, ds))
        ok = (torch.isfinite(p) & torch.isfinite(q)).tolist()
        columns[target] = (p, q, ok)
    if tensors:
        stacked = torch.stack([torch.stack([p, q]) for p, q, _ in columns.values()]).to(dtype=x.dtype, device=x.device)
        cast = {tg: stacked[j].unbind(1) for j, tg in enumerate(columns)}
    where = list(zip(nodes.t.tolist(), a.tolist(), s.tolist()))
    out = []
    per_target = {tg: (p.tolist(), q.tolist(), ok) for tg, (p, q, ok) in columns.items()}
    for j in range(m):
        pq = {}
        for tg, (p, q, ok) in per_target.items():
            if not ok[j]:
                pq[tg] = None
                continue
            pj = None if p[j] == 0.0 else (p[j] if not tensors else cast[tg][j][0])
            pq[tg] = (pj, q[j] if not tensors else cast[tg][j][1])
        out.append(Conversion(kind, pq, where[j]))
    return out


def _eval_points(nodes: Nodes, denoiser, x: Tensor, tensors: bool) -> list[EvalPoint]:
    t_net = denoiser.network_times(nodes.t, x).unbind(0)
    conv = _conversions(denoiser.prediction, nodes, x, tensors)
    return [EvalPoint(j, t, tn, c) for j, (t, tn, c) in enumerate(zip(nodes.t.tolist(), t_net, conv))]


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
        return v if values is None else next(values)
    if isinstance(v, tuple):
        out = [_bind(e, evals, values) for e in v]
        return tv._make(out) if hasattr(tv, "_make") else tuple(out)
    return v
