"""Driver overhead: ``solve`` vs a hand-written loop of the same method, and vs diffusers' scheduler loops.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/test_bench_overhead.py --benchmark-only -s
-o testpaths=benchmarks`` (or ``make bench``). Writes ``benchmarks/results/overhead.md``.

Every solver family on three problems, MLP 65-256-256-64 SiLU, state (16, 64) float32, 1 torch thread,
N = 20 steps:

* ``vpdiscrete``: ``Denoiser.from_diffusers(net, DPMSolverMultistepScheduler())`` (VPDiscrete, eps, the
  model sees diffusers' timestep ``N t - 1``) on the scheduler's own 20-step grid
  (``timesteps_from_diffusers``, ending at ``t = 0``);
* ``vplinear``: ``Denoiser(net, VPLinear(), "eps")``, log-SNR grid from 1 to 1e-3;
* ``flow``: ``Denoiser(net, LinearFlow(), "velocity")``, uniform grid from 0.999 to 1e-3.

The hand-written loops are what a user writes for each method: per-step coefficients as Python floats
from the float64 schedule (``math``), computed once before the loop, the network called with
``torch.full`` times, the update in the paper's form; each is checked against ``solve`` before timing.
Timing: process CPU time (the machine is shared; CPU time is what the loop itself costs), every variant
round-robin in one process, ``ROUNDS`` rounds, medians of the per-round ratios; the load average is
recorded. ``solve`` runs warm (its plan cached, as in any repeated sampling, like the hand loop's
precomputed coefficients) and cold (plan caches cleared before every call). diffusers' loops call
``set_timesteps`` and ``step`` as its pipelines do.
"""
from __future__ import annotations

import gc
import math
import os
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

import adjointflow as af
from adjointflow import driver
from adjointflow.solvers.deis import deis_weights
from adjointflow.solvers.exponential import phi

D, B, N, ROUNDS = 64, 16, 20, 15


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D + 1, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, D))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], 1))


def problems(net):
    from diffusers import DPMSolverMultistepScheduler

    from adjointflow.integrations import timesteps_from_diffusers

    sched = DPMSolverMultistepScheduler()
    return {
        "vpdiscrete": (af.Denoiser.from_diffusers(net, sched), timesteps_from_diffusers(sched, N)),
        "vplinear": (af.Denoiser(net, af.VPLinear(), "eps"), af.timesteps(af.VPLinear(), N)),
        "flow": (af.Denoiser(net, af.LinearFlow(), "velocity"),
                 af.timesteps(af.LinearFlow(), N, "uniform", t_start=0.999)),
    }


# --- hand-written loops ----------------------------------------------------------------------------------
class Pt(NamedTuple):
    """Schedule values at one time, as a hand-written loop keeps them."""

    al: float
    si: float
    lam: float
    da: float
    ds: float
    tn: float  # the network's time input


class Hand:
    """Coefficients a hand-written loop computes before it starts (Python floats)."""

    def __init__(self, den, grid, noise=None):
        self.den, self.sch, self.kind, self.noise = den, den.schedule, den.prediction, noise
        self.t = grid.tolist()
        self.p = self.points(grid)
        self.f, self.g2 = self.sch.f(grid).tolist(), self.sch.g2(grid).tolist()
        self.mids = {}

    def points(self, t):
        sch = self.sch
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        la, ls = sch.log_alpha(t), sch.log_sigma(t)
        tn = self.den.net_time(t) if self.den.net_time is not None else t
        cols = (la.exp(), ls.exp(), la - ls, sch.dalpha_dt(t), sch.dsigma_dt(t), tn)
        return [Pt(*v) for v in zip(*(c.tolist() for c in cols))]

    def mid(self, i, r):
        """The point at lambda_i + r h_i and the actual r after the float64 round trip through t (computed on
        first use, then kept: after the warm-up call every coefficient is precomputed)."""
        key = (i, r)
        if key not in self.mids:
            s, e = self.p[i], self.p[i + 1]
            lam = torch.tensor(s.lam + r * (e.lam - s.lam), dtype=torch.float64)
            p = self.points(self.sch.t_from_log_snr(lam))[0]
            self.mids[key] = p, (p.lam - s.lam) / (e.lam - s.lam)
        return self.mids[key]


