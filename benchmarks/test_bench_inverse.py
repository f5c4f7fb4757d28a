"""Inverse problems on the bundled digits model, every method at equal NFE budgets, tuned honestly.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/test_bench_inverse.py --benchmark-only -s``
(or ``make bench``). Writes ``benchmarks/results/inverse.md`` (and the raw figures to ``inverse.json``).

* Data: the digits test split (never seen in training). The *test* digits are the demo's 10 held-out
  digits (the first of each class, the digits the issue's deepinv figures were measured on) and the next
  20 in the same class rotation; the *validation* digits are 20 others of the test split, disjoint from
  them. Every setting below was chosen on validation only; the table reports the test digits.
* Tasks: inpainting of the central 8x8 box, 2x average-pool super-resolution, Gaussian deblurring
  (std 2 px, 13 taps, circular); Gaussian measurement noise ``sigma_y = 0.05`` (pixels in [-1, 1]).
* Budgets: 50 and 100 network evaluations (NFE) per image; a method runs with the largest
  configuration that fits (a VJP through the network is not counted as an NFE; the VJP column says
  which methods pay one per step). "xK" methods average K independent samples (K times the NFE).
  "mean" methods return the clean estimate at a noise level ``stop`` instead of a sample
  (posterior-mean output, ``adjointflow/guidance/stepwise.py``).
* Noise draws: 3 (measurement noise, start latents and sampler noise all change); figures are the
  PSNR (dB, estimate clamped to [-1, 1]) averaged over the digits, mean +- std over the draws.
* Classical baselines (0 NFE): harmonic fill (Laplace equation in the hole), bicubic upsampling,
  Wiener deconvolution (noise-to-signal ratio tuned on validation).
* deepinv (optional, only where it is importable): its DPS, DDRM and DiffPIR driven by the same model
  wrapped as its ``D(x, sigma)`` denoiser, tuned on the same validation digits.

``INVERSE_ONLY="DPS,deepinv DPS"`` reruns only those method families (same data and seeds) and merges them
into the existing ``inverse.json``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import adjointflow as af
from adjointflow.demo.digits import load_digits_tensor
from adjointflow.demo.report import psnr
from adjointflow.guidance import (DDRM, DPS, DiffPIR, Downsample, FlowChef, FlowDPS, GaussianBlur, Inpaint, LanPaint,
                                  MeasurementLoss, PiGDM)
from adjointflow.solvers import Euler, SDEDPMSolverPP

SIGMA_Y = 0.05
DRAWS = 3
BUDGETS = (50, 100)
OUT = Path(__file__).parent / "results"


# --- data ------------------------------------------------------------------------------------
def class_rotation(labels: torch.Tensor, n: int, skip=()) -> list[int]:
    """Indices of the first unused image of class 0, 1, ..., 9, then the second of each, ... (n in all)."""
    used, out = set(skip), []
    pools = [[i for i in (labels == c).nonzero().flatten().tolist() if i not in used] for c in range(10)]
    for rnd in itertools.count():
        for c in range(10):
            if len(out) == n:
                return out
            if rnd < len(pools[c]):
                out.append(pools[c][rnd])


def splits():
    x, labels = load_digits_tensor("test")
    test = class_rotation(labels, 30)           # the first 10 are the demo's digits
    val = class_rotation(labels, 20, skip=test)
    assert not set(test) & set(val)
    return x[val], x[test]


def tasks():
    mask = torch.ones(16, 16)
    mask[4:12, 4:12] = 0
    return {"inpainting (8x8 box)": Inpaint(mask), "2x super-resolution": Downsample(2),
            "Gaussian deblurring (2 px)": GaussianBlur(sigma=2.0, size=13)}


@dataclasses.dataclass
class Problem:
    truth: torch.Tensor     # (draws * n, 1, 16, 16): the digits repeated once per draw
    y: torch.Tensor
    z: torch.Tensor         # start latents
    op: object
    draws: int

    @property
    def objective(self):
        return MeasurementLoss(self.op, self.y, SIGMA_Y)

    def psnr_per_draw(self, x, first=None):
        """PSNR averaged over the digits of each draw (only the first ``first`` digits of each, if given)."""
        n = self.truth.shape[0] // self.draws
        m = n if first is None else first
        return [psnr(x[k * n:k * n + m], self.truth[k * n:k * n + m]) for k in range(self.draws)]


def problem(images, op, draws, seed):
    truth = images.repeat(draws, 1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    ax = op(truth)
    y = ax + SIGMA_Y * torch.randn(ax.shape, generator=g)
    z = torch.randn(truth.shape, generator=g)
    return Problem(truth, y, z, op, draws)


# --- classical baselines (0 NFE) ----------------------------------------------------------------
def harmonic_fill(y, mask, iters=2000):
    """Solve Laplace's equation in the hole with the measured pixels as boundary values (Jacobi)."""
    x = y.clone()
    hole = mask == 0
    x[..., hole] = y[..., ~hole].mean()
    for _ in range(iters):
        p = F.pad(x, (1, 1, 1, 1), mode="replicate")
        avg = (p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]) / 4
        x = torch.where(hole, avg, y)
    return x


