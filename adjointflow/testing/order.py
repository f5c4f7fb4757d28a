"""Empirical convergence orders from error-vs-steps measurements."""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["empirical_order", "local_orders"]


def empirical_order(steps: Sequence[float], errors: Sequence[float]) -> float:
    """Least-squares slope ``p`` of ``log(error) = c - p log(steps)``: the observed global order.

    Raises ``ValueError`` for fewer than two points or non-positive values (a zero error would hide
    a floor rather than measure an order).
    """
    steps, errors = [float(s) for s in steps], [float(e) for e in errors]
    if len(steps) != len(errors) or len(steps) < 2:
        raise ValueError("need at least two (steps, error) pairs of equal length")
    if min(steps) <= 0 or min(errors) <= 0 or any(math.isnan(e) for e in errors):
        raise ValueError(f"steps and errors must be positive and finite, got errors={errors}")
    lx = [math.log(s) for s in steps]
    ly = [math.log(e) for e in errors]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    sxy = sum((a - mx) * (b - my) for a, b in zip(lx, ly))
    return -sxy / sxx


def local_orders(steps: Sequence[float], errors: Sequence[float]) -> list[float]:
    """Orders between consecutive refinements, ``log(e_i/e_{i+1}) / log(n_{i+1}/n_i)``."""
    return [math.log(errors[i] / errors[i + 1]) / math.log(steps[i + 1] / steps[i]) for i in range(len(steps) - 1)]
