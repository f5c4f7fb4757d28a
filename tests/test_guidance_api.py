"""The shared guidance API: construction with no arguments, ``run(denoiser, objective, x_init, cond=None)
-> GuidanceResult``, progress bars, and clear errors for bad inputs -- for all four methods."""
import math

import pytest
import torch

import adjointflow as af
from adjointflow.errors import NonFiniteError
from adjointflow.guidance import (DPS, AdjointGuidance, DFlow, Downsample, FlowChef, GuidanceResult, Inpaint,
                                  MeasurementLoss)
from adjointflow.testing import GaussianData

D = torch.float64
METHODS = [DPS, FlowChef, DFlow, AdjointGuidance]
IDS = [m.__name__ for m in METHODS]


def small(method):
    """A cheap configuration of each method (the defaults are exercised separately)."""
    return {DPS: DPS(steps=5, noise=af.BrownianNoise((3, 2), seed=0, dtype=D)),  # a stochastic default solver
            FlowChef: FlowChef(steps=5), DFlow: DFlow(steps=2, iterations=2, max_iter=3),
            AdjointGuidance: AdjointGuidance(steps=3, iterations=2)}[method]


def setup(d=2, n=3):
    data = GaussianData(torch.zeros(d, dtype=D), torch.ones(d, dtype=D))
    return data.denoiser(af.VPLinear(), "eps"), torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=D)


def objective(x0):
    return ((x0 - 1.0) ** 2).sum(1)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_defaults_run_and_return_a_guidance_result(method):
    den, x = setup()
    res = method().run(den, objective, x)  # no required arguments, documented defaults
    assert isinstance(res, GuidanceResult)
    assert res.x.shape == x.shape and res.latent.shape == x.shape and not res.x.requires_grad
    assert res.losses.dtype == D and res.losses.ndim == 2 and res.losses.shape[1] == 3
    torch.testing.assert_close(res.losses[-1], objective(res.x))
    assert float(res.losses[-1].mean()) < float(objective(af.solve(den, x, af.timesteps(af.VPLinear(), 20),
                                                                   af.Euler()).x.detach()).mean())
    assert isinstance(res.nfe, int) and res.nfe > 0 and isinstance(res.vjps, int) and res.seconds > 0
    assert method().run.__doc__ and method.__doc__ and "default" in method.__doc__.lower()
    assert all(p.grad is None for p in den.parameters())  # no side effects on the network


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_progress_bar(method, capsys):
    den, x = setup()
    m = small(method)
    import dataclasses
    dataclasses.replace(m, progress=True).run(den, objective, x)
    assert method.__name__ in capsys.readouterr().err
    m.run(den, objective, x)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_objective_wrong_shape_or_type(method):
    den, x = setup()
    with pytest.raises(ValueError, match=r"one loss per sample, shape \(3,\), got \(3, 2\)"):
        small(method).run(den, lambda x0: x0 ** 2, x)
    with pytest.raises(ValueError, match=r"got \(\)"):
        small(method).run(den, lambda x0: (x0 ** 2).sum(), x)
    with pytest.raises(TypeError, match="tensor of shape"):
        small(method).run(den, lambda x0: 1.0, x)
    with pytest.raises(TypeError, match="objective must be a callable"):
        small(method).run(den, MeasurementLoss, x)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_objective_non_finite(method):
    den, x = setup()
    with pytest.raises(NonFiniteError, match="objective returned NaN/Inf"):
        small(method).run(den, lambda x0: objective(x0) * math.inf, x)

    calls = {"n": 0}

    def later_nan(x0):  # finite on the probe, NaN once the run is under way
        calls["n"] += 1
        return objective(x0) * (math.nan if calls["n"] > 2 else 1.0)

    with pytest.raises(NonFiniteError, match="objective returned NaN/Inf"):
        small(method).run(den, later_nan, x)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_measurement_and_mask_shape_errors_surface_before_the_run(method):
    den = GaussianData(torch.zeros(1, 8, 8, dtype=D), torch.ones(1, 8, 8, dtype=D)).denoiser(af.VPLinear(), "eps")
    x = torch.randn(2, 1, 8, 8, dtype=D)
    bad_y = MeasurementLoss(Downsample(2), torch.zeros(2, 1, 8, 8, dtype=D), sigma=0.1)
    with pytest.raises(ValueError, match="measurement y has shape"):
        small(method).run(den, bad_y, x)
    bad_mask = MeasurementLoss(Inpaint(torch.ones(6, 6)), torch.zeros(1, 6, 6, dtype=D), sigma=0.1)
    with pytest.raises(ValueError, match="mask of shape"):
        small(method).run(den, bad_mask, x)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_bad_run_arguments(method):
    den, x = setup()
    m = small(method)
    with pytest.raises(TypeError, match="denoiser"):
        m.run(lambda x, t: x, objective, x)
    with pytest.raises(TypeError, match="x_init"):
        m.run(den, objective, x.numpy())
    with pytest.raises(TypeError, match="floating"):
        m.run(den, objective, torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch"):
        m.run(den, objective, torch.ones(3, dtype=D))
    with pytest.raises(ValueError, match="NaN"):
        m.run(den, objective, torch.full((3, 2), math.nan, dtype=D))
    with pytest.raises(ValueError, match="batch size"):
        m.run(den, objective, x, cond=torch.zeros(4, 2, dtype=D))


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_methods_are_frozen_and_reusable(method):
    """Settings cannot be reassigned, a run stores nothing on the method, and a run on another problem in
    between does not change the answer."""
    import dataclasses

    den, x = setup()
    m = small(method)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.steps = 10
    before = {k: id(v) for k, v in vars(m).items()}
    a = m.run(den, objective, x)
    m.run(den, lambda x0: ((x0 + 2.0) ** 2).sum(1), 3 * x + 1)
    b = m.run(den, objective, x)
    assert {k: id(v) for k, v in vars(m).items()} == before
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    torch.testing.assert_close(a.losses, b.losses, rtol=0, atol=0)
    assert (a.nfe, a.vjps) == (b.nfe, b.vjps)
