"""NaN/Inf checks recorded on the device: deferred (default), per step, or off; model vs update; adjoint pass."""
import math

import pytest
import torch

import adjointflow as af
from adjointflow import Denoiser, NonFiniteError, VPLinear, solve, timesteps
from adjointflow.adjoint import Backprop, Checkpoint, ContinuousAdjoint


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


@pytest.mark.parametrize("gradient", [Backprop(), Checkpoint(), ContinuousAdjoint()], ids=repr)
def test_model_nan_is_named_after_the_loop(gradient):
    net = NaNBelow(0.5)
    den = Denoiser(net, VPLinear(), "eps")
    x = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(NonFiniteError, match=r"model returned NaN/Inf at step 6 \(t=0\.43\)") as e:
        solve(den, x, grid10(), af.Euler(), gradient=gradient)
    assert e.value.step == 6 and abs(e.value.t - 0.43) < 1e-12
    assert net.calls == 10  # deferred: the loop ran to the end, the check came once after it


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
