"""Demo part (b): noisy inpainting and 2x super-resolution of held-out digits with every guidance method.

Measurements ``y = A(x) + sigma_y n`` of test-split digits (never seen in training); each method in
:mod:`adjointflow.guidance` gets the same unconditional model, the same :class:`MeasurementLoss` and
the same start latents. A method that is not in the package yet is listed as "not built yet".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..models import Denoiser
from .report import measure_peak, memory_meter, psnr

__all__ = ["InverseRun", "Task", "make_tasks", "method_factories", "solve_inverse_problems"]


@dataclass
class Task:
    name: str
    operator: object
    truth: Tensor
    y: Tensor
    degraded: Tensor  # A^+ y, what the measurement shows in image space


@dataclass
class InverseRun:
    task: str
    method: str
    psnr: float
    seconds: float
    peak_bytes: int | None
    nfe: int
    vjps: int
    settings: str
    x: Tensor = field(repr=False)


def pick_digits(x: Tensor, labels: Tensor, n: int) -> Tensor:
    """The first test image of each class 0, 1, 2, ... in turn, so a small batch shows varied digits."""
    idx, used = [], set()
    for rnd in range(n):
        for c in range(10):
            if len(idx) == n:
                break
            hits = [i for i in (labels == c).nonzero().flatten().tolist() if i not in used]
            if len(hits) > rnd:
                idx.append(hits[0])
                used.add(hits[0])
    return x[idx]


def make_tasks(n: int, sigma_y: float, seed: int) -> list[Task]:
    """Inpainting of a missing central 8x8 box and 2x average-pool super-resolution, both with Gaussian
    measurement noise ``sigma_y`` (pixels in [-1, 1])."""
    from ..guidance import Downsample, Inpaint
    from .digits import load_digits_tensor

    x, labels = load_digits_tensor("test")
    truth = pick_digits(x, labels, n)
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.ones(16, 16)
    mask[4:12, 4:12] = 0
    tasks = []
    for name, op in (("inpainting (8x8 box)", Inpaint(mask)), ("2x super-resolution", Downsample(2))):
        ax = op(truth)
        y = ax + sigma_y * torch.randn(ax.shape, generator=g)
        tasks.append(Task(name, op, truth, y, op.pinv(y)))
    return tasks


def method_factories(quick: bool) -> dict[str, Callable | None]:
    """Name -> ``() -> guidance method`` tuned for the digits model, or ``None`` if not built yet.

    Budgets are chosen so the demo stays within minutes on one CPU core; the per-method settings are
    printed in the table.
    """
    import adjointflow.guidance as G
    from ..solvers import Euler, Heun

    steps = 30 if quick else 50
    out: dict[str, Callable | None] = {}
    out["DPS"] = (lambda: G.DPS(solver=Euler(), steps=steps, scale=0.5)) if hasattr(G, "DPS") else None
    out["FlowChef"] = (lambda: G.FlowChef(steps=steps, lr=0.05)) if hasattr(G, "FlowChef") else None
    if hasattr(G, "DFlow"):
        it = 3 if quick else 6
        out["D-Flow"] = lambda: G.DFlow(solver=Heun(), steps=3, iterations=it, max_iter=5, regularizer="chi",
                                        reg_weight=0.01)
    else:
        out["D-Flow"] = None
    if hasattr(G, "AdjointGuidance"):
        it = 10 if quick else 25
        out["AdjointGuidance"] = lambda: G.AdjointGuidance(iterations=it)
    else:
        out["AdjointGuidance"] = None
    return out


def _settings(method) -> str:
    import dataclasses

    if not dataclasses.is_dataclass(method):
        return repr(method)
    keep = []
    for f in dataclasses.fields(method):
        v = getattr(method, f.name)
        if f.name in ("progress", "grid", "noise") or v is None:
            continue
        if v != f.default and (f.default_factory is dataclasses.MISSING or v != f.default_factory()):
            keep.append(f"{f.name}={type(v).__name__ + '()' if hasattr(v, 'step') else v}")
    return ", ".join(keep) or "defaults"


def solve_inverse_problems(den: Denoiser, tasks: list[Task], factories: dict, x_init: Tensor, sigma_y: float,
                           progress: bool = True) -> tuple[list[InverseRun], list[str]]:
    """Run every available method on every task. Returns the runs and notes (skipped / failed)."""
    from tqdm.auto import tqdm

    from ..guidance import MeasurementLoss

    notes = [f"{name}: not built yet (adjointflow.guidance has no such class)" for name, f in factories.items()
             if f is None]
    meter = memory_meter()
    if meter is None:
        notes.append("peak memory: n/a (adjointflow.adjoint.memory is not built yet)")
    runs: list[InverseRun] = []
    jobs = [(t, name, f) for t in tasks for name, f in factories.items() if f is not None]
    bar = tqdm(jobs, desc="(b) inverse problems", disable=not progress, leave=False)
    for task, name, factory in bar:
        bar.set_postfix_str(f"{name} / {task.name}")
        method = factory()
        objective = MeasurementLoss(task.operator, task.y, sigma_y)
        t0 = time.perf_counter()
        try:
            with measure_peak(meter) as box:
                res = method.run(den, objective, x_init.clone())
        except Exception as exc:  # a method failing on this model is reported, never hidden
            notes.append(f"{name} on {task.name}: failed ({type(exc).__name__}: {exc})")
            continue
        sec = time.perf_counter() - t0
        runs.append(InverseRun(task.name, name, psnr(res.x, task.truth), sec, box["peak"], int(res.nfe),
                               int(res.vjps), _settings(method), res.x.detach()))
    return runs, notes
