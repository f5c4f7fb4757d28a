"""Watching and stopping guidance runs: the per-iteration callback, Ctrl-C returning the result so
far, the discrepancy-principle stop, and the delayed default progress bar -- for every method."""
import pytest
import torch

import adjointflow as af
from adjointflow.guidance import (DDRM, DPS, AdjointGuidance, DFlow, DiffPIR, FlowChef, FlowDPS, GuidanceStep, LanPaint,
                                  MatrixOperator, MeasurementLoss, PiGDM)
from adjointflow.guidance import base as guidance_base
from adjointflow.testing import GaussianData

D = torch.float64
SAMPLERS = [DPS(steps=8), FlowChef(steps=8), DDRM(steps=8), PiGDM(steps=8), DiffPIR(steps=8), FlowDPS(steps=8),
            LanPaint(steps=8, langevin_steps=1)]
OPTIMISERS = [DFlow(steps=3, iterations=3, max_iter=4, discrepancy=None),
              AdjointGuidance(steps=3, iterations=6, discrepancy=None)]
ALL = SAMPLERS + OPTIMISERS
IDS = [type(m).__name__ for m in ALL]


def setup(n=3, d=4):
    data = GaussianData(torch.zeros(d, dtype=D), torch.ones(d, dtype=D))
    den = data.denoiser(af.LinearFlow(), "velocity")
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, d, generator=g, dtype=D)
    y = torch.randn(2, generator=g, dtype=D)
    return den, MeasurementLoss(MatrixOperator(A), y, 0.1), torch.randn(n, d, generator=g, dtype=D)


class Recorder:
    def __init__(self, stop_at=None, interrupt_at=None):
        self.steps, self.stop_at, self.interrupt_at = [], stop_at, interrupt_at

    def __call__(self, step):
        self.steps.append(step)
        if step.iteration == self.interrupt_at:
            raise KeyboardInterrupt
        return step.iteration == self.stop_at


@pytest.mark.parametrize("method", ALL, ids=IDS)
def test_callback_sees_every_iteration(method):
    import dataclasses

    den, obj, x = setup()
    rec = Recorder()
    res = dataclasses.replace(method, callback=rec).run(den, obj, x)
    assert res.stop_reason in ("completed", "converged") and not res.interrupted
    assert [s.iteration for s in rec.steps] == list(range(len(rec.steps))) and len(rec.steps) >= 3
    for s in rec.steps:
        assert isinstance(s, GuidanceStep) and s.method == type(method).__name__
        assert s.loss.shape == (3,) and s.loss.dtype == D and s.x0.shape == x.shape and not s.x0.requires_grad
        assert s.total >= len(rec.steps)
        torch.testing.assert_close(s.loss, obj(s.x0))  # the loss is the objective at the reported estimate
        assert (s.t is None) == (method in OPTIMISERS)
    assert res.losses.shape[0] == len(rec.steps) + 1  # every record plus the returned sample


@pytest.mark.parametrize("method", ALL, ids=IDS)
@pytest.mark.parametrize("how", ["callback", "ctrl-c"])
def test_stop_returns_the_result_so_far(method, how):
    import dataclasses

    den, obj, x = setup()
    rec = Recorder(stop_at=2) if how == "callback" else Recorder(interrupt_at=2)
    res = dataclasses.replace(method, callback=rec).run(den, obj, x)
    assert len(rec.steps) == 3
    assert res.stop_reason == ("callback" if how == "callback" else "interrupted")
    assert res.interrupted == (how == "ctrl-c")
    if method in SAMPLERS:  # the latest clean estimate
        expected = rec.steps[-1].x0
    else:  # per sample, the best estimate recorded
        losses = torch.stack([s.loss for s in rec.steps])
        best = losses.argmin(0)
        expected = torch.stack([rec.steps[int(b)].x0[k] for k, b in enumerate(best)])
    torch.testing.assert_close(res.x, expected, rtol=0, atol=0)
    torch.testing.assert_close(res.losses[-1], obj(res.x))


@pytest.mark.parametrize("method", ALL, ids=IDS)
def test_ctrl_c_before_anything_was_recorded_is_raised(method):
    den, obj, x = setup()

    class Interrupting(MeasurementLoss):  # a MeasurementLoss, as the SVD-based methods require
        calls = 0

        def __call__(self, x0):
            Interrupting.calls += 1
            if Interrupting.calls == 2:  # the first call is the input probe; the second is inside the run
                raise KeyboardInterrupt
            return super().__call__(x0)

    with pytest.raises(KeyboardInterrupt):
        method.run(den, Interrupting(obj.operator, obj.y, obj.sigma), x)


def test_callback_and_progress_are_checked():
    for cls in (DPS, FlowChef, DFlow, AdjointGuidance, DDRM, PiGDM, DiffPIR, FlowDPS, LanPaint):
        with pytest.raises(TypeError, match="callback"):
            cls(callback=3)
        with pytest.raises(TypeError, match="progress"):
            cls(progress="yes")
    for cls in (DFlow, AdjointGuidance):
        with pytest.raises(ValueError, match="discrepancy"):
            cls(discrepancy=0.0)
        with pytest.raises(ValueError, match="discrepancy"):
            cls(discrepancy=True)


