"""Checkpoint(keep=k): bit-identical to Backprop for every k, recomputes only the dropped steps, replays a
network's randomness, and refuses bad arguments."""
import pytest
import torch
from torch import nn

import adjointflow as af
from adjointflow.adjoint import Backprop, Checkpoint, PeakMemory


class Net(nn.Module):
    def __init__(self, p_drop=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 2, 3, padding=1)
        self.drop = nn.Dropout(p_drop)
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.c2(self.drop(torch.tanh(self.c1(x) + t[:, None, None, None])))


def grads(net, strategy, n=8, solver=None, seed=None):
    den = af.Denoiser(net, af.VPLinear(), "eps")
    x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    if seed is not None:
        torch.manual_seed(seed)
    # t_start=0.8: lambda steps <= 1 at 8 steps, where 3M takes its 2S warm-up step (multistep_orders)
    grid = af.timesteps(den.schedule, n, t_start=0.8)
    out = af.solve(den, x, grid, solver or af.DPMSolverPP(order=3), gradient=strategy).x
    return torch.autograd.grad((out * out).sum(), [x, *net.parameters()])


@pytest.mark.parametrize("keep", [0, 1, 3, 8, 20])
def test_keep_is_bit_identical_to_backprop_and_recomputes_the_rest(keep):
    ref = grads(Net(), Backprop())
    net = Net()
    got = grads(net, Checkpoint(keep=keep))
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    nfe = 8 + 1  # DPM++(3M) with its 2S warm-up step: 9 evaluations in the forward pass
    recomputed = {0: 9, 1: 8, 3: 6, 8: 0, 20: 0}[keep]  # the dropped steps' evaluations again
    assert net.calls == nfe + recomputed


def test_network_randomness_is_replayed():
    ref = grads(Net(p_drop=0.3).train(), Backprop(), seed=5)
    got = grads(Net(p_drop=0.3).train(), Checkpoint(keep=0), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_keep_trades_memory_for_recomputation():
    def peak(strategy):
        net = Net()
        with PeakMemory() as m:
            grads(net, strategy, n=12)
        return m.peak

    p0, p6, p12 = peak(Checkpoint(keep=0)), peak(Checkpoint(keep=6)), peak(Checkpoint(keep=12))
    assert p0 < p6 < p12 and p12 <= 1.05 * peak(Backprop())


@pytest.mark.parametrize("keep", [-1, 1.5, "2", True, None])
def test_bad_keep_is_refused(keep):
    with pytest.raises(ValueError, match="keep"):
        Checkpoint(keep=keep)
