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
precomputed coefficients), cold (plan caches cleared before every call) and with ``check_finite=False``
(the hand loops check nothing; the default NaN/Inf check costs one reduction of the final state per solve,
see ``adjointflow/finite.py``). diffusers' loops call ``set_timesteps`` and ``step`` as its
pipelines do; ours run the same method on the scheduler's grid (diffusers' warm-up and final-step rules),
eager and with ``compile="solve"`` (the whole loop as one inductor graph, compiled in the warm-up call).
``OVERHEAD_ROUNDS`` overrides the number of rounds.
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
from adjointflow.integrations import diffusers_grids
from adjointflow.solvers.deis import deis_weights
from adjointflow.solvers.exponential import multistep_orders, phi

D, B, N = 64, 16, 20
ROUNDS = int(os.environ.get("OVERHEAD_ROUNDS", 21))


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
    """What a hand-written loop computes before it starts: schedule values at the grid as Python floats, and
    the static decisions of a multistep method (order of each step, warm-up starter), read off the grid."""

    def __init__(self, den, grid, solver, noise=None):
        self.den, self.sch, self.kind, self.noise = den, den.schedule, den.prediction, noise
        self.grid, self.t, self.solver = grid, grid.tolist(), solver
        self.p = self.points(grid)
        self.f, self.g2 = self.sch.f(grid).tolist(), self.sch.g2(grid).tolist()
        self.mids = {}
        self.plan = solver.plan(self.sch, grid)
        self.ks = multistep_orders(solver, self.plan) if hasattr(solver, "lower_order_final") else None

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


def hand_dpmpp_multistep(net, x, c):
    hist = []
    for i in range(N):
        s, t = c.p[i], c.p[i + 1]
        x0, eps = model(net, c.kind, x, s)
        k, starter = c.ks[i]
        h = t.lam - s.lam
        if starter:
            x = singlestep2(net, c, x, x0, eps, i, "x0")
        elif k == 1:
            x = first_order(x, x0, eps, s, t, "x0")
        else:
            r0 = (s.lam - c.p[i - 1].lam) / h
            d1_0 = (x0 - hist[0]) / r0
            base = first_order(x, x0, eps, s, t, "x0")
            if k == 2:
                x = base + (0.5 * -t.al * math.expm1(-h)) * d1_0
            else:
                r1 = (c.p[i - 1].lam - c.p[i - 2].lam) / h
                d2 = (d1_0 - (hist[0] - hist[1]) / r1) / (r0 + r1)
                x = base + (t.al * h * phi(2, -h)) * (d1_0 + r0 * d2) + (2 * t.al * h * phi(3, -h)) * d2
        hist = [x0, *hist][:2]
    return x


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


def make_deis(variant):
    def hand(net, x, c):
        if "deis" not in c.mids:  # quadrature weights of every step, computed once like the other coefficients
            c.mids["deis"] = [deis_weights(c.sch, c.grid, i, k, variant) if k > 1 and not st else [1.0]
                              for i, (k, st) in enumerate(c.ks)]
        w = c.mids["deis"]
        hist = []
        for i in range(N):
            s, t = c.p[i], c.p[i + 1]
            x0, eps = model(net, c.kind, x, s)
            k, starter = c.ks[i]
            if starter:
                x = singlestep2(net, c, x, x0, eps, i, "eps")
            elif k == 1:
                x = first_order(x, x0, eps, s, t, "eps")
            else:
                mix = w[i][0] * eps
                for wj, ej in zip(w[i][1:], hist):
                    mix = mix + wj * ej
                x = (t.al / s.al) * x + ((t.al / s.al) * s.si * math.expm1(-(t.lam - s.lam))) * mix
            hist = [eps, *hist][:2]
        return x

    return hand