def model(net, kind, x, p):
    """(x0_hat, eps_hat) of the network at x, point p."""
    out = net(x, torch.full((x.shape[0],), p.tn, dtype=x.dtype))
    if kind == "eps":
        return (x - p.si * out) / p.al, out
    det = p.al * p.ds - p.si * p.da
    return (p.ds * x - p.si * out) / det, (p.al * out - p.da * x) / det


def first_order(x, x0, eps, s, t, form):
    """DDIM from point s to point t in the data or noise form (finite at sigma_t = 0)."""
    h = t.lam - s.lam
    if form == "x0":
        return (t.si / s.si) * x + (-t.al * math.expm1(-h)) * x0
    return (t.al / s.al) * x + ((t.al / s.al) * s.si * math.expm1(-h)) * eps


def hand_euler(net, x, c):
    for i in range(N):
        p = c.p[i]
        x0, eps = model(net, c.kind, x, p)
        x = x + (c.t[i + 1] - c.t[i]) * (p.da * x0 + p.ds * eps)
    return x


def hand_heun(net, x, c):
    for i in range(N):
        s, e, dt = c.p[i], c.p[i + 1], c.t[i + 1] - c.t[i]
        x0, eps = model(net, c.kind, x, s)
        u = s.da * x0 + s.ds * eps
        xe = x + dt * u
        if e.si == 0:  # infinite drift at sigma = 0: Euler
            x = xe
            continue
        x0, eps = model(net, c.kind, xe, e)
        x = x + (0.5 * dt) * (u + e.da * x0 + e.ds * eps)
    return x


def hand_ddim(net, x, c):
    for i in range(N):
        x0, eps = model(net, c.kind, x, c.p[i])
        x = first_order(x, x0, eps, c.p[i], c.p[i + 1], "eps")
    return x


def singlestep2(net, c, x, x0, eps, i, form):
    """DPM-Solver-2 / DPM-Solver++(2S), midpoint form."""
    s, t = c.p[i], c.p[i + 1]
    h = t.lam - s.lam
    p1, r1 = c.mid(i, 0.5)
    out = model(net, c.kind, first_order(x, x0, eps, s, p1, form), p1)
    if form == "x0":
        return first_order(x, x0, eps, s, t, form) + (0.5 / r1 * -t.al * math.expm1(-h)) * (out[0] - x0)
    return first_order(x, x0, eps, s, t, form) + (0.5 / r1 * (t.al / s.al) * s.si * math.expm1(-h)) * (out[1] - eps)


def make_dpmpp_multistep(order):
    def hand(net, x, c):
        hist = []
        for i in range(N):
            s, t = c.p[i], c.p[i + 1]
            x0, eps = model(net, c.kind, x, s)
            h = t.lam - s.lam
            if order == 3 and i == 0:
                x = singlestep2(net, c, x, x0, eps, i, "x0")
            elif not hist or not math.isfinite(h):
                x = first_order(x, x0, eps, s, t, "x0")
            else:
                d1_0 = (x0 - hist[0]) / ((s.lam - c.p[i - 1].lam) / h)
                base = first_order(x, x0, eps, s, t, "x0")
                if order == 2 or len(hist) < 2:
                    x = base + (0.5 * -t.al * math.expm1(-h)) * d1_0
                else:
                    r0, r1 = (s.lam - c.p[i - 1].lam) / h, (c.p[i - 1].lam - c.p[i - 2].lam) / h
                    d2 = (d1_0 - (hist[0] - hist[1]) / r1) / (r0 + r1)
                    x = base + (t.al * h * phi(2, -h)) * (d1_0 + r0 * d2) + (2 * t.al * h * phi(3, -h)) * d2
            hist = [x0, *hist][: order - 1]
        return x

    return hand


