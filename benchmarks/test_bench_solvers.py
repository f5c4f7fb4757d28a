"""Error vs NFE (5, 10, 20, 50) for every solver, on analytic problems with a torchdiffeq reference.

Run: ``make bench`` or
``.venv/bin/python -m pytest benchmarks/test_bench_solvers.py --benchmark-only -o testpaths=benchmarks``.
Writes ``benchmarks/results/solvers.md`` (tables) and ``benchmarks/results/solvers_error_vs_nfe.png``.

Problems (float64, batch 256, error = RMS of the final state vs the reference):

* ``gauss8-vp``: GaussianData in 8-D (means -1.5..2, stds 0.1..2), VPLinear, eps model, uniform
  log-SNR grid from t = 1 to 1e-3;
* ``mix2-vp``: a 2-D GaussianMixture (3 components), same schedule and grid;
* ``mix2-flow``: the same mixture under LinearFlow with a velocity model on a uniform t grid from
  t = 1 exactly (alpha = 0) to 1e-3, the way flow models are sampled.

Reference: ``torchdiffeq.odeint(method="dopri5", rtol=atol=1e-10)`` on the PF-ODE ``dx/dt = u(x, t)``
written in ``s = log t``;
on the Gaussian problem it is also compared with the exact map (the difference is reported).
Each solver gets the largest number of steps whose NFE stays within the budget; the NFE actually
used is in the table. SDE solvers solve a different problem (no pathwise ODE reference): they get
a weak-error table (error of the output's per-dimension std vs the exact marginal, Monte Carlo).
"""
import math
import time
from pathlib import Path

import torch

from adjointflow import (
    DDIM, DEIS, DPMSolverPP, BrownianNoise, Euler, EulerMaruyama, Heun, LinearFlow, SDEDPMSolverPP, VPLinear,
    solve, timesteps,
)
from adjointflow.testing import GaussianData, GaussianMixture

torch.set_num_threads(1)
F64 = torch.float64
BUDGETS = [5, 10, 20, 50]
RESULTS = Path(__file__).parent / "results"

SOLVERS = [
    ("Euler", Euler()),
    ("Heun", Heun()),
    ("DDIM", DDIM()),
    ("DPM++(2M)", DPMSolverPP(order=2)),
    ("DPM++(2M) heun", DPMSolverPP(order=2, solver_type="heun")),
    ("DPM++(3M)", DPMSolverPP(order=3)),
    ("DPM++(3M) diffusers warm-up", DPMSolverPP(order=3, warmup="multistep")),
    ("DPM++(2S)", DPMSolverPP(order=2, multistep=False)),
    ("DPM++(3S)", DPMSolverPP(order=3, multistep=False)),
    ("DEIS-2 tAB", DEIS(order=2)),
    ("DEIS-3 tAB", DEIS(order=3)),
    ("DEIS-2 rhoAB", DEIS(order=2, variant="rhoAB")),
    ("DEIS-3 rhoAB", DEIS(order=3, variant="rhoAB")),
]
SDE_SOLVERS = [("Euler-Maruyama", EulerMaruyama()), ("SDE-DPM++(1)", SDEDPMSolverPP(order=1)),
               ("SDE-DPM++(2M)", SDEDPMSolverPP(order=2))]


def problems():
    gauss = GaussianData(torch.linspace(-1.5, 2.0, 8, dtype=F64), torch.logspace(-1, 0.3, 8, dtype=F64))
    mix = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.3, 0.5, 0.2])
    g = torch.Generator().manual_seed(0)
    x8, x2 = torch.randn(256, 8, dtype=F64, generator=g), torch.randn(256, 2, dtype=F64, generator=g)
    vp, flow = VPLinear(), LinearFlow()
    return [
        ("gauss8-vp", gauss, gauss.denoiser(vp, "eps"), x8, lambda n: timesteps(vp, n, "logsnr", t_start=1.0, t_end=1e-3)),
        ("mix2-vp", mix, mix.denoiser(vp, "eps"), x2, lambda n: timesteps(vp, n, "logsnr", t_start=1.0, t_end=1e-3)),
        ("mix2-flow", mix, mix.denoiser(flow, "velocity"), x2,
         lambda n: timesteps(flow, n, "uniform", t_start=1.0, t_end=1e-3)),
    ]