def hand_unipc(net, x, c):
    """UniPC (data form, bh2) with the solver's per-step weights as Python floats (they solve a small linear
    system per step; a hand-written loop would hard-code the same numbers)."""
    if "unipc" not in c.mids:
        c.mids["unipc"] = [(r.first.form, r.first.a, r.first.b, r.w, r.kc, r.c_t, r.c) for r in c.plan.rows]
    hist = []
    for i, (form, fa, fb, w, kc, c_t, cw) in enumerate(c.mids["unipc"]):
        x0, eps = model(net, c.kind, x, c.p[i])
        if kc:
            x = x + c_t * (x0 - hist[0])
            for cm, mm in zip(cw, hist[1:]):
                x = x + cm * (mm - hist[0])
        x_next = fa * x + fb * x0 if form == "x0" else fa * x0 + fb * eps
        for wm, mm in zip(w, hist):
            x_next = x_next + wm * (mm - x0)
        hist = [x0, *hist][:3]
        x = x_next
    return x


def hand_em(net, x, c):
    for i in range(N):
        s, dt = c.p[i], c.t[i + 1] - c.t[i]
        eps = model(net, c.kind, x, s)[1]
        x = x + (c.f[i] * x + (c.g2[i] / s.si) * eps) * dt + math.sqrt(c.g2[i]) * c.noise(c.t[i], c.t[i + 1])
    return x


def hand_sde_dpmpp(net, x, c):
    prev = None
    for i in range(N):
        s, t = c.p[i], c.p[i + 1]
        x0 = model(net, c.kind, x, s)[0]
        h = t.lam - s.lam
        e2h = -math.expm1(-2 * h)
        x_next = (t.si / s.si * math.exp(-h)) * x + (t.al * e2h) * x0
        if c.ks[i][0] == 2:
            x_next = x_next + (0.5 * t.al * e2h) * ((x0 - prev) / ((s.lam - c.p[i - 1].lam) / h))
        z = c.noise(c.t[i], c.t[i + 1]) / math.sqrt(abs(c.t[i + 1] - c.t[i]))
        x = x_next + (t.si * math.sqrt(e2h)) * z
        prev = x0
    return x


#: (solver, hand-written loop, stochastic); a solver added later gets a row here
METHODS = {
    "Euler": (af.Euler(), hand_euler, False),
    "Heun": (af.Heun(), hand_heun, False),
    "DDIM": (af.DDIM(), hand_ddim, False),
    **{f"DEIS-{k} {v}": (af.DEIS(order=k, variant=v), make_deis(v), False)
       for v in ("tAB", "rhoAB", "logrho") for k in (1, 2, 3)},
    "DPM++(2M)": (af.DPMSolverPP(order=2), hand_dpmpp_multistep, False),
    "DPM++(3M)": (af.DPMSolverPP(order=3), hand_dpmpp_multistep, False),
    "DPM++(2S)": (af.DPMSolverPP(order=2, multistep=False), hand_dpmpp_2s, False),
    "DPM++(3S)": (af.DPMSolverPP(order=3, multistep=False), hand_dpmpp_3s, False),
    **{f"UniPC-{k}": (af.UniPC(order=k), hand_unipc, False) for k in (1, 2, 3)},
    "Euler-Maruyama": (af.EulerMaruyama(), hand_em, True),
    "SDE-DPM++(1)": (af.SDEDPMSolverPP(order=1), hand_sde_dpmpp, True),
    "SDE-DPM++(2M)": (af.SDEDPMSolverPP(order=2), hand_sde_dpmpp, True),
}


def perturbed(solver, seed=0, scale=0.05):
    """A learned solver away from its identity transform (what a trained one looks like to the loop); its node
    times stay uniform (``theta_t`` untouched), the grid of the flow problem."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in solver.named_parameters():
            if name != "theta_t":
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return solver


def bespoke_floats(c):
    """The learned solver's per-step coefficients as Python floats, read once before the loop (as a user would)."""
    if "bespoke" not in c.mids:
        co = c.solver.coefficients(c.grid[0], c.grid[-1], times=c.grid)
        c.mids["bespoke"] = {k: v.detach().tolist() for k, v in co.items()}
        if "t_mid" in co:
            c.mids["bespoke"]["p_mid"] = c.points(co["t_mid"].detach())
    return c.mids["bespoke"]


def velocity_net(net, x, p):
    return net(x, torch.full((x.shape[0],), p.tn, dtype=x.dtype))