def bicubic(y):
    return F.interpolate(y, scale_factor=2, mode="bicubic", align_corners=False)


def wiener(op, y, nsr):
    K = op.transfer(tuple(y.shape[-2:]), y.dtype)
    return op._apply(y, K / (K * K + nsr))


def denoiser_reference(den, prob: Problem, rho):
    """The model's own MMSE estimate from ``x + rho n`` (every pixel, not only the measured directions):
    for 2x average pooling with sigma_y = 0.05 the measured block means carry noise of exactly this
    level (rho = sigma_y / s = 0.1), so this observation holds strictly more information than the
    measurement, and no sampler built on the same model should be expected to beat it."""
    g = torch.Generator().manual_seed(12345)
    t = torch.tensor(rho / (1 + rho), dtype=torch.float64)
    noisy = prob.truth + rho * torch.randn(prob.truth.shape, generator=g)
    with torch.no_grad():
        return den((1 - t).to(noisy.dtype) * noisy, t).x0


def classical(name, op, prob: Problem, val: Problem | None = None):
    if isinstance(op, Inpaint):
        return "harmonic fill", harmonic_fill(prob.y, op.mask.float())
    if isinstance(op, Downsample):
        return "bicubic", bicubic(prob.y)
    grid = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    nsr = max(grid, key=lambda v: sum(val.psnr_per_draw(wiener(op, val.y, v))))
    return f"Wiener (NSR {nsr:g}, tuned)", wiener(op, prob.y, nsr)


# --- our methods: candidate settings per budget --------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Averaged:
    """``k`` independent runs of ``method`` (different latents and seeds) averaged: a posterior-mean
    estimate at ``k`` times the method's NFE."""

    method: object
    k: int

    def run(self, den, objective, z):
        outs, nfe, vjps = [], 0, 0
        for j in range(self.k):
            m = self.method
            if hasattr(m, "seed"):
                m = dataclasses.replace(m, seed=m.seed + 101 * j)
            zj = z if j == 0 else torch.randn(z.shape, generator=torch.Generator().manual_seed(977 + j))
            r = m.run(den, objective, zj)
            outs.append(r.x.clamp(-1, 1))
            nfe, vjps = nfe + r.nfe, vjps + r.vjps
        return dataclasses.replace(r, x=torch.stack(outs).mean(0), nfe=nfe, vjps=vjps)


def lanpaint_steps(budget, k, t_star):
    """ODE steps N with N + k * (pinned steps) <= budget on a uniform flow grid (pinned: t >= t*)."""
    n = budget
    while n > 1 and n + k * math.ceil(n * (1 - t_star)) + k > budget:
        n -= 1
    return n


