"""NaN/Inf checks recorded on the device: deferred (default), per step, or off; model vs update; adjoint pass."""
import math

import pytest
import torch

import adjointflow as af
from adjointflow import Denoiser, NonFiniteError, VPLinear, solve, timesteps
from adjointflow.adjoint import Backprop, Checkpoint, ContinuousAdjoint
from solver_list import ALL_SOLVERS


class NaNBelow(torch.nn.Module):
    """Zero output, NaN once the network time drops below ``t_bad``; counts its calls."""

    def __init__(self, t_bad):
        super().__init__()
        self.t_bad, self.calls = t_bad, 0
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        self.calls += 1
        out = self.w * torch.zeros_like(x)
        return out + float("nan") if float(t[0]) < self.t_bad else out


def grid10():
    return timesteps(VPLinear(), 10, "uniform", t_start=1.0, t_end=0.05)  # 1.0, 0.905, ..., 0.43 is grid[6]


def test_check_finite_values():
    den = Denoiser(NaNBelow(-1.0), VPLinear(), "eps")
    for bad in ("deferred", 1, None, "STEP", 0):
        with pytest.raises(ValueError, match="check_finite"):
            solve(den, torch.zeros(2, 3), grid10(), af.Euler(), check_finite=bad)


@pytest.mark.parametrize("check, calls", [(True, 10 + 7), ("step", 7)], ids=["deferred", "step"])
@pytest.mark.parametrize("gradient", [Backprop(), Checkpoint(), ContinuousAdjoint()], ids=repr)
def test_model_nan_is_named(gradient, check, calls):
    net = NaNBelow(0.5)
    den = Denoiser(net, VPLinear(), "eps")
    x = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(NonFiniteError, match=r"model returned NaN/Inf at step 6 \(t=0\.43\)") as e:
        solve(den, x, grid10(), af.Euler(), gradient=gradient, check_finite=check)
    assert e.value.step == 6 and abs(e.value.t - 0.43) < 1e-12
    # deferred: the loop ran to the end and its final state was checked once; only because it was bad, a
    # rerun checking every step stopped at the bad evaluation (steps 0..6). "step": the loop stopped there
    assert net.calls == calls


@pytest.mark.parametrize("sid,factory", [(s[0], s[1]) for s in ALL_SOLVERS], ids=[s[0] for s in ALL_SOLVERS])
@pytest.mark.parametrize("t_bad", [0.5, 0.6])
def test_final_state_witnesses_every_step(sid, factory, t_bad):
    # what the deferred check rests on: a bad evaluation reaches the state of its own step and every later
    # state, for every solver (t_bad = 0.5 / 0.6 hit Heun's and the singlestep solvers' inner evaluations
    # differently); the deferred error then names the same step as the per-step check
    den = Denoiser(NaNBelow(t_bad), VPLinear(), "eps")
    sol = solve(den, torch.zeros(2, 3), grid10(), factory(), check_finite=False, save_trajectory=True)
    bad = [not bool(torch.isfinite(s).all()) for s in sol.trajectory[1:]]
    first = bad.index(True)
    assert all(bad[first:])
    errors = {}
    for check in (True, "step"):
        with pytest.raises(NonFiniteError, match="model returned") as e:
            solve(den, torch.zeros(2, 3), grid10(), factory(), check_finite=check)
        errors[check] = (e.value.step, e.value.t)
    assert errors[True] == errors["step"] and errors[True][0] == first


class NaNOnce(torch.nn.Module):
    """NaN from its first call below ``t_bad`` on, in the first solve only (not deterministic)."""

    def __init__(self, t_bad):
        super().__init__()
        self.t_bad, self.solves = t_bad, 0

    def forward(self, x, t):
        if float(t[0]) >= 0.99:
            self.solves += 1
        bad = self.solves == 1 and float(t[0]) < self.t_bad
        return torch.zeros_like(x) + (float("nan") if bad else 0.0)


def test_nondeterministic_nan_is_reported_not_hidden():
    den = Denoiser(NaNOnce(0.5), VPLinear(), "eps")
    with pytest.raises(NonFiniteError, match=r"NaN/Inf in the state after step 9 .*rerun checking every step \(eager\) "
                       r"stayed finite, so the model or the callback is not deterministic") as e:
        solve(den, torch.zeros(2, 3), grid10(), af.Euler())
    assert e.value.step == 9


def test_record_without_locate():
    from adjointflow.finite import FiniteRecord

    rec = FiniteRecord(True)
    rec.model(torch.ones(3), 0.9)
    rec.end_step(0, 0.5, torch.ones(3), start=0.9)
    rec.model(torch.full((3,), math.nan), 0.5)  # an evaluation after the last step: witnessed by the check
    with pytest.raises(NonFiniteError, match=r"model returned NaN/Inf \(t=0\.5\)"):
        rec.check()
    rec = FiniteRecord(True)
    rec.model(torch.ones(3), 0.9)
    rec.end_step(0, 0.5, torch.full((3,), math.inf), start=0.9)
    with pytest.raises(NonFiniteError, match=r"NaN/Inf in the state after step 0 \(ending at t=0\.5\); "
                       r"check_finite='step' checks every step"):
        rec.check()


def test_step_mode_raises_before_later_steps_run():
    net = NaNBelow(0.5)
    den = Denoiser(net, VPLinear(), "eps")
    with pytest.raises(NonFiniteError, match=r"step 6 \(t=0\.43\)"):
        solve(den, torch.zeros(2, 3), grid10(), af.Euler(), check_finite="step")
    assert net.calls == 7


def test_off_returns_the_nan():
    den = Denoiser(NaNBelow(0.5), VPLinear(), "eps")
    out = solve(den, torch.zeros(2, 3), grid10(), af.Euler(), check_finite=False).x
    assert torch.isnan(out).all()


def test_heun_names_the_time_of_the_bad_evaluation():
    # Heun's second evaluation of step 5 is at t_6 = 0.43: the time named is that evaluation's
    den = Denoiser(NaNBelow(0.5), VPLinear(), "eps")
    with pytest.raises(NonFiniteError, match=r"model returned NaN/Inf at step 5 \(t=0\.43\)"):
        solve(den, torch.zeros(2, 3), grid10(), af.Heun())


def test_update_nan_is_told_apart_from_the_model():
    den = Denoiser(NaNBelow(-1.0), VPLinear(), "eps")

    def cb(info):
        return torch.full_like(info.x_next, math.inf) if info.i == 3 else None

    with pytest.raises(NonFiniteError, match=r"solver update produced NaN/Inf at step 3 \(t=0\.62\)") as e:
        solve(den, torch.zeros(2, 3), grid10(), af.DPMSolverPP(), callback=cb)
    assert e.value.step == 3


class NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class NaNGradBelow(torch.nn.Module):
    """Finite outputs; NaN vector-Jacobian products below ``t_bad``."""

    def __init__(self, t_bad):
        super().__init__()
        self.t_bad = t_bad
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        y = self.w * x
        return NaNGrad.apply(y) if float(t[0]) < self.t_bad else y


def test_adjoint_pass_nan_is_named_after_the_backward():
    den = Denoiser(NaNGradBelow(0.3), VPLinear(), "x0")
    x = torch.randn(2, 3, requires_grad=True)
    out = solve(den, x, grid10(), af.DDIM(), gradient=ContinuousAdjoint()).x
    with pytest.raises(NonFiniteError, match=r"adjoint became NaN/Inf at step 9 \(t=0\.145\)") as e:
        out.sum().backward()
    assert e.value.step == 9
