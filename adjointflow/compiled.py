"""``solve(..., compile=...)``: the step, or the whole loop, through ``torch.compile``.

``compile=True`` (or ``"step"``): one compiled step serving every row of a grid. The rows of a bound plan
are 0-dim tensors (same shape at every step), the model's evaluation points carry their network time and
conversions as tensors, and the noise increment is queried outside the step, so the traced step is the
same graph for every step of a grid: it is compiled once per *kind* of step (the static fields of the rows,
e.g. a warm-up step, a multistep step, a final first-order step; a small number that does not grow with the
number of steps) and reused. Works with every gradient strategy and option of ``solve``.

``compile="solve"``: the whole loop of a grid as one graph (the steps unrolled; the noise increments drawn
before it and held at once, ``N |x|`` of memory for a stochastic solver). One call per solve instead of one
per step, so the per-call costs of a compiled function (guards, runtime wrappers) are paid once, and the
backend may fuse across steps; compilation takes longer and grows with the number of steps, and a new grid
compiles again. On the project's CPU, with a small MLP, it is 0.77-0.95x the eager loop for DDIM, DPM++ and
UniPC (DEIS about equal) when one method is sampled repeatedly (``benchmarks/results/vs_diffusers_focused.md``), but no faster where many other variants
run in between (``benchmarks/results/overhead.md``: its generated kernels come in cold). The graph takes the
bound plan's few base tensors, not each row's views, as inputs. Launch-bound GPUs are where one graph per solve
is meant to pay, e.g. with
``Compile(scope="solve", mode="reduce-overhead")`` (CUDA graphs: each call's outputs are overwritten by the next
call, so clone what you keep). Not measured here (no GPU). It is for the plain solve
(:class:`~adjointflow.adjoint.Backprop`, and :class:`~adjointflow.adjoint.ContinuousAdjoint`'s forward
pass); :class:`~adjointflow.adjoint.Checkpoint` (per-step recomputation), a ``callback``, ``progress`` and
``check_finite="step"`` (which act between steps) are refused with a clear error.

:class:`Compile` spells out the choice (scope, backend, ``torch.compile`` mode). ``fullgraph=True``: what
cannot be traced without a graph break is an error, never a silent partial compilation. Each solve's plan
gets its own compiled function (its own code object), so the variants of one solve never compete with
another solve's for dynamo's per-function recompile limit, and hitting that limit raises.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .finite import FiniteRecord
from .models import Conversion, EvalPoint
from .solvers.base import State

__all__ = ["Compile", "compiled_step", "compiled_loop", "check_compile"]

# kinds of step one solve may compile (warm-up, multistep, final steps x history lengths x input grads):
# bounded by the solver's structure, far below this; reaching it is an error, not a silent eager fallback
_VARIANTS = 32
SCOPES = ("step", "solve")


@dataclass(frozen=True)
class Compile:
    """How ``solve`` uses ``torch.compile``: ``scope="step"`` (one compiled step for every row of the grid) or
    ``"solve"`` (the whole loop as one graph; see the module docstring), the ``backend`` (a name from
    ``torch._dynamo.list_backends()`` or a callable) and ``torch.compile``'s ``mode`` (e.g.
    ``"reduce-overhead"``: CUDA graphs, for the inductor backend). ``solve(compile=True)`` is ``Compile()``,
    ``compile="solve"`` is ``Compile(scope="solve")``, another string names the backend."""

    scope: str = "step"
    backend: Any = "inductor"
    mode: str | None = None

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"Compile scope must be one of {SCOPES}, got {self.scope!r}")
        if isinstance(self.backend, Compile) or not (isinstance(self.backend, str) or callable(self.backend)):
            raise TypeError(f"Compile backend must be a backend name or a backend callable, got {self.backend!r}")
        try:  # compiled functions are cached per Compile
            hash(self.backend)
        except TypeError:
            raise TypeError(f"Compile backend must be hashable (compiled functions are cached by it), got "
                            f"{self.backend!r}") from None
        if self.mode is not None:
            if not isinstance(self.mode, str):
                raise TypeError(f"Compile mode must be None or a torch.compile mode name, got {self.mode!r}")
            if self.backend != "inductor":
                raise ValueError(f"Compile mode={self.mode!r} is an inductor option; backend={self.backend!r} "
                                 "would ignore it")
            modes = _inductor_modes()
            if modes is not None and self.mode not in modes:
                raise ValueError(f"Compile mode must be one of {sorted(modes)}, got {self.mode!r}")

    def __call__(self, fn):
        """``torch.compile(fn, fullgraph=True, ...)`` with this backend and mode."""
        kw = {} if self.mode is None else {"mode": self.mode}
        return torch.compile(fn, fullgraph=True, backend=self.backend, **kw)


def _inductor_modes():
    """The mode names ``torch.compile`` accepts for inductor, or ``None`` if this torch does not list them."""
    try:
        from torch._inductor import list_mode_options

        return tuple(list_mode_options())
    except Exception:  # noqa: BLE001 - an older torch: torch.compile checks the mode itself
        return None


def check_compile(compile) -> Compile | None:
    """The :class:`Compile` for ``solve(compile=...)`` (``True``/``"step"`` -> ``Compile()``, ``"solve"`` ->
    ``Compile(scope="solve")``, another name or a callable -> that backend, ``False`` -> ``None``); a clear
    error where torch.compile cannot run."""
    if compile is False:
        return None
    given = compile  # error messages name what the caller passed
    if compile is True or (isinstance(compile, str) and compile == "step"):
        spec = Compile()
    elif isinstance(compile, str) and compile == "solve":
        spec = Compile(scope="solve")
    elif isinstance(compile, Compile):
        spec = compile
    elif isinstance(compile, str) or callable(compile):
        spec = Compile(backend=compile)
    else:
        raise TypeError(f"compile must be a bool, 'step', 'solve', a torch.compile backend (name or callable) or a "
                        f"Compile, got {compile!r}")
    if not hasattr(torch, "compile"):
        raise RuntimeError(f"compile={given!r} needs torch.compile, which this torch ({torch.__version__}) lacks")
    try:
        import torch._dynamo as dynamo

        supported = dynamo.is_dynamo_supported()
    except Exception as e:  # noqa: BLE001 - any failure to set dynamo up is the same answer
        raise RuntimeError(f"compile={given!r}: torch.compile cannot be set up here ({e})") from e
    if not supported:
        raise RuntimeError(f"compile={given!r}: torch.compile is not supported on this Python/platform")
    backend = spec.backend
    if isinstance(backend, str) and backend not in dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"compile={given!r}: unknown torch.compile backend; choose one of "
                         f"{sorted(dynamo.list_backends(exclude_tags=()))}")
    return spec


def _own(fn):
    """A copy of ``fn`` with its own code object: its own dynamo cache and recompile count."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)


