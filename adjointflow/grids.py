"""Time grids for sampling: decreasing float64 tensors from ``t_start`` (noise) to ``t_end`` (data).

Kinds:

* ``"uniform"``   -- ``t_i = linspace(t_start, t_end)``
* ``"logsnr"``    -- uniform in ``lambda = log(alpha/sigma)`` (DPM-Solver's ``skip_type='logSNR'``, Lu et al. 2022)
* ``"quadratic"`` -- ``t_i = linspace(sqrt t_start, sqrt t_end)^2`` (DDIM's time-quadratic, Song et al. 2021)
* ``"karras"``    -- ``sigma~_i = (s_max^(1/rho) + i/n (s_min^(1/rho) - s_max^(1/rho)))^rho`` in the VE noise
  level ``sigma~ = sigma/alpha`` (Karras et al. 2022, eq. 5), mapped back to ``t``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .schedules import NoiseSchedule, as_time

__all__ = ["timesteps", "GRID_KINDS", "validate_grid"]

GRID_KINDS = ("uniform", "logsnr", "quadratic", "karras")


def timesteps(
    schedule: NoiseSchedule,
    n: int,
    kind: str | None = None,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float = 7.0,
    denoise_to_zero: bool = False,
) -> Tensor:
    """Return a decreasing float64 grid of ``n + 1`` times (``n`` steps) from ``t_start`` to ``t_end``.

    ``kind`` defaults to ``schedule.default_grid`` ("logsnr" for diffusion schedules, "uniform" for
    :class:`~adjointflow.schedules.LinearFlow`); ``t_start``/``t_end`` default to the schedule's.
    ``denoise_to_zero=True`` appends a final step to ``t = 0``. Swap ``t_start`` and ``t_end`` (or
    call ``.flip(0)``) for an increasing inversion grid.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule instance, got {type(schedule).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of steps) must be a positive int, got {n!r}")
    kind = schedule.default_grid if kind is None else kind
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind {kind!r}; choose one of {GRID_KINDS}")
    t_start = schedule.t_start if t_start is None else float(t_start)
    t_end = schedule.t_end if t_end is None else float(t_end)
    for name, v in (("t_start", t_start), ("t_end", t_end)):
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise ValueError(f"{name}={v} is outside [0, 1]")
    if t_start == t_end:
        raise ValueError("t_start and t_end must differ")

    if kind == "uniform":
        grid = torch.linspace(t_start, t_end, n + 1, dtype=torch.float64)
    elif kind == "quadratic":
        grid = torch.linspace(math.sqrt(t_start), math.sqrt(t_end), n + 1, dtype=torch.float64) ** 2
    else:
        lam0, lam1 = schedule.log_snr(t_start), schedule.log_snr(t_end)
        if not (torch.isfinite(lam0) and torch.isfinite(lam1)):
            raise ValueError(
                f"a {kind!r} grid needs finite log-SNR at both ends, but lambda({t_start})={float(lam0)}, "
                f"lambda({t_end})={float(lam1)}; move t_start below / t_end above the singular end "
                f"(e.g. t_start=0.999, t_end=1e-3) or use kind='uniform'"
            )
        if kind == "logsnr":
            lam = torch.linspace(float(lam0), float(lam1), n + 1, dtype=torch.float64)
        else:  # karras, in sigma~ = exp(-lambda)
            s0, s1 = math.exp(-float(lam0)), math.exp(-float(lam1))
            r = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
            st = (s0 ** (1 / rho) + r * (s1 ** (1 / rho) - s0 ** (1 / rho))) ** rho
            lam = -torch.log(st)
        grid = schedule.t_from_log_snr(lam)
    grid[0], grid[-1] = t_start, t_end  # maps and inverses are exact only to rounding
    if denoise_to_zero:
        if not 0.0 < t_end < t_start:
            raise ValueError("denoise_to_zero needs a decreasing grid with t_end > 0")
        grid = torch.cat([grid, grid.new_zeros(1)])
    return grid


#: grids up to this length are checked on a Python list (validate_grid)
_SHORT = 64


def validate_grid(grid) -> Tensor:
    """Check a user grid: 1-D, at least two points, finite, inside ``[0, 1]``, strictly monotone.

    Returns it as a float64 CPU tensor. Raises ``ValueError``/``TypeError`` with the offending index, and
    ``ValueError`` for a grid that requires grad (never silently detached).
    """
    if isinstance(grid, (list, tuple)):
        grid = torch.tensor(grid, dtype=torch.float64)
    if not isinstance(grid, Tensor):
        raise TypeError(f"grid must be a 1-D tensor or sequence of times, got {type(grid).__name__}")
    if grid.is_complex() or not (grid.is_floating_point() or grid.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"grid must be real, got dtype {grid.dtype}")
    if grid.requires_grad:
        raise ValueError("grid requires grad, but gradients do not flow to the grid times (they are planned in "
                         "float64 on the host); pass grid.detach(), or learn the times with a BespokeSolver")
    g = as_time(grid).cpu()
    if g.ndim != 1:
        raise ValueError(f"grid must be 1-D, got shape {tuple(g.shape)}")
    if g.numel() < 2:
        raise ValueError(f"grid needs at least two times (one step), got {g.numel()}")
    # every solve passes here: one combined test for a good grid, the itemised ones only to name a bad entry
    if g.numel() <= _SHORT:
        # a short grid is tested faster on a list than through numpy's per-call overhead; a NaN fails every
        # comparison, so it falls through to the itemised checks
        v = g.tolist()
        if all(0.0 <= t <= 1.0 for t in v) and (all(map(float.__gt__, v, v[1:])) or all(map(float.__lt__, v, v[1:]))):
            return g
    a = g.numpy()  # host checks in numpy: no per-check tensor dispatch
    d = np.diff(a)
    if np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1 and ((d < 0).all() or (d > 0).all()):
        return g
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise ValueError(f"grid contains NaN/Inf at index {int(bad[0])}")
    bad = np.flatnonzero((a < 0) | (a > 1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"grid time t[{i}]={a[i]} is outside [0, 1]")
    bad = np.flatnonzero(d == 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"grid has a duplicate time at indices {i} and {i + 1} (t={a[i]})")
    bad = np.flatnonzero(np.sign(d) != np.sign(d[0]))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"grid must be strictly monotone (decreasing to sample, increasing to invert); "
            f"direction changes between t[{i}]={a[i]} and t[{i + 1}]={a[i + 1]}"
        )
    return g