def hand_bespoke_rk1(net, x, c):
    co = bespoke_floats(c)
    s, hsd, dt = co["s"], co["hsdot"], co["dt"]
    for i in range(N):
        x = torch.add(x * ((s[i] + hsd[i]) / s[i + 1]), velocity_net(net, x, c.p[i]), alpha=dt[i] * s[i] / s[i + 1])
    return x


def hand_bespoke_rk2(net, x, c):
    co = bespoke_floats(c)
    s, hsd, dt, sm, hsdm, dtm = co["s"], co["hsdot"], co["dt"], co["s_mid"], co["hsdot_mid"], co["dt_mid"]
    for i in range(N):
        z = torch.add(x * (s[i] + 0.5 * hsd[i]), velocity_net(net, x, c.p[i]), alpha=0.5 * dt[i] * s[i])
        u_m = velocity_net(net, z / sm[i], co["p_mid"][i])
        x = torch.add(x * (s[i] / s[i + 1]) + z * (hsdm[i] / (sm[i] * s[i + 1])), u_m, alpha=dtm[i] * sm[i] / s[i + 1])
    return x


def hand_bespoke_ns(net, x, c):
    co = bespoke_floats(c)
    a, b, us, p = co["a"], co["b"], [], x
    for k in range(N):
        us.append(velocity_net(net, p, c.p[k]))
        p = x * a[k]
        for j, u in enumerate(us):
            p = torch.add(p, u, alpha=b[k][j])
    return p


#: learned solvers, on the flow problem only (their grid is their own node times: uniform there)
BESPOKE = {
    "Bespoke RK1": (perturbed(af.BespokeSolver(N, "rk1")), hand_bespoke_rk1, False),
    "Bespoke RK2": (perturbed(af.BespokeSolver(N, "rk2")), hand_bespoke_rk2, False),
    "Bespoke NS": (perturbed(af.BespokeNSSolver(N)), hand_bespoke_ns, False),
}


