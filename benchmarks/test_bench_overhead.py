"""Driver overhead: ``solve(..., Euler())`` vs a hand-written Euler loop on the same small MLP.

Run: ``make bench`` or ``.venv/bin/python -m pytest benchmarks/test_bench_overhead.py --benchmark-only``.
Both variants run in the same session and interleaved rounds, so their ratio is meaningful on a
noisy shared machine; the ratio is written to ``benchmarks/results/overhead.md``.
"""
import time
from pathlib import Path

import torch
from torch import nn

from adjointflow import Denoiser, Euler, LinearFlow, solve, timesteps

B, D, N = 64, 64, 50


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D + 1, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, D))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


def setup():
    torch.manual_seed(0)
    net = MLP().eval()
    den = Denoiser(net, LinearFlow(), "velocity")
    x = torch.randn(B, D)
    grid = timesteps(LinearFlow(), N, "uniform", t_start=1.0, t_end=0.0)
    return net, den, x, grid


def hand_loop(net, x, grid):
    ts = grid.tolist()
    for t, tn in zip(ts[:-1], ts[1:]):
        x = x + (tn - t) * net(x, torch.full((x.shape[0],), t))
    return x


def ours(den, x, grid):
    return solve(den, x, grid, Euler()).x


def test_overhead_ratio(benchmark):
    net, den, x, grid = setup()
    with torch.no_grad():
        assert torch.allclose(hand_loop(net, x, grid), ours(den, x, grid), atol=1e-5)
        best = {"hand": float("inf"), "solve": float("inf")}
        for _ in range(30):  # interleaved rounds; the minimum is the least noisy statistic
            for name, fn in (("hand", lambda: hand_loop(net, x, grid)), ("solve", lambda: ours(den, x, grid))):
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        benchmark.pedantic(lambda: ours(den, x, grid), rounds=5, iterations=1)
    ratio = best["solve"] / best["hand"]
    benchmark.extra_info.update(hand_s=best["hand"], solve_s=best["solve"], ratio=ratio, nfe=N)
    out = Path(__file__).parent / "results" / "overhead.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        f"| variant | best of 30 (s) | NFE |\n|---|---|---|\n| hand-written Euler loop | {best['hand']:.4f} | {N} |\n"
        f"| solve(..., Euler()) | {best['solve']:.4f} | {N} |\n\n**overhead ratio solve/hand = {ratio:.3f}** "
        f"(MLP 65-256-256-64, batch {B}, {N} steps, float32, 1 thread)\n"
    )


# --- UniPC: solve vs a hand-written UniPC loop vs diffusers' UniPCMultistepScheduler loop ---------------------
def unipc_setup(n=N):
    """An eps MLP on diffusers' default linear-beta table, diffusers' own UniPC-3 grid (timesteps k, final
    sigma 0) mapped to our t = (k + 1)/1000 (the three loops compute the same numbers)."""
    import diffusers

    from adjointflow import VPDiscrete

    torch.manual_seed(0)
    net = MLP().eval()
    sched = diffusers.UniPCMultistepScheduler(solver_order=3)
    sch = VPDiscrete(sched.alphas_cumprod)
    den = Denoiser(net, sch, "eps", net_time=sch.timestep)
    sched.set_timesteps(n)
    grid = torch.cat([(sched.timesteps.double() + 1) / 1000, torch.zeros(1, dtype=torch.float64)])
    return net, den, sched, grid, torch.randn(B, D)


def hand_unipc_coefficients(den, grid):
    """Per step: (t_net, alpha, sigma, first.a, first.b, UniP weights, UniC weights) as Python floats, taken from
    the solver's own float64 plan (a hand-written loop would hard-code the same numbers)."""
    from adjointflow import UniPC

    plan = UniPC(order=3, lower_order_final=True).plan(den.schedule, grid)
    t_net = den.schedule.timestep(grid).tolist()
    out = []
    for i, r in enumerate(plan.rows):
        out.append((t_net[i], float(plan.nodes.alpha[i]), float(plan.nodes.sigma[i]), r.first.a, r.first.b, r.w,
                    r.kc, r.c_t, r.c))
    return out


def hand_unipc(net, x, coeffs):
    hist = []
    for t, a, s, fa, fb, w, kc, c_t, c in coeffs:
        m0 = (x - s * net(x, torch.full((x.shape[0],), t))) / a
        if kc:
            x = x + c_t * (m0 - hist[0])
            for cm, mm in zip(c, hist[1:]):
                x = x + cm * (mm - hist[0])
        x_next = fa * x + fb * m0
        for wm, mm in zip(w, hist):
            x_next = x_next + wm * (mm - m0)
        hist = [m0, *hist][:3]
        x = x_next
    return x


def diffusers_unipc(net, sched, x, n=N):
    sched.set_timesteps(n)
    for k in sched.timesteps:
        x = sched.step(net(x, k.float().expand(x.shape[0])), k, x).prev_sample
    return x


def test_unipc_overhead_ratio(benchmark):
    import os

    from adjointflow import UniPC

    net, den, sched, grid, x = unipc_setup()
    coeffs = hand_unipc_coefficients(den, grid)
    solver = UniPC(order=3, lower_order_final=True)
    fns = {"hand": lambda: hand_unipc(net, x, coeffs), "solve": lambda: solve(den, x, grid, solver).x,
           "diffusers": lambda: diffusers_unipc(net, sched, x)}
    with torch.no_grad():
        ref = fns["diffusers"]()
        for name in ("hand", "solve"):
            assert (fns[name]() - ref).abs().max() <= 1e-4 * ref.abs().max(), name
        times = {k: [] for k in fns}
        for _ in range(30):  # interleaved rounds
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        benchmark.pedantic(fns["solve"], rounds=5, iterations=1)
    best = {k: min(v) for k, v in times.items()}
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    load = os.getloadavg()
    r_hand, r_diff = best["solve"] / best["hand"], best["solve"] / best["diffusers"]
    benchmark.extra_info.update(solve_over_hand=r_hand, solve_over_diffusers=r_diff)
    out = Path(__file__).parent / "results" / "overhead_unipc.md"
    out.write_text(
        f"UniPC-3 (bh2, diffusers' lower_order_final), MLP 65-256-256-64 eps model, batch {B}, {N} steps on diffusers' "
        f"own grid, float32, 1 thread, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; 30 interleaved rounds.\n\n"
        "| variant | best (s) | median (s) | NFE |\n|---|---|---|---|\n"
        f"| hand-written UniPC loop (coefficients precomputed) | {best['hand']:.4f} | {med['hand']:.4f} | {N} |\n"
        f"| solve(..., UniPC(order=3)) | {best['solve']:.4f} | {med['solve']:.4f} | {N} |\n"
        f"| diffusers UniPCMultistepScheduler loop | {best['diffusers']:.4f} | {med['diffusers']:.4f} | {N} |\n\n"
        f"**solve / hand = {r_hand:.3f}, solve / diffusers = {r_diff:.3f}** (best of 30)\n"
    )
