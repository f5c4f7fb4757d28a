"""NaN/Inf detection without a host sync per step: witnesses kept on the device, checked once.

A *witness* of a tensor is its sum (accumulated in float32 for half-precision tensors): it is NaN or
infinite when an entry is; it could also overflow for finite entries whose sum exceeds the dtype's range
(``|x| ~ 1e35`` for float32, ``1e305`` for float64), which are not a usable state either.

``check_finite`` (of ``solve`` and the gradient strategies):

* ``True`` (default): after the loop, one witness of the final state (and of any model output made after
  the last step), one host synchronisation. The final state witnesses every step: a NaN/Inf model
  output reaches the state of its own step (every update is ``a x + sum_j b_j D_j`` with the new
  evaluation among the ``D_j``) and every later state (``a x`` carries it; ``0 * nan`` and ``0 * inf``
  are NaN). Only when it is bad is the first bad step looked for, by the ``locate`` hook the gradient
  strategies pass to :meth:`FiniteRecord.check`: the solve run again checking every step
  (:func:`adjointflow.driver.rerun_checked`), which stops at that step and names it, its time and whether
  the model or the update went bad. A reduction per step would name it without the rerun, but costs about
  5 % of a small network's step (``benchmarks/results/overhead.md``), paid by every solve that is fine.
* ``"step"``: a witness per model call and per update, checked after every step (one sync per step: for
  debugging, the error comes before later steps run).
* ``False``: off.

The continuous adjoint's own loop (:mod:`adjointflow.adjoint.equations`) witnesses every model call and
every step (``every_step=True``) and checks them once after the backward pass: there the network output
feeds only a vector-Jacobian product, so a bad output need not reach the adjoint, a rerun of a backward
pass is not on offer, and a VJP per step dwarfs the reductions.
"""
from __future__ import annotations

import math

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
    """What one loop leaves for the check: ``calls`` (one ``(witness, t)`` per model evaluation, ``witness``
    ``None`` unless ``every_step``: the list also counts NFE) and ``steps`` (one ``(i, t, number of calls
    so far, witness of the update or None, start time)`` per step, in the order run).

    ``every_step`` (default: only in ``"step"`` mode) witnesses each model output and each update as they
    are made; otherwise only references to the last step's tensors and to the outputs made since are held.
    """

    def __init__(self, mode=True, every_step: bool | None = None):
        self.mode = check_finite_mode(mode)
        self.every_step = self.mode == "step" if every_step is None else (every_step and self.mode is not False)
        self.calls: list = []
        self.steps: list = []
        self._last: tuple = ()  # the last step's new tensors (deferred check)
        self._tail: list = []  # model outputs since the last step (deferred check)
        self._checked_calls = 0
        self._checked_steps = 0

    def model(self, out: Tensor, t) -> None:
        """Record one model evaluation at time ``t`` (an ``EvalPoint`` or a time tensor)."""
        if not self.every_step:
            self.calls.append((None, t))
            if self.mode is not False:
                self._tail.append(out)
            return
        if out.requires_grad:
            out = out.detach()
        self.calls.append((out.sum(dtype=torch.float32) if out.dtype in _HALF else out.sum(), t))

    def end_step(self, i: int, t: float, *tensors: Tensor, start: float | None = None) -> None:
        """Record the update of step ``i`` (its new tensors, at time ``t``; the step began at ``start``);
        checks now in ``"step"`` mode."""
        w = None
        if self.every_step:
            w = _sum(tensors[0]) if len(tensors) == 1 else _witness(tensors)
        elif self.mode is not False:
            self._last = tensors
            if self._tail:
                self._tail.clear()  # the new state carries these outputs
        self.steps.append((i, t, len(self.calls), w, start))
        if self.mode == "step":
            self._check()

    def check(self, adjoint: bool = False, locate=None) -> None:
        """Raise :class:`~adjointflow.errors.NonFiniteError` for the first bad witness (one host sync).

        In the deferred mode a bad final state calls ``locate()`` (no arguments), which should raise the
        error naming the first bad step (a rerun checking every step); if it returns, the error says so.
        """
        if self.mode is False:
            return
        if self.every_step:
            self._check(adjoint)
        else:
            self._check_final(locate)

    def _check_final(self, locate) -> None:
        last, tail = self._last, self._tail
        self._last, self._tail = (), []
        if not last and not tail:
            return
        w = _witness(last) if last else None
        tail_ws = [_sum(out) for out in tail]
        if tail_ws:
            ws = torch.stack(([w] if w is not None else []) + tail_ws)
            if bool(torch.isfinite(ws).all()):
                return
            ok = torch.isfinite(ws).tolist()
            if w is None or ok[0]:  # the state is fine: an evaluation after the last step went bad
                k = ok.index(False) - (w is not None)
                tb = _time(self.calls[len(self.calls) - len(tail) + k][1])
                raise NonFiniteError(f"the model returned NaN/Inf (t={tb:.6g})", t=tb)
        elif math.isfinite(w.item()):  # the one host sync; isfinite on the host skips a device op
            return
        i, t, _, _, start = self.steps[-1]
        if locate is not None:
            locate()
        span = f"t={t:.6g}" if start is None else f"ending at t={t:.6g}"
        raise NonFiniteError(
            f"NaN/Inf in the state after step {i} ({span}); "
            + ("a rerun checking every step (eager) stayed finite, so the model or the callback is not deterministic "
               "(or the compiled step computed differently); "
               if locate is not None else "")
            + "check_finite='step' checks every step as the solve runs", step=i, t=t)

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
        for k, (i, t, n_calls, _, _) in enumerate(steps):
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
