"""Reproducible Brownian motion for SDE solvers, re-queryable by the backward pass."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BrownianNoise"]


class BrownianNoise:
    """A seeded Brownian motion ``W`` on ``t in [0, 1]`` with values of any shape.

    ``noise(t, t_next)`` returns the increment ``W(t_next) - W(t)`` (distributed ``N(0, |t_next - t|)``
    per entry) for either order of the two times. Built on ``torchsde.BrownianInterval`` (Kidger et
    al. 2021), whose answers for one object are consistent with a single sample path whatever the
    order and resolution of the queries: a coarse step's increment is the sum of the fine steps'
    increments inside it. Keep using the same object to see the same path (e.g. for pathwise
    convergence studies or to replay the noise in a backward pass); two objects built with the same
    seed and queried on the same grid return identical increments.
    """

    def __init__(self, shape, seed: int = 0, dtype: torch.dtype = torch.float32, device=None,
                 t0: float = 0.0, t1: float = 1.0):
        import torchsde

        shape = tuple(int(s) for s in (shape if not isinstance(shape, int) else (shape,)))
        if any(s <= 0 for s in shape):
            raise ValueError(f"BrownianNoise shape must have positive sizes, got {shape}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.shape, self.seed, self.dtype = shape, seed, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.t0, self.t1 = float(t0), float(t1)
        # float64 internally so float32 and float64 users see the same path (then cast)
        self._bm = torchsde.BrownianInterval(
            t0=self.t0, t1=self.t1, size=shape, dtype=torch.float64, device=self.device,
            entropy=seed, levy_area_approximation="none", tol=1e-12,
        )

    def __repr__(self):
        return f"BrownianNoise(shape={self.shape}, seed={self.seed}, dtype={self.dtype})"

    def __call__(self, t, t_next) -> Tensor:
        a, b = float(t), float(t_next)
        for v in (a, b):
            if not (self.t0 <= v <= self.t1):
                raise ValueError(f"BrownianNoise is defined on [{self.t0}, {self.t1}], queried at t={v}")
        if a == b:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        w = self._bm(min(a, b), max(a, b))
        return (w if b > a else -w).to(self.dtype)
