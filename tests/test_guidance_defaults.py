"""Guidance defaults work out of the box on the demo's two tasks (bundled digits model, sigma_y = 0.05),
on validation digits the demo never reports. Floors: the measured PSNR on these 4 digits minus ~1 dB
(FlowChef 24.2 / 33.0, DFlow 30.0 / 33.8 dB); the full comparison with the hand-tuned settings,
AdjointGuidance included, is benchmarks/test_bench_guidance_defaults.py."""
import pytest
import torch

import adjointflow as af
import adjointflow.guidance as G

pytest.importorskip("safetensors")
pytest.importorskip("sklearn")

FLOORS = {"FlowChef": (23.0, 32.0), "DFlow": (29.0, 32.8)}  # (inpainting, 2x super-resolution)


@pytest.fixture(scope="module")
def problem():
    from adjointflow.demo.inverse import make_tasks

    tasks = make_tasks(4, 0.05, 0, validation=True)
    x_init = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    return af.pretrained.digits(), tasks, x_init


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_defaults_reach_the_stated_psnr_and_beat_the_classical_baseline(name, problem):
    from adjointflow.demo.report import psnr

    den, tasks, x_init = problem
    for task, floor in zip(tasks, FLOORS[name]):
        res = getattr(G, name)(progress=False).run(den, G.MeasurementLoss(task.operator, task.y, 0.05), x_init)
        p = psnr(res.x, task.truth)
        assert p >= floor, (name, task.name, p)
        assert p > psnr(task.classical[1], task.truth) + 2.0, (name, task.name, p)
        if name == "DFlow":  # it stops at the noise level instead of fitting the noise
            assert res.stop_reason == "discrepancy" and res.nfe < 400
