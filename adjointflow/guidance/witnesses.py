"""NaN/Inf checks of a guidance run without a host synchronisation per step.

Each check keeps a *witness* on the device, the tensor's sum (:mod:`adjointflow.finite`: NaN or infinite
when an entry is), together with the error it stands for; :meth:`Witnesses.check` reads all pending
witnesses at once (one host sync) and raises the first bad one's error, so a run that checks once at
its end still names the first step and time that went bad, in the order the checks were made.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..finite import _sum

__all__ = ["Witnesses", "at_step"]


def at_step(i: int, t: float) -> str:
    """How a guidance error names where it happened: ``"at step i (t=...)"`` (``t`` a host float)."""
    return f"at step {i} (t={t:.6g})"


class Witnesses:
    """Deferred NaN/Inf checks: :meth:`add` a tensor with the :class:`~adjointflow.errors.NonFiniteError`
    (message, step, time) to raise if it holds a NaN/Inf; :meth:`check` raises the first such error."""

    def __init__(self):
        self._pending: list[tuple[Tensor, str, int | None, float | None]] = []

    def add(self, tensor: Tensor, message: str, step: int | None = None, t: float | None = None) -> None:
        self._pending.append((_sum(tensor), message, step, t))

    def check(self) -> None:
        """One host sync for every witness added since the last check; raises for the first bad one."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        device = pending[0][0].device
        ok = torch.isfinite(torch.stack([w.to(device) for w, *_ in pending]))
        if bool(ok.all()):
            return
        _, message, step, t = pending[ok.tolist().index(False)]
        raise NonFiniteError(message, step=step, t=t)
