"""NaN/Inf detection without a host sync per step: witnesses recorded on the device, checked once.

A *witness* of a tensor is its sum (accumulated in float32 for half-precision tensors): it is NaN or
infinite when an entry is; it could also overflow for finite entries whose sum exceeds the dtype's range
(``|x| ~ 1e35`` for float32, ``1e305`` for float64), which are not a usable state either. One reduction
per tensor is the cheapest exact-enough check (``isfinite(x).all()`` costs two kernels and a bool tensor). Every model
evaluation and every step's update leave one witness; :meth:`FiniteRecord.check` stacks them and makes
the solve's one host synchronisation for the check, and only on failure looks further to name the first
bad step, its time, and whether the model or the update went bad.

``check_finite`` (of ``solve`` and the gradient strategies): ``True`` (default) records and checks once
after the loop (after the backward pass for the continuous adjoint's own loop); ``"step"`` checks after
every step (one sync per step: for debugging, the error comes before later steps run); ``False`` turns
the check off.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import NonFiniteError

__all__ = ["FiniteRecord", "check_finite_mode", "CHECK_FINITE"]

#: accepted values of ``check_finite``
CHECK_FINITE = (True, "step", False)


def check_finite_mode(value):
    """``value`` if it is one of :data:`CHECK_FINITE`, else ``ValueError``."""
    if value is True or value is False or (isinstance(value, str) and value == "step"):
        return value
    raise ValueError(f"check_finite must be True (check once after the loop), 'step' (check every step) or "
                     f"False (off), got {value!r}")


_HALF = (torch.float16, torch.bfloat16)


def _sum(t: Tensor) -> Tensor:
    if t.requires_grad:
        t = t.detach()
    # half precision would overflow the sum long before the entries overflow; float32/64 sum natively
    return t.sum(dtype=torch.float32) if t.dtype in _HALF else t.sum()


def _witness(tensors) -> Tensor:
    w = _sum(tensors[0])
    for t in tensors[1:]:
        w = w + _sum(t)
    return w


def _time(t) -> float:
    return float(getattr(t, "t", t))


class FiniteRecord:
    """Witnesses of one loop: ``calls`` (one ``(witness, t)`` per model evaluation, ``witness=None`` when
    checking is off: the list also counts NFE) and ``steps`` (one ``(i, t, number of calls so far,
    witness of the update)`` per step, in the order run)."""

    def __init__(self, mode=True):
        self.mode = check_finite_mode(mode)
        self.calls: list = []
        self.steps: list = []
        self._checked_calls = 0
        self._checked_steps = 0

    def model(self, out: Tensor, t) -> None:
        """Record one model evaluation at time ``t`` (an ``EvalPoint`` or a time tensor)."""
        if self.mode is False:
            self.calls.append((None, t))
            return
        if out.requires_grad:
            out = out.detach()
        self.calls.append((out.sum(dtype=torch.float32) if out.dtype in _HALF else out.sum(), t))

    def end_step(self, i: int, t: float, *tensors: Tensor) -> None:
        """Record the update of step ``i`` (its new tensors, at time ``t``); checks now in ``"step"`` mode."""
        w = None
        if self.mode is not False:
            w = _sum(tensors[0]) if len(tensors) == 1 else _witness(tensors)
        self.steps.append((i, t, len(self.calls), w))
        if self.mode == "step":
            self._check()

    def check(self, adjoint: bool = False) -> None:
        """Raise :class:`~adjointflow.errors.NonFiniteError` for the first bad witness (one host sync)."""
        if self.mode is not False:
            self._check(adjoint)

    def _check(self, adjoint: bool = False) -> None:
        calls, steps = self.calls[self._checked_calls:], self.steps[self._checked_steps:]
        ws = [w for w, _ in calls] + [s[3] for s in steps]
        self._checked_calls, self._checked_steps = len(self.calls), len(self.steps)
        if not ws:
            return
        finite = torch.isfinite(torch.stack(ws))
        if bool(finite.all()):
            return
        ok = finite.tolist()
        call_ok, step_ok = ok[: len(ws) - len(steps)], ok[len(ws) - len(steps):]
        first = len(self.calls) - len(calls)
        bad_call = next((first + k for k, good in enumerate(call_ok) if not good), None)
        for k, (i, t, n_calls, _) in enumerate(steps):
            if bad_call is not None and bad_call < n_calls:
                tb = _time(self.calls[bad_call][1])
                where = "in the adjoint pass " if adjoint else ""
                raise NonFiniteError(f"the model returned NaN/Inf {where}at step {i} (t={tb:.6g})", step=i, t=tb)
            if not step_ok[k]:
                if adjoint:
                    raise NonFiniteError(
                        f"the adjoint became NaN/Inf at step {i} (t={t:.6g}); with few steps try form='x0' "
                        "(AdjointDEIS data form) or gradient=Checkpoint()", step=i, t=t)
                raise NonFiniteError(f"the solver update produced NaN/Inf at step {i} (t={t:.6g})", step=i, t=t)
        if bad_call is not None:  # an evaluation after the last recorded step
            tb = _time(self.calls[bad_call][1])
            raise NonFiniteError(f"the model returned NaN/Inf (t={tb:.6g})", t=tb)