def _guarded(fn, what: str, *args):
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=_VARIANTS):
            return fn(*args)
    except torch._dynamo.exc.TorchDynamoException as e:
        raise RuntimeError(f"compile: torch.compile could not compile {what} without graph breaks or recompiled "
                           f"it too often ({type(e).__name__}: {e})") from e


def _step_body(solver, model, mode, tensors, c, noise):
    # a fresh record inside the traced region: appending to the solve's list would make dynamo guard on
    # its length (a recompile per step); the evaluations are handed back to the driver instead
    model.record = FiniteRecord(mode)
    new = solver.step(model, State.from_tensors(tensors), c, noise)
    return new.tensors(), model.record.calls


def compiled_step(bound, solver, spec: Compile):
    """``step(model, state, c, noise)`` running ``solver.step`` through ``torch.compile`` (cached on ``bound``)."""
    cache = bound.__dict__.setdefault("compiled", {})
    key = (spec, solver, torch.is_grad_enabled())  # a solve runs in one grad mode; keep the variant sets apart
    fn = cache.get(key)
    if fn is None:
        fn = cache[key] = spec(_own(_step_body))
    what = f"a {type(solver).__name__} step"

    def step(model, state, c, noise=None):
        record = model.record
        try:
            tensors, calls = _guarded(fn, what, solver, model, record.mode, state.tensors(), c, noise)
        finally:
            model.record = record
        record.calls.extend(calls)
        return State.from_tensors(tensors)

    return step


