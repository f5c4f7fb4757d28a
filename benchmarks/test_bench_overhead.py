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
