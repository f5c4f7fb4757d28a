"""DPM-Solver++(2M) against diffusers' ``DPMSolverMultistepScheduler`` on the same time grid.

The model is a ``VPDiscrete`` schedule built from the scheduler's own ``alphas_cumprod``: diffusers'
integer timestep ``k`` is our ``t = (k + 1)/N`` (``VPDiscrete.timestep`` maps back), so the grid is
``t_i = (k_i + 1)/N`` for diffusers' timesteps followed by its final point: ``t = 0`` (``sigma = 0``)
for ``final_sigmas_type="zero"``, ``t = 1/N`` (the table's first entry) for ``"sigma_min"``.
diffusers forces the step to ``sigma = 0`` to first order; ours is first order there by construction
(``h = inf``: only the data-form first-order step has a limit), and both apply the same
``lower_order_final`` rule (< 15 steps: last step first order). diffusers computes in float32
(it upcasts the sample to float32 inside ``step``), so agreement is to float32 precision.
"""
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from adjointflow import Denoiser, DPMSolverPP, VPDiscrete, solve  # noqa: E402

F64 = torch.float64


class TanhEps(nn.Module):
    """A fixed nonlinear noise-prediction network eps(x, k) (so the check is not limited to linear models)."""

    def __init__(self, dim=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(dim, dim, generator=g, dtype=F64) / dim**0.5
        self.b = torch.randn(dim, generator=g, dtype=F64)

    def forward(self, x, k):
        k = torch.as_tensor(k, dtype=F64).reshape(-1, 1) / 1000.0
        return torch.tanh(x.to(F64) @ self.W.T + self.b * k + 0.3).to(x.dtype)


def diffusers_run(sched, net, x, n):
    sched.set_timesteps(n)
    sample = x.to(torch.float32)
    for k in sched.timesteps:
        eps = net(sample, k.expand(sample.shape[0]))
        sample = sched.step(eps, k, sample).prev_sample
    return sample, sched.timesteps


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("n", [5, 10, 20, 25])
def test_dpmpp_2m_matches_diffusers(n, solver_type, final):
    sched = diffusers.DPMSolverMultistepScheduler(
        solver_order=2, algorithm_type="dpmsolver++", solver_type=solver_type, final_sigmas_type=final,
        lower_order_final=True,
    )
    net = TanhEps()
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(n))
    ref, ks = diffusers_run(sched, net, x, n)

    schedule = VPDiscrete(sched.alphas_cumprod)
    N = schedule.num_train_timesteps
    t_final = 0.0 if final == "zero" else 1.0 / N
    grid = torch.cat([(ks.to(F64) + 1.0) / N, torch.tensor([t_final], dtype=F64)])
    den = Denoiser(net, schedule, "eps", net_time=schedule.timestep)
    with torch.no_grad():
        sol = solve(den, x, grid, DPMSolverPP(order=2, solver_type=solver_type, lower_order_final=True))
    assert sol.nfe == n
    # measured: relative differences <= 5.3e-7 (float32 rounding); swapping midpoint/heun changes the
    # result by 1.5-4.9 on outputs of size ~450, a first-order solver by ~20
    err = (sol.x - ref.to(F64)).abs().max() / ref.abs().max()
    assert err <= 2e-6, f"max |ours - diffusers| / max |diffusers| = {float(err):.2e}"


def test_grid_mapping_hits_the_table():
    """t = (k + 1)/N gives exactly the table's alpha: alpha(t)^2 == alphas_cumprod[k]."""
    sched = diffusers.DPMSolverMultistepScheduler()
    schedule = VPDiscrete(sched.alphas_cumprod)
    k = torch.tensor([0, 1, 499, 998, 999])
    t = (k.to(F64) + 1) / schedule.num_train_timesteps
    assert torch.allclose(schedule.alpha(t) ** 2, sched.alphas_cumprod[k].to(F64), rtol=1e-12, atol=0)
    assert torch.allclose(schedule.timestep(t), k.to(F64), rtol=0, atol=1e-9)