def candidates(op, budget):
    """Family -> list of (settings text, method) fitting ``budget`` NFE per image."""
    sde1, sde2 = SDEDPMSolverPP(order=1), SDEDPMSolverPP(order=2)
    quiet = dict(progress=False)
    out = {
        "DPS": [(f"{s}, scale={c}", DPS(solver=v, steps=budget, scale=c, **quiet))
                for (s, v), c in itertools.product((("Euler", Euler()), ("SDE-DPM++1", sde1), ("SDE-DPM++2", sde2)),
                                                   (0.5, 0.75, 1.0, 1.25, 1.5, 2.0))],
        "FlowChef": [(f"lr={lr}", FlowChef(steps=budget, lr=lr, **quiet)) for lr in (0.02, 0.05, 0.1)],
        "PiGDM": [(f"eta={e}, scale={c}", PiGDM(steps=budget, eta=e, scale=c, **quiet))
                  for e, c in itertools.product((0.5, 1.0), (0.5, 1.0))],
        "DDRM": [(f"eta={e}", DDRM(steps=budget, eta=e, **quiet)) for e in (0.0, 0.3, 0.6, 0.85)],
        "DiffPIR": [(f"lam={lam}, zeta={z}", DiffPIR(steps=budget, lam=lam, zeta=z, **quiet))
                    for lam, z in itertools.product((1.0, 7.0, 25.0), (0.1, 0.3, 1.0))],
        "FlowDPS": [(f"lr={lr}, iterations={k}, stochasticity={s}", FlowDPS(steps=budget, lr=lr, iterations=k,
                                                                              stochasticity=s, **quiet))
                    for lr, k, s in itertools.product((3.0, 10.0, 20.0), (1, 3), (0.5, 1.0))],
    }

    def averaged(family, k, keep=lambda m: True):
        return [(f"{t}, {budget // k} steps x{k}", Averaged(dataclasses.replace(m, steps=budget // k), k))
                for t, m in out[family] if keep(m)]

    stochastic = lambda m: m.solver.stochastic  # noqa: E731
    out["DPS x2"] = averaged("DPS", 2, stochastic)
    out["DPS x4"] = averaged("DPS", 4, lambda m: stochastic(m) and m.solver.order == 1 and m.scale >= 1)
    out["PiGDM x2"] = averaged("PiGDM", 2, lambda m: m.eta == 1.0)
    out["DDRM x2"] = averaged("DDRM", 2)
    out["FlowDPS x2"] = averaged("FlowDPS", 2, lambda m: m.stochasticity == 1.0)
    if op.has_svd:
        s_max = float(op.singular_values(torch.zeros(1, 1, 16, 16)).max())
        t_star = (SIGMA_Y / s_max) / (1 + SIGMA_Y / s_max)
        # posterior-mean output: the clean estimate at the level where the measurement is exact (stop)
        out["DDRM mean"] = [(f"eta={e}, stop={f:g} sigma_y/s_max", DDRM(steps=budget, eta=e, stop=f * SIGMA_Y / s_max,
                                                                         **quiet))
                            for e, f in itertools.product((0.5, 0.85, 1.0), (1.0, 1.25))]
        for k in (2, 4):
            out[f"DDRM mean x{k}"] = averaged("DDRM mean", k)
        out["LanPaint"] = [(f"steps={lanpaint_steps(budget, k, t_star)}, langevin_steps={k}, step_size={ss}",
                            LanPaint(steps=lanpaint_steps(budget, k, t_star), langevin_steps=k, step_size=ss, **quiet))
                           for k, ss in itertools.product((1, 2, 4), (0.3, 0.8))]
    return out


DEMO_DIGITS = 10  # the first 10 test digits are the demo's (the deepinv figures were measured on them)


def evaluate(den, method, prob: Problem, demo=False):
    torch.manual_seed(0)  # the default noise of SDE solvers is seeded from torch's generator
    t0 = time.perf_counter()
    res = method.run(den, prob.objective, prob.z.clone())
    sec = time.perf_counter() - t0
    if demo:
        return prob.psnr_per_draw(res.x), res.nfe, res.vjps, sec, prob.psnr_per_draw(res.x, DEMO_DIGITS)
    return prob.psnr_per_draw(res.x), res.nfe, res.vjps, sec


def selected(family):
    only = os.environ.get("INVERSE_ONLY")
    return not only or family in [f.strip() for f in only.split(",")]


def run_ours(den, name, op, val: Problem, test: Problem, log):
    rows = []
    for budget in BUDGETS:
        for family, cands in candidates(op, budget).items():
            if not selected(family):
                continue
            scored = []
            for text, method in cands:
                try:
                    p, nfe, _, _ = evaluate(den, method, val)
                except Exception as exc:  # a setting that diverges on validation is simply not chosen
                    log(f"  [val] {name} {family} {text}: failed ({type(exc).__name__})")
                    continue
                assert nfe <= budget, (family, text, nfe)
                scored.append((sum(p) / len(p), text, method))
                log(f"  [val] {name} @{budget} {family} {text}: {scored[-1][0]:.2f}")
            if not scored:
                continue
            _, text, method = max(scored, key=lambda s: s[0])
            p, nfe, vjps, sec, p10 = evaluate(den, method, test, demo=True)
            rows.append(dict(task=name, budget=budget, method=family, settings=text, nfe=nfe, vjps=vjps,
                             psnr=p, psnr_demo=p10, seconds=sec))
            log(f"[test] {name} @{budget} {family} ({text}): {mean(p):.2f} +- {std(p):.2f}")
    return rows


def mean(v):
    return sum(v) / len(v)


def std(v):
    m = mean(v)
    return math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1))


# --- deepinv side by side (optional) --------------------------------------------------------------
def deepinv_available():
    import importlib.util

    return importlib.util.find_spec("deepinv") is not None


def deepinv_candidates(den, op, budget):
    """deepinv's DPS, DDRM and DiffPIR at ``budget`` denoiser calls, on its [0, 1] image convention:
    ``u = (x + 1) / 2``, ``y_u = (y + A 1) / 2`` with noise ``sigma_y / 2``, and our model as ``D(u, sigma)``
    (``x + 2 sigma n`` is the flow state at ``t = rho / (1 + rho)``, ``rho = 2 sigma``, divided by ``1 - t``)."""
    import numpy as np
    import deepinv as dinv

    class Wrapped(dinv.models.Denoiser):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, u, sigma, **kw):
            self.calls += 1
            rho = 2.0 * torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
            assert bool((rho == rho[0]).all()), "one noise level per call"
            t = rho[0] / (1.0 + rho[0])
            x0 = den((1.0 - t).to(u.dtype) * (2.0 * u - 1.0), t).x0
            return (x0 + 1.0) / 2.0

    def physics():
        s = op.singular_values(torch.zeros(1, 1, 16, 16)).unsqueeze(0)
        return dinv.physics.DecomposablePhysics(U=op.svd_u, U_adjoint=op.svd_ut, V=op.svd_v, V_adjoint=op.svd_vt,
                                                mask=s, noise_model=dinv.physics.GaussianNoise(sigma=SIGMA_Y / 2))

    def runner(make):
        def run(prob: Problem):
            D = Wrapped()
            y_u = (prob.y + op(torch.ones_like(prob.truth))) / 2.0
            torch.manual_seed(0)
            u = make(D)(y_u, physics())
            return 2.0 * u.detach() - 1.0, D.calls
        return run

    out = {
        "deepinv DPS": [(f"weight={w}", runner(lambda D, w=w: dinv.sampling.DPS(D, num_steps=budget, weight=w)))
                        for w in (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)],
        "deepinv DDRM": [(f"eta={e}, sigmas=linspace({m}, 0, {budget})",
                          runner(lambda D, e=e, m=m: dinv.sampling.DDRM(D, sigmas=np.linspace(m, 0, budget), eta=e)))
                         for e, m in itertools.product((0.0, 0.5, 0.85, 1.0), (1.0, 2.0))],
        "deepinv DiffPIR": [(f"lambda={lam}, zeta={z}",
                             runner(lambda D, lam=lam, z=z: dinv.sampling.DiffPIR(
                                 D, dinv.optim.data_fidelity.L2(), sigma=SIGMA_Y / 2, max_iter=budget, zeta=z,
                                 lambda_=lam)))
                            for lam, z in itertools.product((1.0, 7.0, 25.0), (0.1, 0.3, 1.0))],
    }
    return out


