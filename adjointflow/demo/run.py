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
    guidance_steps: int = 50     # DPS sampling steps (and a cap on FlowChef's, default 50)
    dflow_iterations: int = 20   # cap on D-Flow's outer L-BFGS steps (default 20)
    adjoint_iterations: int = 100  # cap on AdjointGuidance's iterations (default 100)
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

    def describe(self) -> str:
        """What this configuration runs, in one line (the command line's ``--quick`` help)."""
        nfes = "/".join(str(n) for n in self.nfes)
        return (f"{self.n_samples} samples per solver at NFE {nfes} on the {' and '.join(self.grids)} grid"
                f"{'s' if len(self.grids) > 1 else ''}; inverse problems on {self.n_inverse} digits "
                f"(DPS {self.guidance_steps} steps, D-Flow <= {self.dflow_iterations} L-BFGS steps, AdjointGuidance "
                f"<= {self.adjoint_iterations} iterations){'' if self.measure_memory else ', no memory measurement'}")


FULL = DemoConfig()
QUICK = DemoConfig(n_samples=10, grids=("quadratic",), sde_ref_steps=200, n_inverse=4, guidance_steps=30,
                   dflow_iterations=5, adjoint_iterations=60, measure_memory=False, quick=True)


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


def _sampling_tables(runs, nfes):
    """ODE and SDE tables: one row per (solver, grid), RMSE at each NFE budget (the NFE actually used in
    brackets when it differs from the budget) and the seconds of the largest budget."""
    header = ["solver", "grid", *[f"RMSE @ NFE {n}" for n in nfes], f"seconds @ NFE {nfes[-1]}"]
    ode, sde, by = [], [], {(r.name, r.grid, r.nfe_target): r for r in runs}
    for name, grid in dict.fromkeys((r.name, r.grid) for r in runs):
        cells = []
        for n in nfes:
            r = by.get((name, grid, n))
            missing = "—" if grid == "learned" else "failed"  # a trained solver exists per bundled NFE only
            cells.append(missing if r is None else f"{r.rmse:.4f}" + ("" if r.nfe == n else f" ({r.nfe})"))
        last = by.get((name, grid, nfes[-1])) or next((r for r in runs if (r.name, r.grid) == (name, grid)), None)
        row = [name, grid, *cells, None if last is None else round(last.seconds, 3)]
        (sde if last is not None and last.stochastic else ode).append(row)
    return header, ode, sde


