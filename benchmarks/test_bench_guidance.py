"""Guidance methods side by side: NFE, VJPs through the network, seconds, peak memory, final loss and
distance to the exact posterior.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/test_bench_guidance.py --benchmark-only -s``
(or ``make bench``). Writes ``benchmarks/results/guidance.md``.

(a) Exact problem: prior ``N(m, S)`` in R^16 (full covariance, eigenvalues 0.25..2), ``y = A x + N(0, 0.1^2 I)``
    with ``A`` 8x16, rectified flow with the exact velocity; the posterior ``N(pm, pc)`` is closed form.
    All methods run on the same 256 start latents. Samplers (DPS, FlowChef) are judged by their sample
    mean and covariance; optimisers (D-Flow, AdjointGuidance) return point estimates, judged per sample.
(b) Small network: a random MLP velocity field (64-256-256-64, SiLU) on a rectified flow, batch 16,
    inpainting of half the coordinates (sigma_y = 0.05) of samples drawn from the model itself.
    Peak memory shows each method's graph footprint.

Memory: peak live tensor-storage bytes (:class:`adjointflow.adjoint.PeakMemory`, exact). Time: best of
3 runs, also as a ratio to an unguided 100-step Euler solve timed in the same process.
"""
import sys
import time
from pathlib import Path

import torch
from torch import nn

import adjointflow as af
from adjointflow.adjoint import Backprop, PeakMemory
from adjointflow.guidance import (DPS, AdjointGuidance, DFlow, FlowChef, Inpaint, MatrixOperator,
                                  MeasurementLoss)
from adjointflow.testing import linear_gaussian_posterior

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_guidance_gaussian import FullGaussian, random_cov  # noqa: E402

D = torch.float64
FLOW = af.LinearFlow()


def exact_problem():
    g = torch.Generator().manual_seed(0)
    d, m = 16, 8
    cov, _ = random_cov(d, d, g, scale=(0.25, 2.0))
    mean = torch.randn(d, generator=g, dtype=D)
    prior = FullGaussian(mean, cov)
    A = torch.randn(m, d, generator=g, dtype=D) / d**0.5
    x_true = mean + torch.linalg.cholesky(cov) @ torch.randn(d, generator=g, dtype=D)
    y = A @ x_true + 0.1 * torch.randn(m, generator=g, dtype=D)
    pm, pc = linear_gaussian_posterior(mean, cov, A, y, 0.1)
    # whitened start latents (sample mean 0, sample covariance I exactly): for methods whose map is
    # affine in the latent (exact velocity, quadratic loss, SGD or the 'score' rule) the output moments
    # are then the method's exact moments, free of Monte-Carlo error
    z = torch.randn(256, d, generator=g, dtype=D)
    z = z - z.mean(0)
    x1 = torch.linalg.solve_triangular(torch.linalg.cholesky(torch.cov(z.T)), z.T, upper=False).T
    return prior, A, y, pm, pc, x1


class ExactLikelihood:
    """``-log p(y | x_t)`` of the Gaussian prior (the DPS control variant): variance ``s^2 I + A C_t A^T``."""

    time_dependent = True

    def __init__(self, prior, A, y, sigma_y):
        self.prior, self.A, self.y, self.sy = prior, A, y, sigma_y

    def __call__(self, x0, t):
        C = self.prior.posterior_cov_x0(FLOW, t)
        G = self.sy**2 * torch.eye(len(self.y), dtype=D) + self.A @ C @ self.A.T
        r = self.y - x0 @ self.A.T
        return 0.5 * (r @ torch.linalg.inv(G) * r).sum(1)


def timed(fn, rounds=3):
    best, out = float("inf"), None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    with PeakMemory() as mem:
        fn()
    return out, best, mem.peak


