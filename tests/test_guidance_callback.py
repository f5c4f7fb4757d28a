"""Watching and stopping guidance runs: the per-iteration callback, Ctrl-C returning the result so
far, the discrepancy-principle stop, and the delayed default progress bar -- for every method."""
import pytest
import torch

import adjointflow as af
from adjointflow.guidance import DPS, AdjointGuidance, DFlow, FlowChef, GuidanceStep, MatrixOperator, MeasurementLoss
from adjointflow.guidance import base as guidance_base
from adjointflow.testing import GaussianData

D = torch.float64
SAMPLERS = [DPS(steps=8), FlowChef(steps=8)]
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
    calls = {"n": 0}

    def objective(x0):
        calls["n"] += 1
        if calls["n"] == 2:  # the first call is the input probe; the second is inside the run
            raise KeyboardInterrupt
        return obj(x0)

    with pytest.raises(KeyboardInterrupt):
        method.run(den, objective, x)


def test_callback_and_progress_are_checked():
    for cls in (DPS, FlowChef, DFlow, AdjointGuidance):
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
    A = torch.randn(6, 5, generator=g, dtype=D)
    truth = torch.randn(1, 5, generator=g, dtype=D)
    ys = truth @ A.T + 0.2 * torch.randn(20000, 6, generator=g, dtype=D)
    obj = MeasurementLoss(MatrixOperator(A), ys, 0.2)
    at_truth = obj(truth.expand(20000, 5))
    floor = obj.noise_floor(truth.expand(20000, 5))
    assert float(floor[0]) == 3.0  # m/2 with m = 6
    # mean of a chi^2_6/2 sample: standard error sqrt(6/2)/sqrt(20000) ~ 0.012
    assert abs(float(at_truth.mean()) - 3.0) < 0.05


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