def _non_monotone_notes(runs, schedule, cfg) -> list[str]:
    """A note for each ODE solver whose error grows with the NFE on some grid, with the step-size ratio
    of the grid's last two steps in lambda (what multistep extrapolation across the last step sees)."""
    from ..grids import timesteps

    out = []
    by = {}
    for r in runs:
        if not r.stochastic and r.grid != "learned":
            by.setdefault((r.name, r.grid), []).append(r)
    for (name, grid), rs in by.items():
        rs.sort(key=lambda r: r.nfe_target)
        for a, b in zip(rs, rs[1:]):
            if b.rmse > 1.1 * a.rmse:
                g = timesteps(schedule, b.steps, grid, t_start=cfg.t_start, t_end=cfg.t_end)
                lam = schedule.log_snr(g)
                h_last, h_prev = float(lam[-1] - lam[-2]), float(lam[-2] - lam[-3]) if len(g) > 2 else float("nan")
                out.append(
                    f"{name} on the {grid} grid gets worse from NFE {a.nfe_target} to {b.nfe_target} (RMSE {a.rmse:.4f} "
                    f"-> {b.rmse:.4f}): at {b.steps} steps the last step (t = {float(g[-2]):.3g} -> {float(g[-1]):.3g}) "
                    f"spans {h_last:.1f} in lambda against {h_prev:.1f} for the one before, and a multistep method "
                    "extrapolates its history polynomial across it. A known limitation of the multistep final step on "
                    "grids with a large last step (the quadratic grid keeps the ratios moderate); not a bug of this demo.")
    return out


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
    notes = [n for n in notes if not n.startswith(("BespokeSolver", "BespokeNSSolver"))] + bespoke_notes
    say(f"(a) sampling with {len(specs)} solvers at NFE {list(cfg.nfes)} ({cfg.n_samples} samples, labels 0-9)")
    t0 = time.perf_counter()
    runs, refs, fail = compare_solvers(den, x1, labels, specs, cfg.nfes, t_start=cfg.t_start, t_end=cfg.t_end,
                                       grids=cfg.grids, sde_ref_steps=cfg.sde_ref_steps, seed=cfg.seed,
                                       progress=progress)
    notes += fail
    sec_a = time.perf_counter() - t0
    header_a, ode_rows, sde_rows = _sampling_tables(runs, list(cfg.nfes))
    cliffs = _non_monotone_notes(runs, den.schedule, cfg)
    ref_x, ref_nfe, ref_sec = refs["dopri5"]
    ref_info = (f"dopri5 reference: rtol = atol = 1e-6, {ref_nfe} NFE, {ref_sec:.1f} s; it differs from dopri5 at "
                f"1e-5 by RMSE {refs['dopri5_check']:.1e}.")
    say(console_table(header_a, ode_rows))
    say(ref_info)
    for c in cliffs:
        say(f"note: {c}")
    if sde_rows:
        say(f"SDE solvers: pathwise error against the same solver with {cfg.sde_ref_steps} steps on the same "
            "Brownian path (not comparable with the ODE rows)")
        say(console_table(header_a, sde_rows))
    files = {"solvers": out / "solvers.png", "inverse": out / "inverse_problems.png", "results": out / "results.md"}
    map_nfe = sorted(cfg.nfes)[len(cfg.nfes) // 2]
    plot_solvers(files["solvers"], runs, ref_x, f"dopri5 ({ref_nfe} NFE)", cfg.grids[0], map_nfe, cfg.n_show)

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
    rows_b, fig_tasks, verdicts = [], {}, []
    for task in tasks:
        rows_b.append([task.name, "degraded input (A^+ y)", psnr(task.degraded, task.truth), None, None, None, None,
                       ""])
        classical = None
        if task.classical is not None:
            classical = (task.classical[0], task.classical[1], psnr(task.classical[1], task.truth))
            rows_b.append([task.name, task.classical[0], classical[2], None, None, 0, 0, "no model"])
        mine = [r for r in inv if r.task == task.name]
        rows_b += [[r.task, r.method, r.psnr, r.seconds, fmt_bytes(r.peak_bytes), r.nfe, r.vjps, r.settings]
                   for r in mine]
        fig_tasks[task.name] = {"truth": task.truth, "degraded": (task.degraded, psnr(task.degraded, task.truth)),
                                "classical": classical, "methods": [(r.method, r.x, r.psnr) for r in mine]}
        verdicts.append(_verdict(task.name, classical, mine))
    say(console_table(header_b[:-1], [r[:-1] for r in rows_b]))
    for v in verdicts:
        say(v)
    plot_inverse(files["inverse"], fig_tasks, min(cfg.n_show, cfg.n_inverse))

    seconds = time.perf_counter() - t_all
    for n in notes:
        say(f"note: {n}")
    _write_markdown(files["results"], cfg, meta, header_a, ode_rows, sde_rows, ref_info, cliffs, header_b, rows_b,
                    verdicts, notes, sec_a, sec_b, seconds)
    say(f"wrote {files['solvers']}, {files['inverse']}, {files['results']} in {seconds:.0f} s")
    return DemoResult(out, runs, inv, notes, seconds, files)


def _verdict(task: str, classical, runs) -> str:
    """One honest sentence per task: the best method's margin over the classical baseline, and the
    methods that do not beat it."""
    if not runs:
        return f"{task}: no guidance method ran."
    best = max(runs, key=lambda r: r.psnr)
    if classical is None:
        return f"{task}: best {best.method} at {best.psnr:.1f} dB."
    label, _, ref = classical
    losers = [f"{r.method} ({r.psnr:.1f})" for r in runs if r.psnr <= ref]
    text = (f"{task}: the best method, {best.method}, reaches {best.psnr:.1f} dB, {best.psnr - ref:+.1f} dB against the "
            f"model-free {label.removeprefix('classical: ')} ({ref:.1f} dB)")
    return text + (f"; not better than it: {', '.join(losers)}." if losers else "; every method beats it.")


def _write_markdown(path, cfg, meta, header_a, ode_rows, sde_rows, ref_info, cliffs, header_b, rows_b, verdicts,
                    notes, sec_a, sec_b, seconds):
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
        "## (a) Sampling: every ODE solver vs a dopri5 reference",
        "",
        f"{cfg.n_samples} latents (seed {cfg.seed}) with labels 0-9, t = {cfg.t_start} -> {cfg.t_end} on each grid "
        f"kind ({', '.join(cfg.grids)}; `adjointflow.timesteps`), steps = NFE budget // the solver's NFE per step; "
        "RMSE per image in [-1, 1] pixel units, mean over the batch; the NFE actually used is in brackets where it "
        f"differs from the budget. {ref_info} Part (a) took {sec_a:.0f} s.",
        "",
        markdown_table(header_a, ode_rows),
        "",
        *[f"- {c}" for c in cliffs],
        *([""] if cliffs else []),
        f"The figure: RMSE against the reference vs NFE on the {cfg.grids[0]} grid (log-log; dashed: solvers "
        "trained for this model, one per bundled NFE), and where each solver's samples differ from the "
        "reference at one NFE. The samples themselves look alike at these budgets; the error maps show where they "
        "differ.",
        "",
        "![solvers](solvers.png)",
        "",
    ]
    if sde_rows:
        lines += [
            "### SDE solvers",
            "",
            "An SDE sampler draws a different sample for each Brownian path, so it is not compared with the ODE "
            f"reference: each row is the pathwise error against the same solver with {cfg.sde_ref_steps} steps on "
            "the same path. At 5-20 steps both SDE solvers are far from converged on this model (their error starts "
            "to drop only past ~200 steps), and Euler-Maruyama's first step on the quadratic grid is explicit in "
            "the stiff drift f = -1/(1 - t) of the rectified flow's reverse SDE, which is why it blows up at low "
            "NFE. At these budgets use an ODE solver; the SDE solvers are in the library for their stochasticity "
            "(and their continuous adjoint), not for few-step sampling.",
            "",
            markdown_table(header_a, sde_rows),
            "",
        ]
    lines += [
        "## (b) Inverse problems on held-out digits",
        "",
        f"{cfg.n_inverse} test-split digits, measurement noise sigma_y = {cfg.sigma_y}, unconditional model, the "
        "same start latents for every method. PSNR in dB (peak-to-peak 2), mean over the images. Every guidance "
        "method runs with its defaults, chosen on other test digits than these "
        "(`benchmarks/results/guidance_defaults.md`), except DPS at 50 Euler steps (scale 1, checked on those "
        "digits too); the classical rows use no model (harmonic fill: Laplace's equation from the observed "
        "border; bicubic: upsampling the measurement). Peak memory: live tensor storage during the run "
        f"(`adjointflow.adjoint.memory.PeakMemory`). Part (b) took {sec_b:.0f} s.",
        "",
        markdown_table(header_b, rows_b),
        "",
        *[f"- {v}" for v in verdicts],
        "",
        "The digits are 8x8 images upsampled bilinearly to 16x16, so smooth interpolation is close to the truth in "
        "super-resolution by construction; inpainting an 8x8 hole has no such shortcut.",
        "",
        "![inverse problems](inverse_problems.png)",
        "",
    ]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Configuration", "", "```", repr(asdict(cfg)), "```", ""]
    Path(path).write_text("\n".join(lines))