def reference(den, x, t0, t1):
    """dopri5 on ``dx/ds = t u(x, t)`` with ``s = log t``: adaptive steps overshoot the end time and
    interpolate back, which in ``t`` would evaluate a VP model at t < 0; in ``s`` it stays at t > 0."""
    from torchdiffeq import odeint

    nfe = [0]

    def f(s, y):
        nfe[0] += 1
        t = torch.exp(s.to(F64))
        return t * den(y, t).velocity

    with torch.no_grad():
        s = torch.log(torch.tensor([t0, t1], dtype=F64))
        y = odeint(f, x, s, method="dopri5", rtol=1e-10, atol=1e-10)[-1]
    return y, nfe[0]


def within_budget(den, x, grid_fn, solver, budget):
    """The largest step count whose NFE is within ``budget``: (solution, nfe, steps)."""
    for steps in range(budget, 0, -1):
        with torch.no_grad():
            sol = solve(den, x, grid_fn(steps), solver)
        if sol.nfe <= budget:
            return sol, sol.nfe, steps
    raise RuntimeError("no step count fits the budget")


def rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


def best_time(fn, rounds=7):
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def sde_weak_errors():
    """Error of the output std vs the exact marginal std at t_end (max over dims), n = 20000, VPLinear."""
    d = GaussianData(torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.3, 1.2], dtype=F64))
    sch, n = VPLinear(), 20000
    rows = {}
    for name, solver in SDE_SOLVERS:
        errs = []
        for budget in BUDGETS:
            grid = timesteps(sch, budget, "logsnr", t_start=1.0, t_end=1e-3)
            x = d.prior_sample(sch, grid[0], n, generator=torch.Generator().manual_seed(budget))
            with torch.no_grad():
                out = solve(d.denoiser(sch, "eps"), x, grid, solver, noise=BrownianNoise(x.shape, seed=budget, dtype=F64)).x
                _, sd = d.marginal(sch, grid[-1], like=x)
            errs.append(float((out.std(0) - sd).abs().max()))
        rows[name] = errs
    return rows, 1.0 / math.sqrt(2 * n)  # standard error of a std estimate, relative


