"""Guidance defaults vs the demo's hand-tuned settings, on digits the demo does not report.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_guidance_defaults.py --benchmark-only -s -p no:cacheprovider
-o testpaths=benchmarks`` (rewrites ``benchmarks/results/guidance_defaults.md``).

The bundled digits model, the demo's two tasks (8x8-box inpainting, 2x super-resolution, sigma_y = 0.05)
on 10 *validation* test-split digits (``make_tasks(..., validation=True)``: disjoint from every digit
the demo reports), the same start latents for every method. Each method runs with its defaults
(``Method()``) and with the settings hand-tuned for the round-1 demo (tuned on the reported digits),
alternating within each round, 3 rounds; seconds are medians, PSNR and NFE are deterministic.
Asserted: every default within 2 dB of its hand-tuned PSNR on both tasks and at most 2x its NFE.
"""
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

import adjointflow as af
import adjointflow.guidance as G

ROUNDS = 3
N_DIGITS = 10

HAND_TUNED = {  # the round-1 demo's settings (adjointflow/demo/inverse.py before issue 14)
    "DFlow": ("DFlow(solver=Euler(), steps=4, iterations=6, max_iter=5, regularizer='gaussian', Checkpoint())",
              lambda: G.DFlow(solver=af.Euler(), steps=4, iterations=6, max_iter=5, regularizer="gaussian",
                              gradient=af.Checkpoint(), discrepancy=None)),
    "FlowChef": ("FlowChef(steps=50, optimizer='adam', lr=0.05)",
                 lambda: G.FlowChef(steps=50, optimizer="adam", lr=0.05)),
    "AdjointGuidance": ("AdjointGuidance(DPMSolverPP(2), 5 steps from t=1, ContinuousAdjoint(form='x0'), "
                        "iterations=40, Adam lr=0.1)",
                        lambda: G.AdjointGuidance(solver=af.DPMSolverPP(order=2),
                                                  grid=af.timesteps(af.LinearFlow(), 5, "uniform", t_start=1.0),
                                                  iterations=40, lr=0.1, discrepancy=None,
                                                  gradient=af.ContinuousAdjoint(form="x0"))),
}
DEFAULTS = {"DFlow": G.DFlow, "FlowChef": G.FlowChef, "AdjointGuidance": G.AdjointGuidance}


def _write(name: str, title: str, select: str, body: str) -> None:
    Path(__file__).parent.joinpath("results", name).write_text(
        f"# {title}\n\nCommand: `.venv/bin/python -m pytest benchmarks/test_bench_guidance_defaults.py {select}"
        "--benchmark-only -s -p no:cacheprovider -o testpaths=benchmarks`\n\n" + body)


def _run(method, den, task, x_init):
    import dataclasses

    from adjointflow.demo.report import psnr

    method = dataclasses.replace(method, progress=False)
    obj = G.MeasurementLoss(task.operator, task.y, 0.05)
    t0 = time.perf_counter()
    res = method.run(den, obj, x_init.clone())
    return time.perf_counter() - t0, psnr(res.x, task.truth), res.nfe, res.stop_reason