# --- diffusers' scheduler loops --------------------------------------------------------------------------
def diffusers_cases(net):
    """(name, scheduler, our solver, our denoiser, our grid): the same method (diffusers' warm-up and final-step
    rules) on the scheduler's own grid."""
    import diffusers

    from adjointflow.integrations import timesteps_from_diffusers

    multistep = dict(lower_order_final=True, warmup="multistep")
    cases = []
    for name, sched, solver in (
        ("DDIM", diffusers.DDIMScheduler(clip_sample=False), af.DDIM()),
        ("DPM++(2M)", diffusers.DPMSolverMultistepScheduler(solver_order=2), af.DPMSolverPP(order=2, **multistep)),
        ("DPM++(3M)", diffusers.DPMSolverMultistepScheduler(solver_order=3), af.DPMSolverPP(order=3, **multistep)),
        ("DEIS-2 logrho", diffusers.DEISMultistepScheduler(solver_order=2), af.DEIS(order=2, variant="logrho", **multistep)),
        ("DEIS-3 logrho", diffusers.DEISMultistepScheduler(solver_order=3), af.DEIS(order=3, variant="logrho", **multistep)),
        *((f"UniPC-{k}", diffusers.UniPCMultistepScheduler(solver_order=k), af.UniPC(order=k, lower_order_final=True))
          for k in (1, 2, 3)),
    ):
        den = af.Denoiser.from_diffusers(net, sched)
        if type(sched).__name__ in diffusers_grids.SUPPORTED_SCHEDULERS:
            grid = timesteps_from_diffusers(sched, N)
        else:  # its timesteps k mapped to t = (k + 1)/T, then its final sigma (0 for UniPC, the table's first for DEIS)
            sched.set_timesteps(N)
            n_train = den.schedule.num_train_timesteps
            last = 0.0 if name.startswith("UniPC") else 1.0 / n_train
            grid = torch.cat([(sched.timesteps.double() + 1) / n_train, torch.tensor([last], dtype=torch.float64)])
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
        for mname, (solver, hand, sde) in [*METHODS.items(), *(BESPOKE.items() if pname == "flow" else ())]:
            noise = af.BrownianNoise((B, D), seed=1) if sde else None
            c = Hand(den, grid, solver, noise)
            fns[pname, mname, "hand"] = lambda hand=hand, c=c: hand(net, x, c)
            fns[pname, mname, "solve"] = lambda den=den, grid=grid, s=solver, nz=noise: af.solve(den, x, grid, s, noise=nz).x

            def cold(den=den, grid=grid, s=solver, nz=noise):
                cached, driver.bound_plan = driver.bound_plan, uncached  # plan and bind again, leave the caches
                try:
                    return af.solve(den, x, grid, s, noise=nz).x
                finally:
                    driver.bound_plan = cached

            fns[pname, mname, "cold"] = cold
            fns[pname, mname, "nocheck"] = lambda den=den, grid=grid, s=solver, nz=noise: af.solve(
                den, x, grid, s, noise=nz, check_finite=False).x
            with torch.no_grad():
                a, b = fns[pname, mname, "hand"](), fns[pname, mname, "solve"]()
            checks[pname, mname] = float((a - b).abs().max() / b.abs().max())
    for name, sched, solver, den, grid in diffusers_cases(net):
        fns["vpdiscrete", name, "diffusers"] = lambda sched=sched: diffusers_loop(net, sched, x)
        fns["vpdiscrete", name, "solve@diffusers"] = lambda den=den, grid=grid, s=solver: af.solve(den, x, grid, s).x
        fns["vpdiscrete", name, "whole@diffusers"] = lambda den=den, grid=grid, s=solver: af.solve(
            den, x, grid, s, compile="solve").x
        with torch.no_grad():
            a, b = fns["vpdiscrete", name, "diffusers"](), fns["vpdiscrete", name, "solve@diffusers"]()
            w = fns["vpdiscrete", name, "whole@diffusers"]()  # compiles the loop (outside the timed rounds)
        checks["diffusers", name] = float((a - b).abs().max() / a.abs().max())
        checks["whole", name] = float((w - b).abs().max() / b.abs().max())
    fns["vpdiscrete", "model calls", "hand"] = lambda: [net(x, torch.full((B,), 500.0)) for _ in range(N)]
    times = {k: [] for k in fns}
    load = [os.getloadavg()]
    with torch.no_grad():
        for f in fns.values():
            f()
        gc.collect()
        gc.freeze()  # what exists now (torch, diffusers, the plans) is never garbage: later collections skip it
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
    gc.unfreeze()
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
        "solve(check_finite=False) / hand | max rel. diff. hand vs solve |",
        "|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for (p, m, v) in [k for k in times if k[2] == "hand" and (k[1] in METHODS or k[1] in BESPOKE)]:
        warm, cold = ratio(times, (p, m, "solve"), (p, m, "hand")), ratio(times, (p, m, "cold"), (p, m, "hand"))
        worst = max(worst, warm)
        off = ratio(times, (p, m, "nocheck"), (p, m, "hand"))
        lines.append(f"| {p} | {m} | {statistics.median(times[p, m, 'hand']) * 1e3:.2f} | {warm:.3f} | {cold:.3f} | "
                     f"{off:.3f} | {checks[p, m]:.1e} |")
    lines += ["", "| vs diffusers (VPDiscrete, scheduler's grid) | diffusers loop (ms) | diffusers / hand loop "
              "(vpdiscrete row) | solve / diffusers | solve(compile=\"solve\") / diffusers | max rel. diff. diffusers "
              "vs solve | compiled vs eager solve |", "|---|---|---|---|---|---|---|"]
    dworst = 0.0
    for (p, m, v) in [k for k in times if k[2] == "diffusers"]:
        r = ratio(times, (p, m, "solve@diffusers"), (p, m, "diffusers"))
        dworst = max(dworst, r)
        lines.append(f"| {m} | {statistics.median(times[p, m, 'diffusers']) * 1e3:.2f} | "
                     f"{ratio(times, (p, m, 'diffusers'), (p, m, 'hand')):.3f} | {r:.3f} | "
                     f"{ratio(times, (p, m, 'whole@diffusers'), (p, m, 'diffusers')):.3f} | {checks['diffusers', m]:.1e} | "
                     f"{checks['whole', m]:.1e} |")
    mc = statistics.median(times["vpdiscrete", "model calls", "hand"]) * 1e3
    lines += ["", f"Model calls alone (20 network evaluations): {mc:.2f} ms. Worst solve/hand (plan cached): "
              f"{worst:.3f}; worst solve/diffusers: {dworst:.3f}."]
    text = "\n".join(lines) + "\n"
    out = Path(__file__).parent / "results" / "overhead.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print("\n" + text)
    benchmark.extra_info.update(worst_solve_over_hand=worst, worst_solve_over_diffusers=dworst)
    # the hand loops and diffusers' loops run the same methods; diffusers' DPM-Solver++(3M) weights D2 by
    # alpha_t (1/2 - phi_2(-h)) = alpha_t h phi_3(-h), half of the Taylor term 2 alpha_t h phi_3(-h) that ours uses
    # (same work per step, outputs 1e-3 apart)
    assert all(v < (1e-2 if k == ("diffusers", "DPM++(3M)") else 1e-3) for k, v in checks.items()), checks