def run_deepinv(den, name, op, val: Problem, test: Problem, log):
    rows = []
    for budget in BUDGETS:
        for family, cands in deepinv_candidates(den, op, budget).items():
            if not selected(family):
                continue
            scored = []
            for text, run in cands:
                try:
                    with torch.no_grad() if "DPS" not in family else torch.enable_grad():
                        x, calls = run(val)
                    p = val.psnr_per_draw(x)
                except Exception as exc:
                    log(f"  [val] {name} {family} {text}: failed ({type(exc).__name__}: {exc})")
                    continue
                assert calls <= budget, (family, text, calls)
                scored.append((mean(p), text, run))
                log(f"  [val] {name} @{budget} {family} {text}: {scored[-1][0]:.2f}")
            if not scored:
                continue
            _, text, run = max(scored, key=lambda s: s[0])
            t0 = time.perf_counter()
            with torch.no_grad() if "DPS" not in family else torch.enable_grad():
                x, calls = run(test)
            p = test.psnr_per_draw(x)
            rows.append(dict(task=name, budget=budget, method=family, settings=text, nfe=calls,
                             vjps=calls if "DPS" in family else 0, psnr=p, psnr_demo=test.psnr_per_draw(x, DEMO_DIGITS),
                             seconds=time.perf_counter() - t0))
            log(f"[test] {name} @{budget} {family} ({text}): {mean(p):.2f} +- {std(p):.2f}")
    return rows