def table_exact():
    prior, A, y, pm, pc, x1 = exact_problem()
    den = prior.denoiser(FLOW)
    obj = MeasurementLoss(MatrixOperator(A), y, 0.1)
    base = lambda: af.solve(den, x1, af.timesteps(FLOW, 100), af.Euler())
    _, t_base, _ = timed(base)
    methods = [
        ("unguided Euler, 100 steps", None),
        ("DPS(steps=200, scale=0.1)", lambda: DPS(steps=200, scale=0.1).run(den, obj, x1)),
        ("DPS exact-likelihood control (rule='score', t_start=0.999, 200 steps)",
         lambda: DPS(grid=af.timesteps(FLOW, 200, t_start=0.999), rule="score", scale=1.0).run(
             den, ExactLikelihood(prior, A, y, 0.1), x1)),
        ("FlowChef(steps=100, lr=1.0) (SGD, lr x sigma_y^2)", lambda: FlowChef(steps=100, lr=1.0).run(den, obj, x1)),
        ("FlowChef(steps=100, optimizer='adam') (paper: Adam 0.02)",
         lambda: FlowChef(steps=100, optimizer="adam").run(den, obj, x1)),
        ("FlowChef() defaults (50 steps, SGD 0.5)", lambda: FlowChef().run(den, obj, x1)),
        ("DFlow(Heun, steps=6, regularizer='gaussian', discrepancy=None) (latent MAP)",
         lambda: DFlow(solver=af.Heun(), steps=6, regularizer="gaussian", discrepancy=None).run(den, obj, x1)),
        ("DFlow() defaults (discrepancy stop)", lambda: DFlow().run(den, obj, x1)),
        ("AdjointGuidance(DDIM 20 steps, Checkpoint, 50 it., SGD 0.5 x sigma_y^2)",
         lambda: AdjointGuidance(steps=20, gradient=af.Checkpoint(), iterations=50, optimizer="sgd", lr=0.5,
                                 discrepancy=None).run(den, obj, x1)),
        ("AdjointGuidance() defaults (4 steps, Adam 0.1, discrepancy)", lambda: AdjointGuidance().run(den, obj, x1)),
    ]
    rows = []
    for name, fn in methods:
        if fn is None:
            sol, sec, peak = timed(base)
            x, nfe, vjps, loss = sol.x, sol.nfe, 0, float(obj(sol.x).mean())
        else:
            res, sec, peak = timed(fn)
            x, nfe, vjps, loss = res.x, res.nfe, res.vjps, float(obj(res.x).mean())
        mean_err = float((x.mean(0) - pm).norm())
        cov_err = float((torch.cov(x.T) - pc).norm() / pc.norm())
        dist = float((x - pm).norm(dim=1).mean())
        rows.append((name, nfe, vjps, sec, sec / t_base, peak / 1e6, loss, mean_err, cov_err, dist))
    loss_pm = float(obj(pm[None]).mean())
    head = ("| method | NFE | VJPs | seconds (best of 3) | / unguided | peak MB | final loss (mean) | "
            "‖sample mean − pm‖ | ‖cov − pc‖/‖pc‖ | mean ‖x − pm‖ |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.3f} | "
                      f"{r[7]:.4f} | {r[8]:.3f} | {r[9]:.4f} |" for r in rows]
    lines.append(f"\nReference: loss at the posterior mean {loss_pm:.3f}; ‖pm‖ = {float(pm.norm()):.3f}; "
                 f"trace(pc) = {float(pc.trace()):.3f} (so a posterior sample is at mean ‖x − pm‖ ≈ "
                 f"{float(pc.trace())**0.5:.2f} from pm). Monte-Carlo standard error of a 256-sample mean from "
                 f"i.i.d. posterior samples: {float(pc.trace() / 256) ** 0.5:.3f} (the whitened latents remove it for "
                 "the affine methods: DPS control, FlowChef SGD).")
    return "\n".join(lines), {r[0]: r for r in rows}


class MLP(nn.Module):
    def __init__(self, d=64, width=256):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(d + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, d))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


