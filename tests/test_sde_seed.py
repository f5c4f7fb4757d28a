"""SDE sampling without an explicit noise follows torch.manual_seed (the default Brownian path is
seeded from torch's global generator), for solve and for the guidance methods that sample an SDE."""
import torch

import adjointflow as af
from adjointflow.guidance import DPS, MeasurementLoss, Inpaint
from adjointflow.testing import GaussianData

D = torch.float64


def _setup():
    data = GaussianData(torch.zeros(3, dtype=D), torch.full((3,), 0.7, dtype=D))
    den = data.denoiser(af.VPLinear(), "eps")
    x = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    return den, x, af.timesteps(den.schedule, 8)


def test_solve_follows_manual_seed():
    den, x, grid = _setup()
    for solver in (af.EulerMaruyama(), af.SDEDPMSolverPP(order=2)):
        torch.manual_seed(0)
        a = af.solve(den, x, grid, solver).x
        b = af.solve(den, x, grid, solver).x          # the generator moved on: another path
        torch.manual_seed(0)
        c = af.solve(den, x, grid, solver).x
        torch.manual_seed(1)
        d = af.solve(den, x, grid, solver).x
        assert torch.equal(a, c)
        assert not torch.allclose(a, b) and not torch.allclose(a, d)


def test_default_noise_equals_a_brownian_noise_with_the_drawn_seed():
    den, x, grid = _setup()
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    explicit = af.solve(den, x, grid, af.EulerMaruyama(), noise=af.BrownianNoise(x.shape, seed=seed, dtype=D)).x
    torch.manual_seed(3)
    assert torch.equal(af.solve(den, x, grid, af.EulerMaruyama()).x, explicit)


def test_dps_with_an_sde_solver_follows_manual_seed():
    den, x, _ = _setup()
    op = Inpaint(torch.tensor([1.0, 0.0, 1.0]))
    obj = MeasurementLoss(op, torch.tensor([0.3, 0.0, -0.2], dtype=D), sigma=0.1)
    method = DPS(solver=af.EulerMaruyama(), steps=6)
    torch.manual_seed(7)
    a = method.run(den, obj, x).x
    torch.manual_seed(7)
    b = method.run(den, obj, x).x
    torch.manual_seed(8)
    c = method.run(den, obj, x).x
    assert torch.equal(a, b) and not torch.allclose(a, c)
