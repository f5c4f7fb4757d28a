"""Torch threads on the bundled digits model: one thread vs torch's default (one per core) and more.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_threads.py --benchmark-only -s -p no:cacheprovider
-o testpaths=benchmarks`` (rewrites ``benchmarks/results/threads.md``).

One 10-NFE sample (the bundled bespoke solver, 5 RK2 steps) per batch size, each thread count in
turn within each round (round-robin, ``torch.set_num_threads`` switched in-process), 15 rounds,
medians; the load average is recorded because on a shared machine it decides the answer.
"""
import os
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch

import adjointflow as af

BATCHES = (1, 16, 128, 512)
ROUNDS = 15


def _sample(den, solver, grid, x, labels):
    with torch.no_grad():
        return af.solve(den, x, grid, solver, cond=labels).x


@pytest.mark.benchmark(group="threads")
def test_threads_on_digits(benchmark):
    pytest.importorskip("safetensors")
    den = af.pretrained.digits()
    solver = af.pretrained.digits_solver(10)
    grid = solver.timesteps()
    cores = os.cpu_count() or 1
    counts = sorted({1, cores, 2 * cores})
    before = os.getloadavg()
    found = torch.get_num_threads()
    times = {(b, n): [] for b in BATCHES for n in counts}
    try:
        inputs = {b: (torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(b)), torch.arange(b) % 10)
                  for b in BATCHES}
        for b in BATCHES:  # warm-up: first-call allocations
            _sample(den, solver, grid, *inputs[b])
        for _ in range(ROUNDS):
            for b in BATCHES:
                for n in counts:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    _sample(den, solver, grid, *inputs[b])
                    times[(b, n)].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(found)
    after = os.getloadavg()
    benchmark.pedantic(lambda: _sample(den, solver, grid, *inputs[BATCHES[0]]), rounds=3, iterations=1)

    med = {k: statistics.median(v) for k, v in times.items()}
    header = "| batch | " + " | ".join(f"{n} thread{'s' if n > 1 else ''} (ms)" for n in counts) + \
             " | " + " | ".join(f"{n} / 1 thread" for n in counts if n > 1) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(counts) - 1)]
    for b in BATCHES:
        cells = [f"{1e3 * med[(b, n)]:.1f}" for n in counts]
        ratios = [f"{med[(b, n)] / med[(b, 1)]:.2f}" for n in counts if n > 1]
        lines.append(f"| {b} | " + " | ".join(cells + ratios) + " |")
    out = Path(__file__).parent / "results" / "threads.md"
    out.write_text(
        "# Torch threads on the digits model\n\n"
        "Command: `.venv/bin/python -m pytest benchmarks/test_bench_threads.py --benchmark-only -s -p no:cacheprovider "
        "-o testpaths=benchmarks`\n\n"
        f"One 10-NFE sample (`pretrained.digits_solver(10)`, `torch.no_grad()`), float32, {platform.machine()} with "
        f"{cores} cores, torch {torch.__version__}; median of {ROUNDS} round-robin rounds. Load average (1/5/15 min) "
        f"before {before[0]:.1f}/{before[1]:.1f}/{before[2]:.1f}, after {after[0]:.1f}/{after[1]:.1f}/{after[2]:.1f}.\n\n"
        + "\n".join(lines) + "\n"
    )
    print("\n" + "\n".join(lines))