def hand_dpmpp_2s(net, x, c):
    for i in range(N):
        x0, eps = model(net, c.kind, x, c.p[i])
        finite = math.isfinite(c.p[i + 1].lam - c.p[i].lam)
        x = singlestep2(net, c, x, x0, eps, i, "x0") if finite else first_order(x, x0, eps, c.p[i], c.p[i + 1], "x0")
    return x


def hand_dpmpp_3s(net, x, c):
    for i in range(N):
        s, t = c.p[i], c.p[i + 1]
        x0, eps = model(net, c.kind, x, s)
        h = t.lam - s.lam
        if not math.isfinite(h):
            x = first_order(x, x0, eps, s, t, "x0")
            continue
        p1, r1 = c.mid(i, 1 / 3)
        p2, r2 = c.mid(i, 2 / 3)
        m1 = model(net, c.kind, first_order(x, x0, eps, s, p1, "x0"), p1)[0]
        h2 = p2.lam - s.lam
        u2 = first_order(x, x0, eps, s, p2, "x0") + (r2 / r1 * p2.al * h2 * phi(2, -h2)) * (m1 - x0)
        m2 = model(net, c.kind, u2, p2)[0]
        x = first_order(x, x0, eps, s, t, "x0") + (t.al * h * phi(2, -h) / r2) * (m2 - x0)
    return x


def make_deis(order):
    def hand(net, x, c):
        if ("deis", order) not in c.mids:  # quadrature weights of every step, computed once like the other coefficients
            grid = torch.tensor(c.t, dtype=torch.float64)
            ks = [1 if not math.isfinite(c.p[i + 1].lam - c.p[i].lam) else min(order, i + 1) for i in range(N)]
            c.mids["deis", order] = ks, [deis_weights(c.sch, grid, i, k, "tAB") if k > 1 else [1.0]
                                         for i, k in enumerate(ks)]
        ks, w = c.mids["deis", order]
        hist = []
        for i in range(N):
            s, t = c.p[i], c.p[i + 1]
            x0, eps = model(net, c.kind, x, s)
            if order == 3 and i == 0:
                x = singlestep2(net, c, x, x0, eps, i, "eps")
            elif ks[i] == 1:
                x = first_order(x, x0, eps, s, t, "eps")
            else:
                mix = w[i][0] * eps
                for wj, ej in zip(w[i][1:], hist):
                    mix = mix + wj * ej
                x = (t.al / s.al) * x + ((t.al / s.al) * s.si * math.expm1(-(t.lam - s.lam))) * mix
            hist = [eps, *hist][: order - 1]
        return x

    return hand


def hand_em(net, x, c):
    for i in range(N):
        s, dt = c.p[i], c.t[i + 1] - c.t[i]
        eps = model(net, c.kind, x, s)[1]
        x = x + (c.f[i] * x + (c.g2[i] / s.si) * eps) * dt + math.sqrt(c.g2[i]) * c.noise(c.t[i], c.t[i + 1])
    return x


def make_sde_dpmpp(order):
    def hand(net, x, c):
        prev = None
        for i in range(N):
            s, t = c.p[i], c.p[i + 1]
            x0 = model(net, c.kind, x, s)[0]
            h = t.lam - s.lam
            e2h = -math.expm1(-2 * h)
            x_next = (t.si / s.si * math.exp(-h)) * x + (t.al * e2h) * x0
            if order == 2 and prev is not None and math.isfinite(h):
                x_next = x_next + (0.5 * t.al * e2h) * ((x0 - prev) / ((s.lam - c.p[i - 1].lam) / h))
            z = c.noise(c.t[i], c.t[i + 1]) / math.sqrt(abs(c.t[i + 1] - c.t[i]))
            x = x_next + (t.si * math.sqrt(e2h)) * z
            prev = x0
        return x

    return hand