class _Evaluations:
    """The model's record inside the traced loop: the evaluation points' node indices (host ints, known when
    tracing), nothing else. The eager record keeps each output for the deferred check; here the final state
    witnesses them (:mod:`adjointflow.finite`), and keeping them would make every output a graph output."""

    mode = False

    def __init__(self):
        self.points: list = []

    def model(self, out, t) -> None:
        self.points.append(t.index if type(t) is EvalPoint else None)


def _map(v: Any, leaf: type, f) -> Any:
    """``v`` (a bound row, or rows) with ``f`` applied to every ``leaf`` inside it: the structure a plan binds
    (tuples and named tuples, evaluation points and their conversions, dicts, lists) is kept, the rest as is."""
    tv = type(v)
    if isinstance(v, leaf):
        return f(v)
    if isinstance(v, tuple):
        out = [_map(e, leaf, f) for e in v]
        return tv._make(out) if hasattr(tv, "_make") else tuple(out)
    if tv is EvalPoint:
        return EvalPoint(v.index, v.t, _map(v.t_net, leaf, f), _map(v.conversion, leaf, f))
    if tv is Conversion:
        return Conversion(v.kind, _map(v.pq, leaf, f), v.where, v.schedule)
    if tv is dict:
        return {key: _map(e, leaf, f) for key, e in v.items()}
    if tv is list:
        return [_map(e, leaf, f) for e in v]
    return v


class _Leaf(NamedTuple):
    base: int
    view: tuple | None  # (size, stride, storage offset) of a view of the base, None for the base itself


def _template(rows: list) -> tuple[list, list]:
    """``(template, bases)``: ``rows`` with every tensor replaced by a :class:`_Leaf` on one of ``bases``. A plan
    binds its floats as views of one tensor and its network times as views of another, and views handed to a
    compiled graph one by one are each an input to guard and to re-create at every call."""
    bases: list = []
    ids: dict = {}

    def leaf(v: torch.Tensor) -> _Leaf:
        base = v._base if v._base is not None and v._base.dtype == v.dtype else v
        k = ids.get(id(base))
        if k is None:
            k = ids[id(base)] = len(bases)
            bases.append(base)
        return _Leaf(k, None if base is v else (tuple(v.shape), v.stride(), v.storage_offset()))

    return _map(rows, torch.Tensor, leaf), bases


def _rebuild(template: list, bases) -> list:
    """Inverse of :func:`_template`, run while tracing: the views are ops on the graph's few inputs."""
    return _map(template, _Leaf, lambda v: bases[v.base] if v.view is None else bases[v.base].as_strided(*v.view))


def _loop_body(solver, model, template, bases, tensors, noises, keep):
    # as _step_body, for every row: the steps unrolled into one graph; the number of evaluations after each
    # step is a trace-time constant, handed back so the driver can record the steps as the eager loop does
    rows = _rebuild(template, bases)
    state = State.from_tensors(tensors)
    xs, counts = [], []
    for c, dw in zip(rows, noises):
        state = solver.step(model, state, c, dw)
        counts.append(len(model.record.points))
        if keep:
            xs.append(state.x)
    return state.tensors(), xs, counts


def compiled_loop(bound, solver, spec: Compile, start: int, stop: int, keep: bool):
    """``run(model, state, noises) -> (state, xs, points, counts)``: steps ``start .. stop-1`` as one compiled
    graph (``compile="solve"``); ``xs`` the states after each step if ``keep``, ``points`` the evaluation
    points of the model calls in order (an index into ``bound.evals``, or ``None``), ``counts`` the number of
    calls after each step; cached on ``bound``."""
    cache = bound.__dict__.setdefault("compiled", {})
    key = ("solve", spec, solver, torch.is_grad_enabled(), start, stop, keep)
    entry = cache.get(key)
    if entry is None:
        template, bases = _template(bound.rows[start:stop])
        entry = cache[key] = (spec(_own(_loop_body)), template, bases)
    fn, template, bases = entry
    what = f"a {type(solver).__name__} solve as one graph"

    def run(model, state, noises):
        inner = model.replay()
        inner.record = _Evaluations()
        tensors, xs, counts = _guarded(fn, what, solver, inner, template, bases, state.tensors(), noises, keep)
        return State.from_tensors(tensors), xs, inner.record.points, counts

    return run