# --- report ----------------------------------------------------------------------------------------
def table(rows, classical_rows, n_test):
    lines = []
    for name in tasks():
        lines += [f"### {name}", "", "| method | NFE budget 50 | NFE budget 100 | settings @50 / @100 (chosen on validation) "
                                     "| VJPs @100 |", "|---|---|---|---|---|"]
        for c in classical_rows:
            if c["task"] == name:
                lines.append(f"| {c['method']} | {fmt(c['psnr'])} | {fmt(c['psnr'])} | {c.get('cost', '0 NFE')} | 0 |")
        fams = dict.fromkeys(r["method"] for r in rows if r["task"] == name)
        best = {b: max((r for r in rows if r["task"] == name and r["budget"] == b), key=lambda r: mean(r["psnr"]))
                for b in BUDGETS}
        for fam in fams:
            by = {r["budget"]: r for r in rows if r["task"] == name and r["method"] == fam}
            cells = []
            for b in BUDGETS:
                r = by.get(b)
                cells.append("—" if r is None else (f"**{fmt(r['psnr'])}**" if r is best[b] else fmt(r["psnr"])))
            sets = " / ".join(by[b]["settings"] if b in by else "—" for b in BUDGETS)
            vj = by[BUDGETS[-1]]["vjps"] if BUDGETS[-1] in by else "—"
            lines.append(f"| {fam} | {cells[0]} | {cells[1]} | {sets} | {vj} |")
        lines.append("")
    return "\n".join(lines)


def demo_table(rows, classical_rows):
    """Best of each family at NFE 100 on the demo's 10 digits (the digits of the issue's deepinv figures)."""
    lines = ["| method | " + " | ".join(tasks()) + " |", "|---|" + "---|" * len(tasks())]
    fams = dict.fromkeys(r["method"] for r in rows)
    for c in dict.fromkeys(c["method"] for c in classical_rows):
        cells = [next((fmt(r["psnr_demo"]) for r in classical_rows if r["task"] == t and r["method"] == c), "—")
                 for t in tasks()]
        cost = next(r.get("cost", "0 NFE") for r in classical_rows if r["method"] == c)
        lines.append(f"| {c} ({cost}) | " + " | ".join(cells) + " |")
    for fam in fams:
        cells = [next((fmt(r["psnr_demo"]) for r in rows if r["task"] == t and r["method"] == fam
                       and r["budget"] == BUDGETS[-1]), "—") for t in tasks()]
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(p):
    return f"{mean(p):.2f} ± {std(p):.2f}"


def test_inverse_problems(benchmark):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    from adjointflow.demo.run import load_denoiser

    den, _ = load_denoiser()
    val_images, test_images = splits()
    log_lines = []

    def log(msg):
        log_lines.append(msg)
        print(msg, flush=True)

    t0, load0 = time.perf_counter(), os.getloadavg()
    rows, crows = [], []
    for k, (name, op) in enumerate(tasks().items()):
        val = problem(val_images, op, 1, seed=100 + k)
        test = problem(test_images, op, DRAWS, seed=k)
        label, est = classical(name, op, test, val)
        crows.append(dict(task=name, method=label, psnr=test.psnr_per_draw(est),
                          psnr_demo=test.psnr_per_draw(est, DEMO_DIGITS)))
        if isinstance(op, Downsample):
            ref = denoiser_reference(den, test, SIGMA_Y / float(op.singular_values(test.truth[:1]).max()))
            crows.append(dict(task=name, method="reference: the model's denoiser given x + 0.1 n (more information "
                              "than the measurement)", cost="1 NFE", psnr=test.psnr_per_draw(ref),
                              psnr_demo=test.psnr_per_draw(ref, DEMO_DIGITS)))
        rows += run_ours(den, name, op, val, test, log)
        if deepinv_available():
            rows += run_deepinv(den, name, op, val, test, log)
    seconds, load1 = time.perf_counter() - t0, os.getloadavg()
    OUT.mkdir(exist_ok=True)
    if os.environ.get("INVERSE_ONLY") and (OUT / "inverse.json").exists():
        old = json.loads((OUT / "inverse.json").read_text())
        rerun = {r["method"] for r in rows}
        rows = [r for r in old["rows"] if r["method"] not in rerun] + rows
        order = list(dict.fromkeys([r["method"] for r in old["rows"]] + [r["method"] for r in rows]))
        rows.sort(key=lambda r: (list(tasks()).index(r["task"]), order.index(r["method"]), r["budget"]))
        note = f" (families {os.environ['INVERSE_ONLY']} rerun and merged)"
    else:
        note = ""
    (OUT / "inverse.json").write_text(json.dumps(dict(rows=rows, classical=crows), indent=1))
    text = ("# Inverse problems on the digits model (equal NFE, tuned on validation)\n\n"
            "Generated by `OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/test_bench_inverse.py "
            f"--benchmark-only -s` in {seconds / 60:.0f} min{note} (load average {load0[0]:.1f} -> {load1[0]:.1f}). "
            f"PSNR in dB on {test_images.shape[0]} held-out test digits, mean ± std over {DRAWS} noise draws, "
            f"sigma_y = {SIGMA_Y}; bold: best at that budget.\n\n" + table(rows, crows, test_images.shape[0])
            + f"\n### The demo's {DEMO_DIGITS} digits only, NFE budget {BUDGETS[-1]} (same runs)\n\n"
            + demo_table(rows, crows) + "\n")
    (OUT / "inverse.md").write_text(text)
    print(text)