def write_results(table, ref_info, times, sde_rows, sde_se):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    lines = [
        "# Solvers: error vs NFE",
        "",
        "Command: `.venv/bin/python -m pytest benchmarks/test_bench_solvers.py --benchmark-only -o testpaths=benchmarks`",
        "(problem definitions in the module docstring). Each cell: RMS error of the final state vs the dopri5",
        "reference (rtol = atol = 1e-10); `(n)` marks a cell whose NFE is below the budget (a step of 2S/3S/Heun",
        "costs 2-3 NFE; 3M's singlestep warm-up adds one NFE). Float64, batch 256, CPU, one thread.",
        "",
    ]
    for pname, info in ref_info.items():
        lines.append(f"- `{pname}`: reference dopri5 used {info['nfe']} NFE" +
                     (f"; |dopri5 - exact map| = {info['exact_diff']:.1e} (RMS)" if "exact_diff" in info else ""))
    lines.append("")
    for pname, rows in table.items():
        lines += [f"## {pname}", "", "| solver | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |",
                  "|---|" + "---|" * len(BUDGETS)]
        for sname, cells in rows.items():
            txt = [f"{e:.2e}" + (f" ({n})" if n != b else "") for (e, n), b in zip(cells, BUDGETS)]
            lines.append(f"| {sname} | " + " | ".join(txt) + " |")
        lines.append("")
    flow = LinearFlow()
    g20 = timesteps(flow, 20, "uniform", t_start=1.0, t_end=1e-3)
    lam = flow.log_snr(g20)
    lines += [
        "Notes.",
        "",
        f"- `mix2-flow` uses a uniform t grid: at 20 steps its last step spans h = {float(lam[-1] - lam[-2]):.1f} in lambda",
        f"  after steps of {float(lam[-2] - lam[-3]):.2f} and {float(lam[-3] - lam[-4]):.2f}. Multistep methods that extrapolate in lambda",
        "  (DPM++ 2M/3M) are poor on such a step (their error at 20 NFE exceeds that at 10); diffusers lowers the",
        "  final order only below 15 steps (`lower_order_final`). DEIS-tAB interpolates in t and is unaffected;",
        "  log-SNR grids (`timesteps(..., 'logsnr', t_start=0.99)`) avoid the issue for flows.",
        "- DPM++(3M)'s default singlestep warm-up spends one NFE on a 2S first step, so at a fixed budget it takes",
        "  one step fewer than diffusers' first-order warm-up and is not better at these NFE; it keeps order 3",
        "  on fine grids (local orders 3.9/3.8 vs 4.2/2.0 between 128, 256, 512 steps, tests/test_exponential_solvers.py).",
        "",
    ]
    lines += ["## Time per solve (mix2-vp, NFE budget 20)", "",
              "Minimum of 7 interleaved rounds, as a ratio to DDIM measured in the same run (absolute seconds do",
              "not carry over between machines). The exact Gaussian-mixture denoiser is cheap, so this is the",
              "solvers' own overhead (coefficients in float64 Python scalars, DEIS-tAB's 16-point quadrature).", "",
              "| solver | NFE | time / DDIM |", "|---|---|---|"]
    for sname, (nfe, ratio) in times.items():
        lines.append(f"| {sname} | {nfe} | {ratio:.2f} |")
    lines += ["", "## SDE solvers: weak error (std of the output vs the exact marginal)", "",
              "GaussianData 2-D (mean (0.5, -1), std (0.3, 1.2)), VPLinear, exact prior samples at t = 1, uniform",
              f"log-SNR grid to 1e-3, n = 20000 per dimension (Monte-Carlo standard error of a std ~{sde_se:.1e} relative);",
              "max over dimensions of |std(output) - exact std|. Pathwise convergence is tested in",
              "`tests/test_exponential_solvers.py`.", "",
              "| solver | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    for sname, errs in sde_rows.items():
        lines.append(f"| {sname} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
    (RESULTS / "solvers.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, len(table), figsize=(5.0 * len(table) + 2.2, 4.6), sharey=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (pname, rows) in zip(axes, table.items()):
        for c, (sname, cells) in enumerate(rows.items()):
            nfe = [n for _, n in cells]
            err = [max(e, 1e-16) for e, _ in cells]
            ax.loglog(nfe, err, marker="o", ms=3, label=sname, color=colors[c % len(colors)],
                      ls="--" if "DEIS" in sname else ("-." if sname in ("Euler", "Heun") else "-"))
        ax.set_title(pname)
        ax.set_xlabel("NFE")
        ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("RMS error vs dopri5 reference")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(RESULTS / "solvers_error_vs_nfe.png", dpi=120)
    plt.close(fig)


def test_solvers_error_vs_nfe(benchmark):
    table, ref_info, times = {}, {}, {}
    probs = problems()
    for pname, data, den, x, grid_fn in probs:
        g = grid_fn(1)
        ref, ref_nfe = reference(den, x, float(g[0]), float(g[-1]))
        ref_info[pname] = {"nfe": ref_nfe}
        if isinstance(data, GaussianData):
            with torch.no_grad():
                ref_info[pname]["exact_diff"] = rms(ref, data.flow_map(den.schedule, x, g[0], g[-1]))
            assert ref_info[pname]["exact_diff"] < 1e-7
        rows = {}
        for sname, solver in SOLVERS:
            cells = []
            for budget in BUDGETS:
                sol, nfe, _ = within_budget(den, x, grid_fn, solver, budget)
                cells.append((rms(sol.x, ref), nfe))
            rows[sname] = cells
        table[pname] = rows

    # timing: mix2-vp at an NFE budget of 20, interleaved against DDIM
    _, _, den, x, grid_fn = probs[1]
    plans = {}
    for sname, solver in SOLVERS:
        _, nfe, steps = within_budget(den, x, grid_fn, solver, 20)
        plans[sname] = (solver, grid_fn(steps), nfe)
    best = {s: float("inf") for s in plans}
    with torch.no_grad():
        for _ in range(3):
            for sname, (solver, grid, _) in plans.items():
                best[sname] = min(best[sname], best_time(lambda: solve(den, x, grid, solver), rounds=3))
        times = {s: (plans[s][2], best[s] / best["DDIM"]) for s in plans}
        solver, grid, _ = plans["DPM++(2M)"]
        benchmark.pedantic(lambda: solve(den, x, grid, solver), rounds=5, iterations=1)

    sde_rows, sde_se = sde_weak_errors()
    benchmark.extra_info.update(nfe_budgets=BUDGETS)
    write_results(table, ref_info, times, sde_rows, sde_se)
    # sanity: the high-order exponential integrators beat DDIM at 20 NFE on the VP problems
    for pname in ("gauss8-vp", "mix2-vp"):
        assert table[pname]["DPM++(2M)"][2][0] < table[pname]["DDIM"][2][0]