#: (solver, hand-written loop, stochastic); i11's solvers add their rows here
METHODS = {
    "Euler": (af.Euler(), hand_euler, False),
    "Heun": (af.Heun(), hand_heun, False),
    "DDIM": (af.DDIM(), hand_ddim, False),
    "DEIS-1": (af.DEIS(order=1), make_deis(1), False),
    "DEIS-2": (af.DEIS(order=2), make_deis(2), False),
    "DEIS-3": (af.DEIS(order=3), make_deis(3), False),
    "DPM++(2M)": (af.DPMSolverPP(order=2), make_dpmpp_multistep(2), False),
    "DPM++(3M)": (af.DPMSolverPP(order=3), make_dpmpp_multistep(3), False),
    "DPM++(2S)": (af.DPMSolverPP(order=2, multistep=False), hand_dpmpp_2s, False),
    "DPM++(3S)": (af.DPMSolverPP(order=3, multistep=False), hand_dpmpp_3s, False),
    "Euler-Maruyama": (af.EulerMaruyama(), hand_em, True),
    "SDE-DPM++(1)": (af.SDEDPMSolverPP(order=1), make_sde_dpmpp(1), True),
    "SDE-DPM++(2M)": (af.SDEDPMSolverPP(order=2), make_sde_dpmpp(2), True),
}


# --- diffusers' scheduler loops --------------------------------------------------------------------------
def diffusers_cases(net):
    """(name, scheduler, our solver, our denoiser, our grid): the same method on the scheduler's grid."""
    import diffusers

    from adjointflow.integrations import timesteps_from_diffusers

    cases = []
    for name, sched, solver in (
        ("DDIM", diffusers.DDIMScheduler(), af.DDIM()),
        ("DPM++(2M)", diffusers.DPMSolverMultistepScheduler(solver_order=2), af.DPMSolverPP(order=2)),
        ("DPM++(3M)", diffusers.DPMSolverMultistepScheduler(solver_order=3), af.DPMSolverPP(order=3)),
        ("DEIS-2", diffusers.DEISMultistepScheduler(solver_order=2), af.DEIS(order=2)),
        ("DEIS-3", diffusers.DEISMultistepScheduler(solver_order=3), af.DEIS(order=3)),
    ):
        den = af.Denoiser.from_diffusers(net, sched)
        if name.startswith("DEIS"):  # not in timesteps_from_diffusers: its timesteps, then the table's first entry
            sched.set_timesteps(N)
            n_train = den.schedule.num_train_timesteps
            grid = torch.cat([(sched.timesteps.double() + 1) / n_train, torch.tensor([1.0 / n_train], dtype=torch.float64)])
        else:
            grid = timesteps_from_diffusers(sched, N)
        cases.append((name, sched, solver, den, grid))
    return cases


def diffusers_loop(net, sched, x):
    sched.set_timesteps(N)
    for k in sched.timesteps:
        x = sched.step(net(x, k.expand(x.shape[0]).to(x.dtype)), k, x).prev_sample
    return x


# --- the measurement -------------------------------------------------------------------------------------
def uncached(solver, den, grid, x):
    return solver.plan(den.schedule, grid).bind(den, x)


