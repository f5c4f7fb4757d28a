"""``solve(..., compile=True)``: one ``torch.compile``'d step serving every row of a grid.

The rows of a bound plan are 0-dim tensors (same shape at every step), the model's evaluation points
carry their network time and conversions as tensors, and the noise increment is queried outside the
step, so the traced step is the same graph for every step of a grid: it is compiled once per *kind* of
step (the static fields of the rows, e.g. a warm-up step, a multistep step, a final first-order step;
a small number that does not grow with the number of steps) and reused. ``fullgraph=True``: a step that
cannot be traced without a graph break is an error, never a silent partial compilation. Each solve's
plan gets its own compiled function (its own code object), so the variants of one solve never compete
with another solve's for dynamo's per-function recompile limit, and hitting that limit raises.
"""
from __future__ import annotations

import types

import torch

from .finite import FiniteRecord
from .solvers.base import State

__all__ = ["compiled_step", "check_compile"]

# kinds of step one solve may compile (warm-up, multistep, final steps x history lengths x input grads):
# bounded by the solver's structure, far below this; reaching it is an error, not a silent eager fallback
_VARIANTS = 32


def check_compile(compile):
    """The torch.compile backend for ``solve(compile=...)`` (``True`` -> the default ``"inductor"``, a name or
    a callable -> that backend, ``False`` -> ``None``); a clear error where torch.compile cannot run."""
    if compile is False:
        return None
    if compile is not True and not isinstance(compile, str) and not callable(compile):
        raise TypeError(f"compile must be a bool or a torch.compile backend (name or callable), got {compile!r}")
    if not hasattr(torch, "compile"):
        raise RuntimeError(f"compile={compile!r} needs torch.compile, which this torch ({torch.__version__}) lacks")
    try:
        import torch._dynamo as dynamo

        supported = dynamo.is_dynamo_supported()
    except Exception as e:  # noqa: BLE001 - any failure to set dynamo up is the same answer
        raise RuntimeError(f"compile={compile!r}: torch.compile cannot be set up here ({e})") from e
    if not supported:
        raise RuntimeError(f"compile={compile!r}: torch.compile is not supported on this Python/platform")
    backend = "inductor" if compile is True else compile
    if isinstance(backend, str) and backend not in dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"compile={compile!r}: unknown torch.compile backend; choose one of "
                         f"{sorted(dynamo.list_backends(exclude_tags=()))}")
    return backend


def _step_body(solver, model, mode, tensors, c, noise):
    # a fresh record inside the traced region: appending to the solve's list would make dynamo guard on
    # its length (a recompile per step); the evaluations are handed back to the driver instead
    model.record = FiniteRecord(mode)
    new = solver.step(model, State.from_tensors(tensors), c, noise)
    return new.tensors(), model.record.calls


def compiled_step(bound, solver, backend: str):
    """``step(model, state, c, noise)`` running ``solver.step`` through ``torch.compile`` (cached on ``bound``)."""
    cache = bound.__dict__.setdefault("compiled", {})
    key = (backend, solver, torch.is_grad_enabled())  # a solve runs in one grad mode; keep the variant sets apart
    fn = cache.get(key)
    if fn is None:
        body = types.FunctionType(_step_body.__code__.replace(), _step_body.__globals__, "_step_body")
        fn = cache[key] = torch.compile(body, fullgraph=True, backend=backend)

    def step(model, state, c, noise=None):
        record = model.record
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=_VARIANTS):
                tensors, calls = fn(solver, model, record.mode, state.tensors(), c, noise)
        except torch._dynamo.exc.TorchDynamoException as e:
            raise RuntimeError(f"compile: torch.compile could not compile a {type(solver).__name__} step without "
                               f"graph breaks or recompiled it too often ({type(e).__name__}: {e})") from e
        finally:
            model.record = record
        record.calls.extend(calls)
        return State.from_tensors(tensors)

    return step
