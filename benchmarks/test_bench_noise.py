"""Cost of a fixed Brownian path: ``BrownianNoise`` against torchsde's ``BrownianInterval``.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_noise.py --benchmark-only -s -p no:cacheprovider
-o testpaths=benchmarks`` (rewrites ``benchmarks/results/noise.md``).

Workload: the queries of a 100-step SDE solve and its backward replay (``noise(t_i, t_{i+1})`` along a
uniform grid from 1 to 1e-3, then the same increments in reverse order), float64, on a fresh object each
time. Contenders, round-robin within each round, medians:

* ``BrownianNoise`` (ours): one path per seed and shape whatever the query order;
* ``torchsde.BrownianInterval`` (default options, what adjointflow used before): fast, but its path
  depends on the order and positions of the queries;
* ``torchsde.BrownianInterval(halfway_tree=True, tol=1e-12)``: torchsde's order-independent mode.

For scale, the last column is one forward of the bundled digits network on the same batch (the
network an SDE solve calls once per step).
"""
import os
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch

from adjointflow import BrownianNoise

SHAPES = ((16,), (64, 1, 16, 16))
ROUNDS = 3
GRID = torch.linspace(1.0, 1e-3, 101, dtype=torch.float64).tolist()


def _workload(noise):
    pairs = list(zip(GRID[:-1], GRID[1:]))
    for a, b in pairs:
        noise(a, b)
    for a, b in reversed(pairs):
        noise(a, b)


def _interval(shape, **kw):
    import torchsde

    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=shape, dtype=torch.float64, entropy=0,
                                   levy_area_approximation="none", tol=1e-12, **kw)
    return lambda a, b: bm(min(a, b), max(a, b))


@pytest.mark.benchmark(group="noise")
def test_brownian_noise_cost(benchmark):
    pytest.importorskip("torchsde")
    makers = {
        "BrownianNoise (ours, fixed path)": lambda s: BrownianNoise(s, seed=0, dtype=torch.float64),
        "torchsde BrownianInterval (order-dependent)": _interval,
        "torchsde halfway_tree (fixed path)": lambda s: _interval(s, halfway_tree=True),
    }
    net = None
    try:
        from adjointflow.demo.digits import load_digits_model

        net = load_digits_model()[0].requires_grad_(False)
    except (ImportError, FileNotFoundError):
        pass
    before = os.getloadavg()
    times = {(s, m): [] for s in SHAPES for m in makers}
    net_times = {s: [] for s in SHAPES}
    for _ in range(ROUNDS):
        for s in SHAPES:
            for name, make in makers.items():
                t0 = time.perf_counter()
                _workload(make(s))
                times[(s, name)].append(time.perf_counter() - t0)
            if net is not None and len(s) == 4:
                x, t = torch.randn(s), torch.full((s[0],), 0.5)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    net(x, t)
                    net_times[s].append(time.perf_counter() - t0)
    after = os.getloadavg()
    benchmark.pedantic(lambda: _workload(makers["BrownianNoise (ours, fixed path)"](SHAPES[0])), rounds=1, iterations=1)

    med = {k: statistics.median(v) for k, v in times.items()}
    names = list(makers)
    lines = ["| shape | " + " | ".join(f"{n} (ms / query)" for n in names) + " | ours / interval | digits net forward (ms) |",
             "|" + "---|" * (len(names) + 3)]
    for s in SHAPES:
        per_query = [1e3 * med[(s, n)] / (2 * (len(GRID) - 1)) for n in names]
        net_ms = f"{1e3 * statistics.median(net_times[s]):.1f}" if net_times[s] else "–"
        lines.append(f"| {tuple(s)} | " + " | ".join(f"{q:.2f}" for q in per_query)
                     + f" | {med[(s, names[0])] / med[(s, names[1])]:.1f} | {net_ms} |")
    out = Path(__file__).parent / "results" / "noise.md"
    out.write_text(
        "# Brownian noise: cost of a fixed path\n\n"
        "Command: `.venv/bin/python -m pytest benchmarks/test_bench_noise.py --benchmark-only -s -p no:cacheprovider "
        "-o testpaths=benchmarks`\n\n"
        f"200 increments (a 100-step solve and its reverse replay) on a fresh object, float64, {platform.machine()}, "
        f"torch {torch.__version__}, 1 thread; median of {ROUNDS} round-robin rounds. Load average (1/5/15 min) "
        f"before {before[0]:.1f}/{before[1]:.1f}/{before[2]:.1f}, after {after[0]:.1f}/{after[1]:.1f}/{after[2]:.1f}.\n\n"
        + "\n".join(lines) + "\n"
    )
    print("\n" + "\n".join(lines))