def measure(rounds=ROUNDS):
    torch.manual_seed(0)
    net = MLP().eval()
    x = torch.randn(B, D)
    fns, checks = {}, {}
    for pname, (den, grid) in problems(net).items():
        for mname, (solver, hand, sde) in METHODS.items():
            noise = af.BrownianNoise((B, D), seed=1) if sde else None
            c = Hand(den, grid, noise)
            fns[pname, mname, "hand"] = lambda hand=hand, c=c: hand(net, x, c)
            fns[pname, mname, "solve"] = lambda den=den, grid=grid, s=solver, nz=noise: af.solve(den, x, grid, s, noise=nz).x

            def cold(den=den, grid=grid, s=solver, nz=noise):
                cached, driver.bound_plan = driver.bound_plan, uncached  # plan and bind again, leave the caches
                try:
                    return af.solve(den, x, grid, s, noise=nz).x
                finally:
                    driver.bound_plan = cached

            fns[pname, mname, "cold"] = cold
            with torch.no_grad():
                a, b = fns[pname, mname, "hand"](), fns[pname, mname, "solve"]()
            checks[pname, mname] = float((a - b).abs().max() / b.abs().max())
    for name, sched, solver, den, grid in diffusers_cases(net):
        fns["vpdiscrete", name, "diffusers"] = lambda sched=sched: diffusers_loop(net, sched, x)
        fns["vpdiscrete", name, "solve@diffusers"] = lambda den=den, grid=grid, s=solver: af.solve(den, x, grid, s).x
    fns["vpdiscrete", "model calls", "hand"] = lambda: [net(x, torch.full((B,), 500.0)) for _ in range(N)]
    times = {k: [] for k in fns}
    load = [os.getloadavg()]
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                gc.collect()
                gc.disable()  # as timeit does: a collection triggered by one variant must not land in another's time
                try:
                    t0 = time.process_time()
                    f()
                    times[k].append(time.process_time() - t0)
                finally:
                    gc.enable()
    load.append(os.getloadavg())
    return times, checks, load


def ratio(times, a, b):
    return statistics.median([x / y for x, y in zip(times[a], times[b])])


def test_overhead_every_solver(benchmark):
    times, checks, load = measure()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    lines = [
        f"MLP 65-256-256-64 SiLU, state ({B}, {D}) float32, N = {N}, 1 thread; process CPU time, {ROUNDS} "
        f"round-robin rounds, medians of per-round ratios. Load average before/after: "
        f"{load[0][0]:.1f} / {load[1][0]:.1f}.",
        "",
        "| problem | solver | hand loop (ms) | solve / hand (plan cached) | solve / hand (cold plan) | "
        "max rel. diff. hand vs solve |",
        "|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for (p, m, v) in [k for k in times if k[2] == "hand" and k[1] in METHODS]:
        warm, cold = ratio(times, (p, m, "solve"), (p, m, "hand")), ratio(times, (p, m, "cold"), (p, m, "hand"))
        worst = max(worst, warm)
        lines.append(f"| {p} | {m} | {statistics.median(times[p, m, 'hand']) * 1e3:.2f} | {warm:.3f} | {cold:.3f} | "
                     f"{checks[p, m]:.1e} |")
    lines += ["", "| vs diffusers (VPDiscrete, scheduler's grid) | diffusers loop (ms) | diffusers / hand | "
              "solve / diffusers |", "|---|---|---|---|"]
    dworst = 0.0
    for (p, m, v) in [k for k in times if k[2] == "diffusers"]:
        r = ratio(times, (p, m, "solve@diffusers"), (p, m, "diffusers"))
        dworst = max(dworst, r)
        lines.append(f"| {m} | {statistics.median(times[p, m, 'diffusers']) * 1e3:.2f} | "
                     f"{ratio(times, (p, m, 'diffusers'), (p, m, 'hand')) if (p, m, 'hand') in times else float('nan'):.3f} | "
                     f"{r:.3f} |")
    mc = statistics.median(times["vpdiscrete", "model calls", "hand"]) * 1e3
    lines += ["", f"Model calls alone (20 network evaluations): {mc:.2f} ms. Worst solve/hand (plan cached): "
              f"{worst:.3f}; worst solve/diffusers: {dworst:.3f}."]
    text = "\n".join(lines) + "\n"
    out = Path(__file__).parent / "results" / "overhead.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print("\n" + text)
    benchmark.extra_info.update(worst_solve_over_hand=worst, worst_solve_over_diffusers=dworst)
    assert all(v < 1e-3 for v in checks.values()), checks  # the hand loops are the same methods
