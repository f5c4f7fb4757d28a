"""DPS and D-Flow on the tiny Stable Diffusion pipeline (UNet + CFG + VAE decoder in every objective):
peak memory and time, D-Flow's gradient by Backprop vs Checkpoint, and DPS (one VJP per step, no strategy).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/test_bench_pipelines.py --benchmark-only -s``.
Task: 2x super-resolution in pixel space (16x16 RGB, sigma_y = 0.05) of a model sample, batch 2,
``decoded(MeasurementLoss(Downsample(2), y), pm.decode)``; DDIM on the pipeline's grid, N = 10 and 20.
Memory: peak live tensor-storage bytes (``PeakMemory``, exact). Time: median of 3 round-robin repeats.
"""
import os
import statistics
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from adjointflow.adjoint import Backprop, Checkpoint, PeakMemory  # noqa: E402
from adjointflow.guidance import DPS, DFlow, Downsample, MeasurementLoss  # noqa: E402
from adjointflow.integrations import decoded, from_pipeline  # noqa: E402
from adjointflow.integrations.tiny_pipelines import TEXT_DIM, tiny_sd_pipeline  # noqa: E402

import adjointflow as af  # noqa: E402


def setup():
    pm = from_pipeline(tiny_sd_pipeline())
    g = torch.Generator().manual_seed(0)
    cond = pm.cond(torch.randn(2, 5, TEXT_DIM, generator=g), torch.randn(2, 5, TEXT_DIM, generator=g))
    with torch.no_grad():
        truth = pm.decode(af.solve(pm.denoiser, torch.randn(pm.latent_shape(2), generator=g), pm.grid(20),
                                   pm.solver(), cond=cond).x)
    op = Downsample(2)
    objective = decoded(MeasurementLoss(op, op(truth), sigma=0.05), pm.decode)
    return pm, cond, objective, torch.randn(pm.latent_shape(2), generator=g)


def test_bench_pipeline_guidance(benchmark):
    pm, cond, objective, z = setup()
    configs = {}
    for n in (10, 20):
        grid = pm.grid(n)
        configs[f"DPS N={n}"] = DPS(solver=pm.solver(), grid=grid, scale=0.5)
        for name, strat in (("Backprop", Backprop()), ("Checkpoint", Checkpoint())):
            configs[f"D-Flow N={n} {name}"] = DFlow(solver=pm.solver(), grid=grid, iterations=1, max_iter=3,
                                                     gradient=strat)
    times = {k: [] for k in configs}
    peaks, stats = {}, {}
    for _ in range(3):  # round-robin
        for name, method in configs.items():
            with PeakMemory() as m:
                t0 = time.perf_counter()
                res = method.run(pm.denoiser, objective, z, cond=cond)
                times[name].append(time.perf_counter() - t0)
            peaks[name] = m.peak
            stats[name] = (res.nfe, res.vjps, float(res.losses[-1].mean()))
    load = os.getloadavg()
    lines = [f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
             "| run | NFE | VJPs | final pixel loss | peak memory (MiB) | median time (s) |", "|---|---|---|---|---|---|"]
    for name in configs:
        nfe, vjps, loss = stats[name]
        lines.append(f"| {name} | {nfe} | {vjps} | {loss:.1f} | {peaks[name] / 2**20:.2f} | "
                     f"{statistics.median(times[name]):.2f} |")
    print("\n" + "\n".join(lines))
    for n in (10, 20):
        assert peaks[f"D-Flow N={n} Checkpoint"] < peaks[f"D-Flow N={n} Backprop"]
    benchmark.pedantic(lambda: None, rounds=1)