def test_default_progress_bar_appears_only_after_the_delay(monkeypatch, capsys):
    den, obj, x = setup()
    DPS(steps=4).run(den, obj, x)
    assert capsys.readouterr().err == ""  # a short run stays silent
    monkeypatch.setattr(guidance_base, "PROGRESS_DELAY_S", 0.0)
    DPS(steps=4).run(den, obj, x)
    assert "DPS" in capsys.readouterr().err


def test_noise_floor_is_the_expected_loss_at_the_truth():
    g = torch.Generator().manual_seed(1)
    n = 20000
    # overdetermined: rank 5 of 6 measurements; one direction of y no image explains
    A = torch.randn(6, 5, generator=g, dtype=D)
    truth = torch.randn(1, 5, generator=g, dtype=D).expand(n, 5)
    obj = MeasurementLoss(MatrixOperator(A), truth @ A.T + 0.2 * torch.randn(n, 6, generator=g, dtype=D), 0.2)
    floor, at_truth = obj.noise_floor(truth), obj(truth)
    # E[L(truth)] = m/2 = 3: chi^2_6 / 2, standard error sqrt(3 / n) ~ 0.012
    assert abs(float(at_truth.mean()) - 3.0) < 0.05 and abs(float(floor.mean()) - 3.0) < 0.05
    # per sample: 5/2 plus the observed out-of-range part, which is the same for every image
    P = A @ torch.linalg.pinv(A)
    r = obj.y - obj.y @ P.T
    torch.testing.assert_close(floor, 2.5 + 0.5 * r.pow(2).sum(1) / 0.04)
    assert bool((floor >= 2.5).all())
    # inpainting: noise in every entry of y vs noise-free zeros where unobserved
    from adjointflow.guidance import Downsample, Inpaint

    mask = (torch.rand(4, 4, generator=g) > 0.5).to(D)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=D)
    noise = 0.1 * torch.randn(n, 1, 4, 4, generator=g, dtype=D)
    everywhere = MeasurementLoss(Inpaint(mask), mask * x + noise, 0.1)
    observed_only = MeasurementLoss(Inpaint(mask), mask * (x + noise), 0.1)
    assert abs(float(everywhere.noise_floor(x).mean()) - 8.0) < 0.05  # m/2, m = 16
    assert abs(float(everywhere(x).mean()) - 8.0) < 0.05
    torch.testing.assert_close(observed_only.noise_floor(x), torch.full((n,), 0.5 * float(mask.sum()), dtype=D))
    assert abs(float(observed_only(x).mean()) - 0.5 * float(mask.sum())) < 0.05
    sr = MeasurementLoss(Downsample(2), torch.zeros(3, 1, 2, 2, dtype=D), 0.1)
    torch.testing.assert_close(sr.noise_floor(x[:3]), torch.full((3,), 2.0, dtype=D))  # full rank: m/2


def test_step_scale_makes_sgd_steps_independent_of_the_noise_level():
    den, _, x = setup()
    g = torch.Generator().manual_seed(2)
    A = torch.randn(2, 4, generator=g, dtype=D)
    y = torch.randn(2, generator=g, dtype=D)
    outs = []
    for sigma in (0.01, 0.3):
        obj = MeasurementLoss(MatrixOperator(A), y, sigma)
        assert obj.step_scale == sigma**2
        outs.append(FlowChef(steps=6, optimizer="sgd", lr=0.5).run(den, obj, x).x)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(outs[0], af.solve(den, x, af.timesteps(den.schedule, 6), af.Euler()).x)


@pytest.mark.parametrize("method", [DFlow(steps=3, iterations=20, max_iter=5),
                                    AdjointGuidance(steps=3, iterations=200, lr=0.05)], ids=["DFlow", "AdjointGuidance"])
def test_discrepancy_principle_stops_each_sample_at_the_noise_level(method):
    import dataclasses

    den, _, x = setup(n=4, d=6)
    g = torch.Generator().manual_seed(3)
    A = torch.randn(5, 6, generator=g, dtype=D)
    truth = torch.randn(4, 6, generator=g, dtype=D)
    obj = MeasurementLoss(MatrixOperator(A), truth @ A.T + 0.05 * torch.randn(4, 5, generator=g, dtype=D), 0.05)
    target = 2.5  # tau * m / 2 with tau = 1, m = 5
    rec = Recorder()
    res = dataclasses.replace(method, callback=rec).run(den, obj, x)
    assert res.stop_reason == "discrepancy"
    final = obj(res.x)
    assert bool((final <= target).all())
    losses = torch.stack([s.loss for s in rec.steps])
    for k in range(4):  # each sample's result is its first record at or below the target
        first = int((losses[:, k] <= target).nonzero()[0])
        torch.testing.assert_close(res.x[k], rec.steps[first].x0[k], rtol=0, atol=0)
        assert bool((losses[:first, k] > target).all())
    # without the rule the same run keeps fitting the noise
    free = dataclasses.replace(method, discrepancy=None).run(den, obj, x)
    assert float(free.losses[-1].mean()) < 0.5 * target and free.stop_reason != "discrepancy"
