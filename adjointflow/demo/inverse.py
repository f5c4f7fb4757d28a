"""Demo part (b): noisy inpainting and 2x super-resolution of held-out digits with every guidance method.

Measurements ``y = A(x) + sigma_y n`` of test-split digits (never seen in training); each method in
:mod:`adjointflow.guidance` gets the same unconditional model, the same :class:`MeasurementLoss` and
the same start latents. A method that is not in the package yet is listed as "not built yet".
"""
from __future__ import annotations

import dataclasses
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
    classical: tuple | None = None  # (label, estimate) of the model-free baseline (demo/baselines.py)


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
    return x[_picked(labels, n)]


def _picked(labels: Tensor, n: int) -> list[int]:
    idx, used = [], set()
    for rnd in range(n):
        for c in range(10):
            if len(idx) == n:
                break
            hits = [i for i in (labels == c).nonzero().flatten().tolist() if i not in used]
            if len(hits) > rnd:
                idx.append(hits[0])
                used.add(hits[0])
    return idx


#: test-split digits the demo may report (the first of each class in turn, up to this many); validation
#: digits for choosing settings are drawn from the rest of the test split
REPORTED = 20


def make_tasks(n: int, sigma_y: float, seed: int, validation: bool = False) -> list[Task]:
    """Inpainting of a missing central 8x8 box and 2x average-pool super-resolution, both with Gaussian
    measurement noise ``sigma_y`` (pixels in [-1, 1]). ``validation=True`` draws the digits from the
    test images the demo never reports (disjoint from the first :data:`REPORTED` picks), for tuning."""
    from ..guidance import Downsample, Inpaint
    from .baselines import classical_estimate
    from .digits import load_digits_tensor

    x, labels = load_digits_tensor("test")
    if validation:
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[_picked(labels, REPORTED)] = False
        x, labels = x[keep], labels[keep]
    elif n > REPORTED:
        raise ValueError(f"the demo reports at most {REPORTED} digits, got n={n}")
    truth = pick_digits(x, labels, n)
    g = torch.Generator().manual_seed(seed + 1 + (1000 if validation else 0))
    mask = torch.ones(16, 16)
    mask[4:12, 4:12] = 0
    tasks = []
    for name, op in (("inpainting (8x8 box)", Inpaint(mask)), ("2x super-resolution", Downsample(2))):
        ax = op(truth)
        y = ax + sigma_y * torch.randn(ax.shape, generator=g)
        tasks.append(Task(name, op, truth, y, op.pinv(y), classical_estimate(op, y)))
    return tasks


#: guidance methods with defaults, run as ``Method()`` (or with the caps of a smaller demo); DPS's default
#: (1000 steps) is the paper's, so the demo runs it at 50 Euler steps
DEFAULT_METHODS = ("FlowChef", "DFlow", "AdjointGuidance", "DDRM", "PiGDM", "DiffPIR", "FlowDPS", "LanPaint")


def method_factories(guidance_steps: int = 50, dflow_iterations: int = 20, adjoint_iterations: int = 100,
                     ) -> dict[str, Callable | None]:
    """Name -> ``() -> guidance method``, or ``None`` if the class is not in :mod:`adjointflow.guidance`.

    Every method runs with its **defaults** (chosen on validation digits the demo never reports:
    ``benchmarks/results/guidance_defaults.md``), except DPS at ``guidance_steps`` Euler steps with
    scale 1 (the paper's 1000 steps would take minutes; scale 0.5 / 1 / 2 gave 26.1 / 27.7 / 26.4 dB
    inpainting and 34.5 / 33.9 / 32.7 dB super-resolution on the validation digits). The other
    arguments only cap smaller runs (``--quick``): ``guidance_steps`` also caps FlowChef's steps,
    ``dflow_iterations`` D-Flow's outer L-BFGS steps, ``adjoint_iterations`` AdjointGuidance's.
    """
    import adjointflow.guidance as G

    from ..solvers import Euler

    out: dict[str, Callable | None] = {"DPS": None, **{name: None for name in DEFAULT_METHODS}}
    if hasattr(G, "DPS"):
        out["DPS"] = lambda: G.DPS(solver=Euler(), steps=guidance_steps, scale=1.0)
    caps = {"FlowChef": {"steps": guidance_steps}, "LanPaint": {"steps": guidance_steps},
            "DFlow": {"iterations": dflow_iterations},
            "AdjointGuidance": {"iterations": adjoint_iterations}}
    for name in DEFAULT_METHODS:
        cls = getattr(G, name, None)
        if cls is None:
            continue
        default = cls()
        kw = {k: min(v, getattr(default, k)) for k, v in caps.get(name, {}).items()}
        out[name] = (lambda cls=cls, kw=kw: cls(**kw))
    return out


def _compact(obj) -> str:
    """``Name(field=value, ...)`` listing only the fields that differ from their defaults."""
    if not dataclasses.is_dataclass(obj):
        return repr(obj)
    keep = []
    for f in dataclasses.fields(obj):
        if f.name in ("progress", "callback", "noise", "params") or not f.init:
            continue
        v = getattr(obj, f.name)
        if f.name == "grid":
            if v is not None:
                keep.append(f"grid={len(v) - 1} steps from t={float(v[0]):g}")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(v, torch.Tensor) or isinstance(default, torch.Tensor):
            continue
        if v != default or (f.name == "order" and v is not None):
            keep.append(f"{f.name}={_compact(v)}")
    return f"{type(obj).__name__}({', '.join(keep)})"


def _settings(method) -> str:
    text = _compact(method)
    return text[text.index("(") + 1: -1] or "defaults"


def solve_inverse_problems(den: Denoiser, tasks: list[Task], factories: dict, x_init: Tensor, sigma_y: float,
                           progress: bool = True, measure_memory: bool = True,
                           ) -> tuple[list[InverseRun], list[str]]:
    """Run every available method on every task. Returns the runs and notes (skipped / failed).

    Seconds come from a plain run; peak memory from a second, identical run under the meter (which
    roughly doubles the run time), unless ``measure_memory=False``."""
    from tqdm.auto import tqdm

    from ..guidance import MeasurementLoss

    notes = [f"{name}: not built yet (adjointflow.guidance has no such class)" for name, f in factories.items()
             if f is None]
    meter = memory_meter() if measure_memory else None
    if measure_memory and meter is None:
        notes.append("peak memory: n/a (adjointflow.adjoint.memory is not built yet)")
    runs: list[InverseRun] = []
    jobs = [(t, name, f) for t in tasks for name, f in factories.items() if f is not None]
    bar = tqdm(jobs, desc="(b) inverse problems", disable=not progress, leave=False)
    for task, name, factory in bar:
        bar.set_postfix_str(f"{name} / {task.name}")
        method = factory()
        if hasattr(method, "progress"):  # the demo shows its own bar
            method = dataclasses.replace(method, progress=False)
        objective = MeasurementLoss(task.operator, task.y, sigma_y)
        try:
            t0 = time.perf_counter()
            res = method.run(den, objective, x_init.clone())
            sec = time.perf_counter() - t0
            with measure_peak(meter) as box:
                if meter is not None:
                    method.run(den, objective, x_init.clone())
        except Exception as exc:  # a method failing on this model is reported, never hidden
            notes.append(f"{name} on {task.name}: failed ({type(exc).__name__}: {exc})")
            continue
        runs.append(InverseRun(task.name, name, psnr(res.x, task.truth), sec, box["peak"], int(res.nfe),
                               int(res.vjps), _settings(method), res.x.detach()))
    return runs, notes
