"""PeakMemory (TorchDispatchMode live-storage meter) and the memory classes of the gradient strategies."""
import torch
from torch import nn

import adjointflow as af
from adjointflow.adjoint import Backprop, Checkpoint, ContinuousAdjoint, PeakMemory


def test_peak_memory_counts_live_storage_exactly():
    x = torch.randn(1000, dtype=torch.float64)  # created outside: not counted
    with PeakMemory() as m:
        y = x * 2
        z = y * 3
        assert m.current == m.peak == 16000
        v = z.view(10, 100)[:3]  # a view shares its storage: counted once
        del y
        assert m.current == 8000
        del z
        assert m.current == 8000  # the view keeps the storage alive
        del v
        assert m.current == 0 and m.peak == 16000


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(2, 16, 3, padding=1), nn.Conv2d(16, 2, 3, padding=1)

    def forward(self, x, t):
        return self.c2(torch.tanh(self.c1(x) + t[:, None, None, None]))


def activations(strategy, n, stored_per_point):
    net = Net()
    den = af.Denoiser(net, af.VPLinear(), "eps")
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    with PeakMemory() as m:
        out = af.solve(den, x, af.timesteps(den.schedule, n), af.DPMSolverPP(order=2), gradient=strategy).x
        torch.autograd.grad(out.sum(), [x, *net.parameters()])
    return m.peak - (n + 1) * stored_per_point * x.numel() * x.element_size()


def test_memory_flat_in_steps_for_checkpoint_and_adjoint_linear_for_backprop():
    """Peak live bytes minus the states kept by design: flat in N (<= 1.1x from N = 5 to 40) for Checkpoint
    ((x, history) per grid point) and ContinuousAdjoint (x per grid point); Backprop grows with N."""
    for strategy, stored in ((Checkpoint(), 2), (ContinuousAdjoint(), 1)):
        assert activations(strategy, 40, stored) <= 1.1 * activations(strategy, 5, stored)
    assert activations(Backprop(), 40, 0) >= 5 * activations(Backprop(), 5, 0)
