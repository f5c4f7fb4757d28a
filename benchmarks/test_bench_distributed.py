"""Throughput of the batch runner (``python -m adjointflow guide``) at P = 1 and P = 2 processes.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_distributed.py --benchmark-only -s -p no:cacheprovider
-o testpaths=benchmarks`` (rewrites ``benchmarks/results/distributed.md``).

Task: the demo's digits inpainting (central 8x8 box missing, sigma_y = 0.05) of ITEMS held-out test digits
with D-Flow's defaults, launched exactly as a user would (``torchrun --nproc-per-node P``, gloo, one torch
thread per process), P = 1 and P = 2 in turn for ROUNDS rounds into fresh output folders; medians. Two
rates: the runner's own (items / seconds from joining the process group to the summary, as in
summary.md) and the command's (including Python start-up and imports). Scaling efficiency =
rate(P=2) / (2 rate(P=1)). The load average is recorded: other jobs on the 2 cores take from P = 2 first.
"""
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ITEMS = 24
ROUNDS = 3
PROCS = (1, 2)
RESULTS = Path(__file__).parent / "results" / "distributed.md"


def _command(p, inputs, mask, out):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}", "-m", "adjointflow",
            "guide", str(inputs), "--out", str(out), "--task", "inpaint", "--mask", str(mask), "--method", "DFlow",
            "--no-progress"]


@pytest.mark.benchmark(group="distributed")
def test_batch_runner_throughput(benchmark, tmp_path):
    pytest.importorskip("safetensors")
    from adjointflow.demo.digits import load_digits_tensor
    from adjointflow.demo.inverse import REPORTED

    x, _ = load_digits_tensor("test")
    inputs, mask = tmp_path / "digits.npz", tmp_path / "mask.npy"
    np.savez(inputs, x=x[REPORTED : REPORTED + ITEMS].numpy())  # digits the demo does not report
    m = np.ones((16, 16))
    m[4:12, 4:12] = 0
    np.save(mask, m)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runner = {p: [] for p in PROCS}
    wall = {p: [] for p in PROCS}
    loads = [os.getloadavg()[0]]
    for r in range(ROUNDS):
        for p in PROCS:
            out = tmp_path / f"out_p{p}_r{r}"
            t0 = time.perf_counter()
            done = subprocess.run(_command(p, inputs, mask, out), env=env, capture_output=True, text=True, timeout=900)
            wall[p].append(time.perf_counter() - t0)
            assert done.returncode == 0, done.stderr[-2000:]
            summary = (out / "summary.md").read_text()
            m_ = re.search(r"This run: (\d+) item\(s\) on (\d+) process\(es\) in ([0-9.]+) s", summary)
            assert m_ and int(m_.group(1)) == ITEMS and int(m_.group(2)) == p, summary
            runner[p].append(float(m_.group(3)))
            loads.append(os.getloadavg()[0])
            if r < ROUNDS - 1:
                shutil.rmtree(out)
    # P = 2 results are the P = 1 results, bit for bit (the property the tests check on 8 items)
    a, b = tmp_path / f"out_p1_r{ROUNDS - 1}" / "items", tmp_path / f"out_p2_r{ROUNDS - 1}" / "items"
    for f in sorted(a.iterdir()):
        assert torch.equal(torch.load(f)["x"], torch.load(b / f.name)["x"]), f.name
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)

    rate = {p: ITEMS / statistics.median(runner[p]) for p in PROCS}
    rate_wall = {p: ITEMS / statistics.median(wall[p]) for p in PROCS}
    eff, eff_wall = rate[2] / (2 * rate[1]), rate_wall[2] / (2 * rate_wall[1])
    cmd = " ".join(_command(2, "digits.npz", "mask.npy", "OUT")[1:]).replace(sys.executable, "python")
    lines = [
        "# Batch runner throughput: P = 1 vs P = 2 processes (digits inpainting, D-Flow defaults)",
        "",
        f"Command per run: `python {cmd}` (P = 1: `--nproc-per-node=1`), {ITEMS} held-out test digits, "
        f"{ROUNDS} rounds alternating P = 1, 2; medians. Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, one thread per process. Load average (1 min) over the "
        f"runs: {min(loads):.1f} - {max(loads):.1f}.",
        "",
        "| P | runner s (median) | items/s (runner) | command s (median) | items/s (command) |",
        "|---|---|---|---|---|",
    ]
    for p in PROCS:
        lines.append(f"| {p} | {statistics.median(runner[p]):.1f} | {rate[p]:.3f} | {statistics.median(wall[p]):.1f} | "
                     f"{rate_wall[p]:.3f} |")
    lines += [
        "",
        f"Scaling efficiency rate(P=2) / (2 rate(P=1)): **{eff:.2f}** (runner), {eff_wall:.2f} (command, with "
        f"start-up). All runs: runner seconds P=1 {[round(v, 1) for v in runner[1]]}, P=2 "
        f"{[round(v, 1) for v in runner[2]]}.",
        "",
        "Reproduce: `.venv/bin/python -m pytest benchmarks/test_bench_distributed.py --benchmark-only -s "
        "-p no:cacheprovider -o testpaths=benchmarks`.",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
