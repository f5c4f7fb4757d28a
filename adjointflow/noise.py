"""Reproducible Brownian motion for SDE solvers, re-queryable by the backward pass."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["BrownianNoise"]

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    # splitmix64 finaliser: spreads a 128-bit key over a 64-bit seed for torch's device generators
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


class BrownianNoise:
    """A seeded Brownian motion ``W`` on ``[t0, t1]`` (default ``[0, 1]``) with values of any shape.

    ``noise(t, t_next)`` returns the increment ``W(t_next) - W(t)`` (distributed ``N(0, |t_next - t|)``
    per entry) for either order of the two times.

    The path is a fixed function of ``(seed, shape, device type)``: the value at any time does not
    depend on which times were queried before, by this object or another one. It is Levy's midpoint
    construction on the dyadic tree of ``[t0, t1]`` (the "virtual Brownian tree" of Li et al. 2020,
    "Scalable Gradients for Stochastic Differential Equations"), with ``T = t1 - t0``::

        W(t0) = 0,   W(t1) = sqrt(T) Z_root,
        W(m) = (W(a) + W(b)) / 2 + sqrt((b - a) / 4) Z_{l,k}     for the midpoint m of a level-l cell [a, b],

    where every ``Z ~ N(0, I)`` comes from a counter-based generator (Philox) keyed by ``(seed, l, k)``
    alone. Cells are split down to width ``T 2^-depth`` (``depth`` = 24: about 6e-8); inside a finest
    cell the path is linear, so an increment over a step ``h`` has its variance right to within
    ``T 2^-depth / (2h)`` relative (3e-4 for ``h = 1e-4``). Dyadic times (every uniform grid of ``2^k``
    steps) hit tree nodes exactly.
    So the increments over nested grids are consistent (a coarse step's increment is the sum of the
    fine steps' increments inside it), the backward pass replays exactly the noise of the forward pass,
    and two objects with the same seed and shape give the same increments over any interval.

    Values are computed in float64 whatever ``dtype`` (so float32 and float64 users see one path) and
    then cast. On CPU the normals come from numpy's ``Philox``; on other devices from torch's generator
    of that device (seeded with a 64-bit hash of the key), so a CUDA path differs from the CPU one.
    Cost per new query time: about ``depth - log2(T/h)`` draws of ``shape`` for steps of size ``h`` (the
    descent resumes from the previous one; recent values, up to 32 MiB, are cached), see
    ``benchmarks/results/noise.md``.
    """

    depth: ClassVar[int] = 24
    _cache_bytes: ClassVar[int] = 32 << 20  # recent values kept (at least 4): a backward pass replays them
    _path_bytes: ClassVar[int] = 256 << 20  # keep the last descent (depth states) only below this size

    def __init__(self, shape, seed: int = 0, dtype: torch.dtype = torch.float32, device=None,
                 t0: float = 0.0, t1: float = 1.0):
        shape = tuple(int(s) for s in (shape if not isinstance(shape, int) else (shape,)))
        if any(s <= 0 for s in shape):
            raise ValueError(f"BrownianNoise shape must have positive sizes, got {shape}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed <= _MASK64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1) and t0 < t1):
            raise ValueError(f"BrownianNoise needs finite t0 < t1, got t0={t0}, t1={t1}")
        self.shape, self.seed, self.dtype = shape, seed, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.t0, self.t1 = t0, t1
        # CPU values are numpy float64 arrays (cheaper per operation than small tensors), others tensors
        self._w1 = math.sqrt(t1 - t0) * self._normal(0, 0)
        self._points: OrderedDict[float, object] = OrderedDict()
        # the last descent: _path[l] = (k, W(k 2^-l), W((k+1) 2^-l)) for the cells of levels 0..depth-1
        self._path: list = [(0, 0.0, self._w1)]
        nbytes = math.prod(shape) * 8
        self._keep_path = nbytes * self.depth <= self._path_bytes
        self._cache_size = max(4, min(1024, self._cache_bytes // nbytes))

    def __repr__(self):
        return f"BrownianNoise(shape={self.shape}, seed={self.seed}, dtype={self.dtype})"

    def _normal(self, level: int, k: int):
        """``Z_{level,k}``: standard normals of ``shape`` (float64) keyed by ``(seed, level, k)`` only."""
        key = (self.seed << 64) | (level << 48) | k
        if self.device.type == "cpu":
            return np.random.Generator(np.random.Philox(key=key)).standard_normal(self.shape)
        g = torch.Generator(device=self.device)
        g.manual_seed(_mix64(key ^ (key >> 64)))
        return torch.randn(self.shape, generator=g, dtype=torch.float64, device=self.device)

    def _value(self, u: float):
        """``W(t0 + u T)`` for ``u`` in ``(0, 1]``."""
        if u == 1.0:
            return self._w1
        if u in self._points:
            self._points.move_to_end(u)
            return self._points[u]
        # Resume the descent from the deepest cell of the last one that holds u strictly inside: the
        # descent from the root passes through exactly those cells, so the values are bit-identical.
        path = self._path
        level = len(path) - 1
        while level > 0 and not (path[level][0] < u * 2.0**level < path[level][0] + 1):
            level -= 1
        del path[level + 1:]
        k, wa, wb = path[level]
        scale = self.t1 - self.t0
        w = None
        for level in range(level + 1, self.depth + 1):
            # the midpoint (2k+1) 2^-level of the current cell (exact: a dyadic rational)
            wm = 0.5 * (wa + wb) + math.sqrt(scale * 2.0 ** -(level + 1)) * self._normal(level, 2 * k + 1)
            m = (2 * k + 1) * 2.0**-level
            if u == m:
                w = wm
                break
            if u < m:
                k, wb = 2 * k, wm
            else:
                k, wa = 2 * k + 1, wm
            if level < self.depth:
                path.append((k, wa, wb))
        if w is None:
            frac = u * 2.0**self.depth - k  # in (0, 1): position inside the finest cell
            w = wa + frac * (wb - wa)
        if not self._keep_path:
            del path[1:]
        self._points[u] = w
        if len(self._points) > self._cache_size:
            self._points.popitem(last=False)
        return w

    def __call__(self, t, t_next) -> Tensor:
        a, b = float(t), float(t_next)
        for v in (a, b):
            if not (self.t0 <= v <= self.t1):
                raise ValueError(f"BrownianNoise is defined on [{self.t0}, {self.t1}], queried at t={v}")
        if a == b:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        lo, hi = min(a, b), max(a, b)
        scale = self.t1 - self.t0
        w = self._value((hi - self.t0) / scale)
        if lo != self.t0:
            w = w - self._value((lo - self.t0) / scale)
        if b < a:
            w = -w
        # a fresh tensor: the caller may modify it, the cached values must not change
        w = torch.from_numpy(np.array(w, dtype=np.float64)) if isinstance(w, np.ndarray) else w.clone()
        return w.to(self.dtype)