def test_vs_diffusers_focused(benchmark):
    """Each diffusers method on its own: diffusers' loop, ``solve`` eager and ``solve(compile="solve")`` (and, for
    DDIM, the hand loop and the network calls alone) in rotation, 41 rounds. The working set is one method's, as
    when a user samples with one scheduler; in ``test_overhead_every_solver`` every call follows 300+ other
    variants, which costs most the code a variant has to itself (a compiled loop's generated kernels)."""
    from test_bench_gradients import round_robin

    torch.manual_seed(0)
    net = MLP().eval()
    x = torch.randn(B, D)
    rounds = int(os.environ.get("OVERHEAD_ROUNDS", 41))
    lines = [f"MLP 65-256-256-64 SiLU, state ({B}, {D}) float32, N = {N}, 1 thread; each method alone: its variants "
             f"round-robin, {rounds} rounds, process CPU time, medians of per-round ratios to diffusers' loop.", "",
             "| method | diffusers loop (ms) | solve / diffusers | solve(compile=\"solve\") / diffusers | hand loop / "
             "diffusers | network calls alone / diffusers | load average before / after |", "|---|---|---|---|---|---|---|"]
    for name, sched, solver, den, grid in diffusers_cases(net):
        variants = {"diffusers": lambda sched=sched: diffusers_loop(net, sched, x),
                    "solve": lambda den=den, grid=grid, s=solver: af.solve(den, x, grid, s).x,
                    "compiled": lambda den=den, grid=grid, s=solver: af.solve(den, x, grid, s, compile="solve").x}
        if name == "DDIM":
            c = Hand(den, grid, af.DDIM())
            variants["hand"] = lambda c=c: hand_ddim(net, x, c)
            variants["calls"] = lambda: [net(x, torch.full((B,), 500.0)) for _ in range(N)]
        with torch.no_grad():
            outs = {k: f() for k, f in variants.items() if k != "calls"}
            ref = outs["diffusers"]
            for k, out in outs.items():  # every variant runs the same method
                assert float((out - ref).abs().max() / ref.abs().max()) < (1e-2 if name == "DPM++(3M)" else 1e-3), (name, k)
            times, load = round_robin(variants, rounds)
        r = {k: ratio(times, k, "diffusers") for k in variants}
        lines.append(f"| {name} | {statistics.median(times['diffusers']) * 1e3:.2f} | {r['solve']:.3f} | "
                     f"{r['compiled']:.3f} | {r.get('hand', float('nan')):.3f} | {r.get('calls', float('nan')):.3f} | "
                     f"{load[0]:.1f} / {load[1]:.1f} |")
    text = "\n".join(lines).replace("| nan |", "| |").replace("| nan |", "| |") + "\n"
    (Path(__file__).parent / "results" / "vs_diffusers_focused.md").write_text(text)
    print("\n" + text)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
