"""The demo job (``python -m adjointflow demo``, ``make demo``) on the bundled digits flow model.

(a) Sampling: every solver in :mod:`adjointflow.solvers` at NFE 5/10/20 from the same latents and
    labels, error against a dopri5 reference (:mod:`adjointflow.demo.sampling`).
(b) Inverse problems: noisy inpainting and 2x super-resolution of held-out digits with every method in
    :mod:`adjointflow.guidance` (:mod:`adjointflow.demo.inverse`).

Writes ``solvers.png``, ``inverse_problems.png`` and ``results.md`` into the output directory and
prints the tables. Methods that are not in the package yet are skipped with a note, never faked.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..grids import GRID_KINDS

__all__ = ["DemoConfig", "FULL", "QUICK", "DemoResult", "load_denoiser", "run_demo", "check_demo_extras",
           "DEMO_EXTRAS"]

#: module -> pip package of every optional dependency the demo uses (the ``demo`` extra)
DEMO_EXTRAS = {"safetensors": "safetensors", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def check_demo_extras() -> None:
    """Raise one ``ImportError`` naming every missing demo dependency and the command that installs
    them all, before any work is done."""
    missing = [pkg for mod, pkg in DEMO_EXTRAS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ImportError(f"the demo needs {', '.join(missing)}, not installed: pip install 'adjointflow[demo]'")


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch threads (``None``: as found), restoring the count afterwards."""
    found = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(found)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. ``FULL`` takes a few minutes on one CPU core, ``QUICK`` about one."""

    n_samples: int = 20          # part (a): latents per solver (labels 0..9 repeated)
    nfes: tuple = (5, 10, 20)
    grids: tuple = ("quadratic", "uniform")  # grid kinds; the figure shows the first
    t_start: float = 0.999       # at t = 1 the reverse SDE of a rectified flow is singular (f = -1/(1 - t))
    t_end: float = 1e-3
    sde_ref_steps: int = 500
    n_inverse: int = 10          # part (b): held-out digits per task
    sigma_y: float = 0.05
    guidance_steps: int = 50     # DPS / FlowChef sampling steps
    dflow_iterations: int = 6    # D-Flow outer L-BFGS steps
    adjoint_iterations: int = 40  # AdjointGuidance Adam steps
    measure_memory: bool = True
    n_show: int = 10
    seed: int = 0
    quick: bool = False

    def __post_init__(self):
        for name in ("n_samples", "sde_ref_steps", "n_inverse", "n_show", "guidance_steps", "dflow_iterations",
                     "adjoint_iterations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.nfes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.nfes):
            raise ValueError(f"nfes must be positive ints, got {self.nfes!r}")
        if not 0.0 <= self.t_end < self.t_start <= 1.0:
            raise ValueError(f"need 0 <= t_end < t_start <= 1, got t_start={self.t_start}, t_end={self.t_end}")
        if not self.grids or any(k not in GRID_KINDS for k in self.grids):
            raise ValueError(f"grids must be a non-empty tuple of {GRID_KINDS}, got {self.grids!r}")
        if not self.sigma_y > 0:
            raise ValueError(f"sigma_y must be positive, got {self.sigma_y!r}")


FULL = DemoConfig()
QUICK = DemoConfig(n_samples=10, grids=("quadratic",), sde_ref_steps=200, n_inverse=6, guidance_steps=30,
                   dflow_iterations=3, adjoint_iterations=25, quick=True)


@dataclass
class DemoResult:
    out_dir: Path
    sample_runs: list
    inverse_runs: list
    notes: list
    seconds: float
    files: dict


def load_denoiser(weights=None):
    """The bundled digits model as a :class:`~adjointflow.Denoiser` and its metadata (see
    :func:`adjointflow.pretrained.digits`)."""
    from ..pretrained import _digits_with_metadata

    return _digits_with_metadata(weights)


def _sampling_table(runs, nfes):
    """One row per (solver, grid): RMSE at each NFE budget (the NFE actually used in brackets when it
    differs from the budget) and the seconds of the largest budget."""
    header = ["solver", "grid", *[f"RMSE @ NFE {n}" for n in nfes], f"seconds @ NFE {nfes[-1]}", "reference"]
    rows, by = [], {(r.name, r.grid, r.nfe_target): r for r in runs}
    for name, grid in dict.fromkeys((r.name, r.grid) for r in runs):
        cells = []
        for n in nfes:
            r = by.get((name, grid, n))
            missing = "—" if grid == "learned" else "failed"  # a trained solver exists for one NFE only
            cells.append(missing if r is None else f"{r.rmse:.4f}" + ("" if r.nfe == n else f" ({r.nfe})"))
        last = by.get((name, grid, nfes[-1])) or next((r for r in runs if (r.name, r.grid) == (name, grid)), None)
        ref = "SDE, fine-step" if last is not None and last.stochastic else "dopri5"
        rows.append([name, grid, *cells, None if last is None else round(last.seconds, 3), ref])
    return header, rows


def run_demo(out_dir="demo_out", quick: bool = False, weights=None, progress: bool = True,
             config: DemoConfig | None = None, threads: int | None = None) -> DemoResult:
    """Run both parts of the demo, write the figures and ``results.md`` into ``out_dir``, print the tables.

    ``threads``: torch's thread count during the run, restored afterwards (``None``: leave it as it is;
    the command line runs with one thread). Missing demo dependencies are reported all at once, first.
    """
    check_demo_extras()
    with torch_threads(threads):
        return _run_demo(out_dir, quick, weights, progress, config)


def _run_demo(out_dir, quick, weights, progress, config) -> DemoResult:
    from .inverse import make_tasks, method_factories, solve_inverse_problems
    from .report import console_table, fmt_bytes, plot_inverse, plot_solvers, psnr
    from .sampling import SolverSpec, compare_solvers, discover_solvers

    cfg = config if config is not None else (QUICK if quick else FULL)
    if config is not None and quick:
        cfg = replace(cfg, quick=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    den, meta = load_denoiser(weights)
    say = print
    say(f"digits model: {meta.get('n_params', '?')} parameters, trained {meta.get('training', {}).get('steps', '?')} "
        f"steps; held-out flow-matching loss {meta.get('test_loss_ema', float('nan')):.4f}")

    # ---- (a) sampling -------------------------------------------------------------------------
    g = torch.Generator().manual_seed(cfg.seed)
    x1 = torch.randn(cfg.n_samples, 1, 16, 16, generator=g)
    labels = torch.arange(cfg.n_samples) % 10
    specs, notes = discover_solvers()
    # the bundled bespoke solvers, trained for this model (adjointflow/demo/bespoke_digits.py); one
    # that cannot be loaded is skipped with a note
    from .bespoke_digits import bundled_bespoke_solvers

    bespoke, bespoke_notes = bundled_bespoke_solvers(den, cfg.nfes)
    specs += [SolverSpec("BespokeSolver (trained per NFE)", s, grid=s.timesteps()) for s in bespoke.values()]
    notes = [n for n in notes if not n.startswith("BespokeSolver")] + bespoke_notes
    say(f"(a) sampling with {len(specs)} solvers at NFE {list(cfg.nfes)} ({cfg.n_samples} samples, labels 0-9)")
    t0 = time.perf_counter()
    runs, refs, fail = compare_solvers(den, x1, labels, specs, cfg.nfes, t_start=cfg.t_start, t_end=cfg.t_end,
                                       grids=cfg.grids, sde_ref_steps=cfg.sde_ref_steps, seed=cfg.seed,
                                       progress=progress)
    notes += fail
    sec_a = time.perf_counter() - t0
    header_a, rows_a = _sampling_table(runs, list(cfg.nfes))
    ref_x, ref_nfe, ref_sec = refs["dopri5"]
    ref_info = (f"dopri5 reference: rtol = atol = 1e-6, {ref_nfe} NFE, {ref_sec:.1f} s; it differs from dopri5 at "
                f"1e-5 by RMSE {refs['dopri5_check']:.1e}. SDE solvers: vs the same solver with "
                f"{cfg.sde_ref_steps} steps on the same Brownian path (pathwise error).")
    say(console_table(header_a, rows_a))
    say(ref_info)
    files = {"solvers": out / "solvers.png", "inverse": out / "inverse_problems.png", "results": out / "results.md"}
    plot_solvers(files["solvers"], [r for r in runs if r.grid in (cfg.grids[0], "learned")], ref_x, f"dopri5 ({ref_nfe} NFE)",
                 list(cfg.nfes), cfg.n_show, grid=cfg.grids[0])

    # ---- (b) inverse problems -----------------------------------------------------------------
    t0 = time.perf_counter()
    tasks = make_tasks(cfg.n_inverse, cfg.sigma_y, cfg.seed)
    factories = method_factories(cfg.guidance_steps, cfg.dflow_iterations, cfg.adjoint_iterations)
    x_init = torch.randn(cfg.n_inverse, 1, 16, 16, generator=torch.Generator().manual_seed(cfg.seed + 2))
    say(f"(b) inverse problems on {cfg.n_inverse} held-out digits, sigma_y = {cfg.sigma_y}: "
        + ", ".join(k for k, f in factories.items() if f is not None))
    inv, fail = solve_inverse_problems(den, tasks, factories, x_init, cfg.sigma_y, progress=progress,
                                       measure_memory=cfg.measure_memory)
    notes += fail
    sec_b = time.perf_counter() - t0
    header_b = ["task", "method", "PSNR (dB)", "seconds", "peak memory", "NFE", "VJPs", "settings"]
    rows_b = []
    for task in tasks:
        rows_b.append([task.name, "degraded input (A^+ y)", psnr(task.degraded, task.truth), None, None, None, None,
                       ""])
        rows_b += [[r.task, r.method, r.psnr, r.seconds, fmt_bytes(r.peak_bytes), r.nfe, r.vjps, r.settings]
                   for r in inv if r.task == task.name]
    say(console_table(header_b[:-1], [r[:-1] for r in rows_b]))
    fig_tasks = {
        t.name: {"truth": t.truth, "degraded": (t.degraded, psnr(t.degraded, t.truth)),
                 "methods": [(r.method, r.x, r.psnr) for r in inv if r.task == t.name]}
        for t in tasks
    }
    plot_inverse(files["inverse"], fig_tasks, min(cfg.n_show, cfg.n_inverse))

    seconds = time.perf_counter() - t_all
    for n in notes:
        say(f"note: {n}")
    _write_markdown(files["results"], cfg, meta, header_a, rows_a, ref_info, header_b, rows_b, notes,
                    sec_a, sec_b, seconds)
    say(f"wrote {files['solvers']}, {files['inverse']}, {files['results']} in {seconds:.0f} s")
    return DemoResult(out, runs, inv, notes, seconds, files)


def _write_markdown(path, cfg, meta, header_a, rows_a, ref_info, header_b, rows_b, notes, sec_a, sec_b, seconds):
    from .report import markdown_table

    cmd = "python -m adjointflow demo" + (" --quick" if cfg.quick else "")
    lines = [
        "# adjointflow demo results",
        "",
        f"Produced by `{cmd}` in {seconds:.0f} s on {platform.machine()} "
        f"({torch.get_num_threads()} torch thread(s), torch {torch.__version__}).",
        f"Model: bundled digits flow model ({meta.get('n_params', '?')} parameters, LinearFlow, velocity "
        f"prediction, held-out flow-matching loss {meta.get('test_loss_ema', float('nan')):.4f}).",
        "",
        "## (a) Sampling: every solver vs a dopri5 reference",
        "",
        f"{cfg.n_samples} latents (seed {cfg.seed}) with labels 0-9, t = {cfg.t_start} -> {cfg.t_end} on each grid "
        f"kind ({', '.join(cfg.grids)}; `adjointflow.timesteps`), steps = NFE budget // the solver's NFE per step; "
        "RMSE per image in [-1, 1] pixel units, mean over the batch; the NFE actually used is in brackets where it "
        "differs from the budget. " + ref_info + " An SDE does not converge to the ODE solution, so its row "
        f"measures its own discretisation error. Part (a) took {sec_a:.0f} s. The figure shows the "
        f"{cfg.grids[0]} grid.",
        "",
        markdown_table(header_a, rows_a),
        "",
        "![solvers](solvers.png)",
        "",
        "## (b) Inverse problems on held-out digits",
        "",
        f"{cfg.n_inverse} test-split digits, measurement noise sigma_y = {cfg.sigma_y}, unconditional model, the "
        "same start latents for every method. PSNR in dB (peak-to-peak 2), mean over the images. "
        "Peak memory: live tensor storage during the run (`adjointflow.adjoint.memory.PeakMemory`). "
        f"Part (b) took {sec_b:.0f} s.",
        "",
        markdown_table(header_b, rows_b),
        "",
        "![inverse problems](inverse_problems.png)",
        "",
    ]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Configuration", "", "```", repr(asdict(cfg)), "```", ""]
    Path(path).write_text("\n".join(lines))