def test_sr_posterior_mean_curve(benchmark):
    """2x SR: PSNR of DDRM's estimate returned at the stop level ``f sigma_y / s`` (one chain, 100 NFE) and of
    the average of K chains (50 NFE each, LanPaint 45; K > 2 exceeds the budget: it measures how far averaging
    can go),
    on the validation and the test digits. A measurement, not a selection: it writes
    ``results/inverse_sr_curve.md``."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    from adjointflow.demo.run import load_denoiser

    den, _ = load_denoiser()
    val_images, test_images = splits()
    op = Downsample(2)
    level = SIGMA_Y / float(op.singular_values(torch.zeros(1, 1, 16, 16)).max())
    t0, load0 = time.perf_counter(), os.getloadavg()
    factors, ks = (0.8, 0.9, 1.0, 1.1, 1.25, 1.5), (1, 2, 4, 8, 16)
    lines = []
    for split, prob in (("validation (20 digits, 1 draw)", problem(val_images, op, 1, seed=101)),
                        ("test (30 digits, 3 draws)", problem(test_images, op, DRAWS, seed=1))):
        ref = prob.psnr_per_draw(denoiser_reference(den, prob, level))
        cells = []
        for f in factors:
            x = DDRM(steps=100, eta=1.0, stop=f * level, progress=False).run(den, prob.objective, prob.z.clone()).x
            cells.append(fmt_any(prob.psnr_per_draw(x.clamp(-1, 1))))
        lines += [f"### {split}; the model's denoiser given x + {level:g} n: {fmt_any(ref)}", "",
                  "| stop / (sigma_y / s) | " + " | ".join(f"{f:g}" for f in factors) + " |",
                  "|---|" + "---|" * len(factors), "| DDRM eta = 1, 100 NFE, one chain | " + " | ".join(cells) + " |", "",
                  "| K chains of 50 NFE averaged | " + " | ".join(f"K = {k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for name, make in (("estimate at stop = sigma_y / s (eta = 1)", lambda j: DDRM(steps=50, eta=1.0, stop=level,
                                                                                       seed=101 * j, progress=False)),
                           ("final samples (eta = 0.3)", lambda j: DDRM(steps=50, eta=0.3, seed=101 * j, progress=False)),
                           ("LanPaint samples (9 steps, 4 Langevin steps: 45 NFE)",
                            lambda j: LanPaint(steps=9, langevin_steps=4, step_size=0.3, seed=101 * j, progress=False))):
            acc, cells = None, []
            for j in range(ks[-1]):
                z = prob.z.clone() if j == 0 else torch.randn(prob.z.shape, generator=torch.Generator().manual_seed(977 + j))
                x = make(j).run(den, prob.objective, z).x.clamp(-1, 1)
                acc = x if acc is None else acc + x
                if j + 1 in ks:
                    cells.append(fmt_any(prob.psnr_per_draw(acc / (j + 1))))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    load1 = os.getloadavg()
    text = ("# 2x super-resolution: posterior-mean estimates (DDRM, LanPaint)\n\nGenerated by `OMP_NUM_THREADS=1 .venv/bin/python "
            "-m pytest benchmarks/test_bench_inverse.py -k curve --benchmark-only -s` in "
            f"{(time.perf_counter() - t0) / 60:.0f} min (load average {load0[0]:.1f} -> {load1[0]:.1f}). PSNR (dB), "
            "mean ± std over the draws; sigma_y = 0.05.\n\n" + "\n".join(lines))
    OUT.mkdir(exist_ok=True)
    (OUT / "inverse_sr_curve.md").write_text(text)
    print(text)


def fmt_any(p):
    return fmt(p) if len(p) > 1 else f"{p[0]:.2f}"
