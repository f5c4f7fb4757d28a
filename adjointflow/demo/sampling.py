"""Demo part (a): every solver in :mod:`adjointflow.solvers` at a few NFE budgets, against a reference.

ODE solvers are compared with a torchdiffeq dopri5 solution of the same probability-flow ODE from the
same latents (adaptive steps, tolerance 1e-6; its own accuracy is estimated by a run at 1e-5). A stochastic solver does not converge
to the ODE solution, so its reference is the same solver with many steps on the same Brownian path
(:class:`~adjointflow.noise.BrownianNoise` answers consistently at every resolution): that is its
pathwise (strong) error.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..driver import solve
from ..grids import timesteps
from ..models import Denoiser
from ..noise import BrownianNoise
from ..solvers.base import Solver

__all__ = ["SolverSpec", "SampleRun", "discover_solvers", "dopri5_reference", "compare_solvers", "rmse"]

#: orders tried for solver classes that take an ``order`` argument
VARIANT_ORDERS = (2, 3)
#: classes that need a trained or user-supplied ingredient and are not run by default
NEEDS_TRAINING = {"BespokeSolver": "needs a solver trained for this model (see adjointflow.solvers.bespoke)",
                  "BespokeNSSolver": "needs a solver trained for this model (see adjointflow.solvers.bespoke_ns)"}


@dataclass(frozen=True)
class SolverSpec:
    name: str
    solver: Solver
    grid: Tensor | None = None  # a solver with its own fixed grid (a trained BespokeSolver) runs only on it


@dataclass
class SampleRun:
    """One solver at one NFE budget."""

    name: str
    grid: str
    nfe_target: int
    nfe: int
    steps: int
    seconds: float
    rmse: float
    reference: str
    stochastic: bool
    x: Tensor = field(repr=False)


def rmse(x: Tensor, ref: Tensor) -> float:
    """Root-mean-square error per sample (pixels in [-1, 1]), averaged over the batch."""
    d = (x.double() - ref.double()).flatten(1)
    return float(d.pow(2).mean(1).sqrt().mean())


def discover_solvers() -> tuple[list[SolverSpec], list[str]]:
    """Instantiate every public solver class of :mod:`adjointflow.solvers` (orders 2 and 3 for classes
    with an ``order`` argument). Returns the specs and notes on what was skipped and why."""
    import adjointflow.solvers as S

    specs, notes = [], []
    for name in getattr(S, "__all__", dir(S)):
        cls = getattr(S, name, None)
        if not (isinstance(cls, type) and issubclass(cls, Solver)) or cls is Solver:
            continue
        if inspect.isabstract(cls) or cls.step is Solver.step:
            continue  # a base class (e.g. ExponentialIntegrator), not a solver
        if name in NEEDS_TRAINING:
            notes.append(f"{name}: skipped ({NEEDS_TRAINING[name]})")
            continue
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            params = {}
        variants = [{"order": k} for k in VARIANT_ORDERS] if "order" in params else [{}]
        built, errors = 0, []
        for kw in variants:
            label = name + ("(" + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")" if kw else "")
            try:
                specs.append(SolverSpec(label, cls(**kw)))
                built += 1
            except (TypeError, ValueError, NotImplementedError) as exc:
                errors.append(f"{label}: {exc}")
        if not built:  # an order a class does not offer is not a skipped solver; a class never built is
            notes.append(f"{name}: skipped (cannot be built with defaults: {'; '.join(errors)})")
    return specs, notes


def dopri5_reference(den: Denoiser, x: Tensor, grid: Tensor, cond=None, rtol: float = 1e-6,
                     atol: float = 1e-6) -> tuple[Tensor, int]:
    """Solve ``dx/dt = u(x, t)`` from ``grid[0]`` to ``grid[-1]`` with torchdiffeq's adaptive dopri5
    (Dormand & Prince 1980) in ``x``'s dtype. Returns ``(x_end, nfe)``.

    (On the digits model, float32 at tolerance 1e-6 is as close to a float64 run at 1e-7 as a float64
    run at 1e-6 is, at a quarter of the cost: the tolerance, not the precision, limits the accuracy.)"""
    from torchdiffeq import odeint

    nfe = 0

    def f(t, y):
        nonlocal nfe
        nfe += 1
        return den(y, t, cond).velocity

    ts = torch.stack([grid[0], grid[-1]]).double()
    with torch.no_grad():
        y = odeint(f, x, ts, method="dopri5", rtol=rtol, atol=atol)[-1]
    return y, nfe


def _grid(den: Denoiser, steps: int, t_start: float, t_end: float, kind: str = "uniform") -> Tensor:
    return timesteps(den.schedule, steps, kind, t_start=t_start, t_end=t_end)


def compare_solvers(den: Denoiser, x1: Tensor, cond, specs: list[SolverSpec], nfes, *, t_start: float,
                    t_end: float, grids=("uniform",), sde_ref_steps: int = 500, seed: int = 0,
                    ref_tol: float = 1e-6, progress: bool = True) -> tuple[list[SampleRun], dict, list[str]]:
    """Run every spec at every NFE budget (``steps = nfe // solver.nfe_per_step``) on every grid kind
    in ``grids`` (see :func:`adjointflow.grids.timesteps`) from the latents ``x1``, ``t_start -> t_end``.

    Returns the runs, the references (``refs["dopri5"] = (x, nfe, seconds)``; ``refs["dopri5_check"]``
    = RMSE between dopri5 at ``10 ref_tol`` and at ``ref_tol``, an upper bound on the reference's own
    error; ``refs[name] = (x, nfe, seconds)`` for each SDE solver, on the first grid kind) and notes
    about failures."""
    from tqdm.auto import tqdm

    notes: list[str] = []
    refs: dict = {}
    span = _grid(den, 1, t_start, t_end)
    t0 = time.perf_counter()
    x_ref, ref_nfe = dopri5_reference(den, x1, span, cond, rtol=ref_tol, atol=ref_tol)
    refs["dopri5"] = (x_ref, ref_nfe, time.perf_counter() - t0)
    x_loose, _ = dopri5_reference(den, x1, span, cond, rtol=10 * ref_tol, atol=10 * ref_tol)
    refs["dopri5_check"] = rmse(x_loose, x_ref)

    def brownian():
        return BrownianNoise(tuple(x1.shape), seed=seed, dtype=x1.dtype)

    runs: list[SampleRun] = []
    failed: set[str] = set()
    for spec in [s for s in specs if s.grid is not None]:
        g = spec.grid
        nfe = int(spec.solver.nfe_per_step) * (len(g) - 1)
        if nfe not in nfes or abs(float(g[0]) - t_start) > 1e-12 or abs(float(g[-1]) - t_end) > 1e-12:
            notes.append(f"{spec.name}: skipped (trained for NFE {nfe} on [{float(g[0])}, {float(g[-1])}], "
                         f"not one of NFE {list(nfes)} on [{t_start}, {t_end}])")
            continue
        t0 = time.perf_counter()
        with torch.no_grad():
            sol = solve(den, x1, g, spec.solver, cond=cond)
        runs.append(SampleRun(spec.name, "learned", nfe, sol.nfe, len(g) - 1, time.perf_counter() - t0,
                              rmse(sol.x, x_ref), "dopri5", False, sol.x.detach()))
    specs = [s for s in specs if s.grid is None]
    jobs = [(s, k, n) for s in specs for k in grids for n in nfes]
    bar = tqdm(jobs, desc="(a) solvers", disable=not progress, leave=False)
    for spec, kind, nfe in bar:
        if spec.name in failed:
            continue
        bar.set_postfix_str(f"{spec.name}, {kind}, NFE {nfe}")
        solver = spec.solver
        steps = max(1, nfe // max(1, int(solver.nfe_per_step)))
        try:
            if solver.stochastic and spec.name not in refs:
                t0 = time.perf_counter()
                with torch.no_grad():
                    sol = solve(den, x1, _grid(den, sde_ref_steps, t_start, t_end, grids[0]), solver, cond=cond,
                                noise=brownian())
                refs[spec.name] = (sol.x, sol.nfe, time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.no_grad():
                sol = solve(den, x1, _grid(den, steps, t_start, t_end, kind), solver, cond=cond,
                            noise=brownian() if solver.stochastic else None)
            sec = time.perf_counter() - t0
        except NotImplementedError as exc:
            failed.add(spec.name)
            notes.append(f"{spec.name}: skipped (not implemented: {exc})")
            continue
        except Exception as exc:  # a solver that fails on this model is reported, never hidden
            notes.append(f"{spec.name} on the {kind} grid at NFE {nfe}: failed ({type(exc).__name__}: {exc})")
            continue
        if solver.stochastic:
            ref, reference = refs[spec.name][0], f"same SDE solver, {sde_ref_steps} steps, same Brownian path"
        else:
            ref, reference = x_ref, "dopri5"
        runs.append(SampleRun(spec.name, kind, nfe, sol.nfe, steps, sec, rmse(sol.x, ref), reference,
                              bool(solver.stochastic), sol.x.detach()))
    return runs, refs, notes