def table_network():
    net = MLP()
    for p in net.parameters():
        p.requires_grad_(False)  # a frozen pretrained model
    den = af.Denoiser(net, FLOW, "velocity")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        truth = af.solve(den, torch.randn(16, 64, generator=g), af.timesteps(FLOW, 50), af.Euler()).x
    mask = torch.zeros(64)
    mask[::2] = 1
    op = Inpaint(mask)
    y = op(truth) + 0.05 * torch.randn(16, 64, generator=g) * mask
    obj = MeasurementLoss(op, y, 0.05)
    x1 = torch.randn(16, 64, generator=g)
    base = lambda: af.solve(den, x1, af.timesteps(FLOW, 100), af.Euler())
    _, t_base, _ = timed(base)
    methods = [
        ("unguided Euler, 100 steps", None),
        ("DPS(steps=100, scale=0.3)", lambda: DPS(steps=100, scale=0.3).run(den, obj, x1)),
        ("FlowChef(steps=100, lr=0.4) (SGD, lr x sigma_y^2)", lambda: FlowChef(steps=100, lr=0.4).run(den, obj, x1)),
        ("DFlow(Heun, steps=6, iterations=2) Checkpoint",
         lambda: DFlow(solver=af.Heun(), steps=6, iterations=2, gradient=af.Checkpoint(), discrepancy=None).run(den, obj, x1)),
        ("DFlow(Heun, steps=6, iterations=2) Backprop",
         lambda: DFlow(solver=af.Heun(), steps=6, iterations=2, discrepancy=None).run(den, obj, x1)),
        ("DFlow() defaults", lambda: DFlow().run(den, obj, x1)),
        ("AdjointGuidance(iterations=20) defaults otherwise", lambda: AdjointGuidance(iterations=20).run(den, obj, x1)),
        ("AdjointGuidance(iterations=20, optimizer='sgd', lr=0.4)",
         lambda: AdjointGuidance(iterations=20, optimizer="sgd", lr=0.4).run(den, obj, x1)),
        ("AdjointGuidance(iterations=20, Euler, ContinuousAdjoint(), sgd 0.4)",
         lambda: AdjointGuidance(solver=af.Euler(), iterations=20, gradient=af.adjoint.ContinuousAdjoint(),
                                 optimizer="sgd", lr=0.4).run(den, obj, x1)),
    ]
    rows = []
    for name, fn in methods:
        if fn is None:
            sol, sec, peak = timed(base)
            nfe, vjps, loss = sol.nfe, 0, float(obj(sol.x).mean())
        else:
            res, sec, peak = timed(fn)
            nfe, vjps, loss = res.nfe, res.vjps, float(obj(res.x).mean())
        rows.append((name, nfe, vjps, sec, sec / t_base, peak / 1e6, loss))
    head = ("| method | NFE | VJPs | seconds (best of 3) | / unguided | peak MB | final loss (mean) |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head] + [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.2f} |" for r in rows]
    lines.append(f"\nReference: loss at the ground truth {float(obj(truth).mean()):.2f} "
                 f"(expected ≈ {0.5 * 32:.0f} = half the observed count, from the noise).")
    return "\n".join(lines), {r[0]: r for r in rows}


def test_guidance_methods(benchmark):
    text_a, a = table_exact()
    text_b, b = table_network()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    text = ("# Guidance benchmark\n\nGenerated by `OMP_NUM_THREADS=1 .venv/bin/python -m pytest "
            "benchmarks/test_bench_guidance.py --benchmark-only -s` (1 thread, shared CPU; compare the ratios, "
            "not absolute seconds). NFE counts every network evaluation (Checkpoint's recomputation included); "
            "VJPs count backward passes through a network call. Settings other than the defaults are in each "
            "row's name; SGD steps are lr x sigma_y^2 x grad (the objective's step_scale), so lr is "
            "dimensionless.\n\n"
            "## (a) Exact linear-Gaussian problem (R^16, 8 measurements, sigma_y = 0.1), 256 latents, float64\n\n"
            + text_a + "\n\n## (b) Random MLP velocity field (64-d), inpainting half the coordinates, batch 16, "
            "float32\n\n" + text_b + "\n")
    out = Path(__file__).parent / "results" / "guidance.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print("\n" + text)
    # what the methods promise
    assert a["FlowChef(steps=100, lr=1.0) (SGD, lr x sigma_y^2)"][2] == 0 and b["FlowChef(steps=100, lr=0.4) (SGD, lr x sigma_y^2)"][2] == 0
    assert a["DFlow(Heun, steps=6, regularizer='gaussian', discrepancy=None) (latent MAP)"][9] < 0.05  # point estimate at the posterior mean
    assert a["DPS exact-likelihood control (rule='score', t_start=0.999, 200 steps)"][7] < 0.05
    ck, bp = b["DFlow(Heun, steps=6, iterations=2) Checkpoint"], b["DFlow(Heun, steps=6, iterations=2) Backprop"]
    assert ck[5] < bp[5]  # checkpointing keeps one step's graph
