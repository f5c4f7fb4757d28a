import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adjointflow import ClassifierFreeGuidance, Denoiser, LinearFlow, VPLinear
from adjointflow.models import PREDICTIONS, Coefficients, convert
from adjointflow.testing import GaussianData
from adjointflow.testing.strategies import predictions, schedules, shapes, times


@settings(max_examples=80, deadline=None)
@given(schedules(), times(), predictions(), predictions(), shapes(), st.integers(0, 2**31 - 1))
def test_conversions_are_mutual_inverses(sch, t, a, b, shape, seed):
    g = torch.Generator().manual_seed(seed)
    x, raw = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    c = Coefficients.at(sch, t, x)
    back = convert(convert(raw, a, b, x, c), b, a, x, c)
    assert torch.allclose(back, raw, rtol=1e-8, atol=1e-8 * (1 + raw.abs().max()))


@settings(max_examples=40, deadline=None)
@given(schedules(), times(), predictions())
def test_velocity_is_the_pf_ode_drift(sch, t, kind):
    # Every prediction type must give the same PF-ODE drift f x + g^2/(2 sigma) eps_hat (Song et al. 2021)
    data = GaussianData(torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0]))
    den = data.denoiser(sch, kind)
    x = torch.tensor([[0.7, -0.2]], dtype=torch.float64)
    pred = den(x, t)
    tt = torch.tensor(t, dtype=torch.float64)
    drift = sch.f(tt) * x + sch.g2(tt) / (2 * sch.sigma(tt)) * pred.eps
    assert torch.allclose(pred.velocity, drift, rtol=1e-8, atol=1e-10)
    assert torch.allclose(pred.x0, data.posterior_mean_x0(sch, x, tt), rtol=1e-8, atol=1e-10)


def test_same_kind_is_returned_bit_exact():
    x = torch.randn(2, 3)
    c = Coefficients.at(VPLinear(), 0.5, x)
    raw = torch.randn(2, 3)
    assert convert(raw, "eps", "eps", x, c) is raw


def test_score_matches_autograd_of_log_density():
    sch, t = VPLinear(), torch.tensor(0.4, dtype=torch.float64)
    data = GaussianData(torch.tensor([0.5, -1.0]), torch.tensor([0.3, 1.5]))
    x = torch.tensor([[0.2, 0.9]], dtype=torch.float64, requires_grad=True)
    m, sd = data.marginal(sch, t, like=x)
    logp = torch.distributions.Normal(m, sd).log_prob(x).sum()
    (g,) = torch.autograd.grad(logp, x)
    assert torch.allclose(data.denoiser(sch, "eps").score(x.detach(), t), g, rtol=1e-10)


class RecordingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, cond=None, **kw):
        self.calls.append((t, cond, kw))
        return torch.zeros_like(x)


def test_denoiser_passes_cond_and_time():
    net = RecordingNet()
    den = Denoiser(net, VPLinear(), "eps", net_time=lambda t: 999 * t)
    x = torch.zeros(3, 2)
    den(x, 0.5)
    den(x, 0.5, torch.ones(3, 4))
    den(x, 0.5, {"y": torch.ones(3), "z": torch.zeros(3)})
    t0, c0, _ = net.calls[0]
    assert t0.shape == (3,) and torch.allclose(t0, torch.full((3,), 499.5))
    assert net.calls[1][1].shape == (3, 4)
    assert set(net.calls[2][2]) == {"y", "z"}


def test_noise_at_zero_flips_time_and_velocity_sign():
    # An independent Lipman-convention flow model (t'=0 noise, t'=1 data, x_t' = t' x1 + (1-t') x0 with data x1 ~
    # N(m, s^2) and noise x0 ~ N(0, 1)): u'(x, t') = E[x1 - x0 | x_t' = x] written from scratch in t'.
    m, s2 = 1.0, 0.25

    class Lipman(torch.nn.Module):
        def forward(self, x, tp):
            tp = tp[:, None]
            var = tp**2 * s2 + (1 - tp) ** 2
            e_x1 = m + tp * s2 / var * (x - tp * m)
            e_x0 = (1 - tp) * (x - tp * m) / var
            return e_x1 - e_x0

    sch = LinearFlow()
    ours = GaussianData(torch.tensor([m], dtype=torch.float64), torch.tensor([s2**0.5], dtype=torch.float64)).denoiser(
        sch, "velocity")
    theirs = Denoiser(Lipman(), sch, "velocity", noise_at_zero=True)
    x = torch.tensor([[0.3], [-1.2]], dtype=torch.float64)
    for t in (0.1, 0.3, 0.9):
        assert torch.allclose(theirs(x, t).velocity, ours(x, t).velocity, atol=1e-14)
    # without the flag the same network is wrong (the test can fail)
    assert not torch.allclose(Denoiser(Lipman(), sch, "velocity")(x, 0.3).velocity, ours(x, 0.3).velocity)


def test_denoiser_validation():
    with pytest.raises(ValueError, match="unknown prediction"):
        Denoiser(RecordingNet(), VPLinear(), "noise")
    with pytest.raises(TypeError, match="NoiseSchedule"):
        Denoiser(RecordingNet(), "vp", "eps")
    with pytest.raises(TypeError, match="class"):
        Denoiser(RecordingNet, VPLinear(), "eps")
    with pytest.raises(TypeError, match="callable"):
        Denoiser(3, VPLinear(), "eps")

    class Bad(torch.nn.Module):
        def forward(self, x, t):
            return x[:, :1]

    with pytest.raises(ValueError, match="shape"):
        Denoiser(Bad(), VPLinear(), "eps")(torch.zeros(2, 3), 0.5)


def test_classifier_free_guidance():
    class Net(torch.nn.Module):
        def forward(self, x, t, c):
            return x * 0 + c[:, None].to(x.dtype)

    cfg = ClassifierFreeGuidance(Net(), scale=3.0, null_cond=0)
    out = cfg(torch.zeros(2, 4), torch.zeros(2), torch.tensor([1, 2]))
    # u + 3 (c - u) with u = 0
    assert torch.allclose(out, torch.tensor([[3.0] * 4, [6.0] * 4]))
    with pytest.raises(ValueError):
        cfg(torch.zeros(2, 4), torch.zeros(2))