@pytest.mark.benchmark(group="guidance-defaults")
def test_guidance_defaults_on_validation_digits(benchmark):
    pytest.importorskip("safetensors")
    import warnings

    from adjointflow.demo.inverse import make_tasks

    den = af.pretrained.digits()
    tasks = make_tasks(N_DIGITS, 0.05, 0, validation=True)
    x_init = torch.randn(N_DIGITS, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    load0 = os.getloadavg()
    rows = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hand-tuned AdjointGuidance runs a continuous adjoint below its threshold
        for _ in range(ROUNDS):
            for name in DEFAULTS:
                for task in tasks:
                    for kind, make in (("hand-tuned", HAND_TUNED[name][1]), ("defaults", DEFAULTS[name])):
                        sec, p, nfe, why = _run(make(), den, task, x_init)
                        r = rows.setdefault((name, task.name, kind), {"sec": [], "psnr": p, "nfe": nfe, "why": why})
                        r["sec"].append(sec)
    load1 = os.getloadavg()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)

    lines = ["| method | task | hand-tuned PSNR (dB) | defaults PSNR (dB) | hand-tuned NFE | defaults NFE | "
             "hand-tuned s | defaults s | time ratio | defaults stop |", "|" + "---|" * 10]
    failures = []
    for name in DEFAULTS:
        for task in tasks:
            h, d = rows[(name, task.name, "hand-tuned")], rows[(name, task.name, "defaults")]
            hs, ds = statistics.median(h["sec"]), statistics.median(d["sec"])
            lines.append(f"| {name} | {task.name} | {h['psnr']:.2f} | {d['psnr']:.2f} | {h['nfe']} | {d['nfe']} | "
                         f"{hs:.2f} | {ds:.2f} | {ds / hs:.2f} | {d['why']} |")
            if d["psnr"] < h["psnr"] - 2.0 or d["nfe"] > 2 * h["nfe"]:
                failures.append(f"{name} / {task.name}: {d['psnr']:.2f} dB, {d['nfe']} NFE vs {h['psnr']:.2f}, {h['nfe']}")
    text = "\n".join(lines)
    _write("guidance_defaults.md", "Guidance defaults vs the demo's hand-tuned settings (validation digits)", "",
        f"{N_DIGITS} validation digits (test split, disjoint from the demo's reported digits), sigma_y = 0.05, "
        f"1 torch thread, median seconds of {ROUNDS} alternating rounds; load average "
        f"{load0[0]:.1f} before, {load1[0]:.1f} after. Hand-tuned settings:\n\n"
        + "\n".join(f"- {k}: `{v[0]}`" for k, v in HAND_TUNED.items()) + "\n\n"
        "Defaults: `DFlow()` = DDIM, 4 steps, Backprop, L-BFGS, discrepancy stop; `FlowChef()` = 50 steps, "
        "SGD lr 0.5 x sigma_y^2; `AdjointGuidance()` = DDIM, 4 steps, Backprop, Adam 0.1, 100 iterations, "
        "discrepancy stop.\n\n" + text + "\n")
    print("\n" + text)
    assert not failures, failures


ABLATIONS = {  # one change from the defaults each: why the defaults are what they are
    "DFlow(discrepancy=None)": lambda: G.DFlow(discrepancy=None),
    "DFlow(regularizer='gaussian')": lambda: G.DFlow(regularizer="gaussian"),
    "DFlow(solver=Heun(), steps=6)": lambda: G.DFlow(solver=af.Heun(), steps=6),
    "DFlow(gradient=Checkpoint())": lambda: G.DFlow(gradient=af.Checkpoint()),
    "DFlow(discrepancy=1.2)": lambda: G.DFlow(discrepancy=1.2),
    "FlowChef(optimizer='adam')": lambda: G.FlowChef(optimizer="adam"),
    "FlowChef(steps=100)": lambda: G.FlowChef(steps=100),
    "AdjointGuidance(steps=20, iterations=50)": lambda: G.AdjointGuidance(steps=20, iterations=50),
    "AdjointGuidance(optimizer='sgd', lr=1.0)": lambda: G.AdjointGuidance(optimizer="sgd", lr=1.0),
}


@pytest.mark.benchmark(group="guidance-defaults")
def test_guidance_default_ablations(benchmark):
    """One run of each single-field change from the defaults (PSNR and NFE are deterministic; seconds
    from that one run) -> ``benchmarks/results/guidance_defaults_ablations.md``."""
    pytest.importorskip("safetensors")
    from adjointflow.demo.inverse import make_tasks

    den = af.pretrained.digits()
    tasks = make_tasks(N_DIGITS, 0.05, 0, validation=True)
    x_init = torch.randn(N_DIGITS, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    load0 = os.getloadavg()
    lines = ["| setting | task | PSNR (dB) | NFE | seconds | stop |", "|---|---|---|---|---|---|"]
    for name, make in {**{f"{k}() defaults": v for k, v in DEFAULTS.items()}, **ABLATIONS}.items():
        for task in tasks:
            sec, p, nfe, why = _run(make(), den, task, x_init)
            lines.append(f"| {name} | {task.name} | {p:.2f} | {nfe} | {sec:.1f} | {why} |")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    text = "\n".join(lines)
    _write("guidance_defaults_ablations.md", "Guidance defaults: one change at a time (validation digits)",
           "-k ablations ", f"Same tasks and digits as guidance_defaults.md, one run each, load average {load0[0]:.1f} at the start.\n\n"
        + text + "\n")
    print("\n" + text)
