"""How many steps the continuous adjoint (AdjointDEIS) needs, as measured, and the warning below that.

AdjointDEIS approximates the *continuous* gradient with an error that shrinks at its order as the
steps grow, but on a full VP or flow range (t = 1 -> 1e-3) it is far off at few steps (5x at 5
steps). :data:`MIN_STEPS` holds the smallest measured step count with at most 10 % relative error
against the closed-form gradient on Gaussian data, over the VP and flow paths
(``benchmarks/results/gradients_forms.md``, from ``benchmarks/test_bench_gradients.py -k forms``);
``None`` means no tested count up to 160 reached it. :func:`warn_if_too_few_steps` warns once per
configuration when a continuous-adjoint backward runs on a shorter grid.
"""
from __future__ import annotations

import warnings

__all__ = ["MIN_STEPS", "MEASURED_UP_TO", "warn_if_too_few_steps", "adjoint_deis_order"]

#: (AdjointDEIS order, SDE?, form) -> smallest measured step count with <= 10 % gradient error
#: (worst of the VP and flow paths; SDE rows: VP only), or None if none up to MEASURED_UP_TO
MIN_STEPS: dict[tuple[int, bool, str], int | None] = {
    (1, False, "auto"): 20, (2, False, "auto"): 10, (1, True, "auto"): 40, (2, True, "auto"): 20,
    (1, False, "eps"): None, (2, False, "eps"): None, (1, True, "eps"): 20, (2, True, "eps"): 40,
    (1, False, "x0"): None, (2, False, "x0"): None, (1, True, "x0"): None, (2, True, "x0"): None,
}
MEASURED_UP_TO = 160
_WARNED: set = set()


def adjoint_deis_order(solver, order: int | None) -> int | None:
    """The AdjointDEIS order a continuous-adjoint backward through ``solver`` uses, or ``None`` when the
    solver integrates its adjoint with its own scheme (Euler, Heun, Euler-Maruyama, bespoke)."""
    from ..solvers.exponential import ExponentialIntegrator

    if not isinstance(solver, ExponentialIntegrator):
        return None
    return order if order is not None else (1 if solver.order == 1 else 2)


def warn_if_too_few_steps(solver, form: str, order: int | None, steps: int) -> None:
    """A one-time ``UserWarning`` (per order, form and step count) when ``steps`` is below the measured
    :data:`MIN_STEPS` for this AdjointDEIS configuration, naming it and :class:`Checkpoint`."""
    k = adjoint_deis_order(solver, order)
    if k is None:
        return
    sde = bool(solver.stochastic)
    need = MIN_STEPS.get((k, sde, form), None)
    key = (k, sde, form, steps)
    if (need is not None and steps >= need) or key in _WARNED:
        return
    _WARNED.add(key)
    what = f"ContinuousAdjoint(form={form!r}) uses AdjointDEIS-{'1' if k == 1 else '2M'}{' (SDE)' if sde else ''}"
    if need is None:
        measured = f"which did not reach 10 % gradient error at any step count up to {MEASURED_UP_TO}"
    else:
        measured = f"which needed >= {need} steps for 10 % gradient error"
    warnings.warn(
        f"{what} on a {steps}-step grid, {measured} on a full VP/flow time range (benchmarks/results/"
        "gradients_forms.md); its gradient may be far off. Use gradient=Checkpoint() (the exact gradient of "
        "the solver, memory flat in the steps) or more steps.", UserWarning, stacklevel=3)
