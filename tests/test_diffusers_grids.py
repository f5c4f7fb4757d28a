"""``timesteps_from_diffusers`` against the schedulers' own ``set_timesteps`` over a matrix of configs,
end to end against the schedulers' sampling loops, and the refusals."""
import itertools
import os

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

import adjointflow as af  # noqa: E402
from adjointflow.integrations import timesteps_from_diffusers  # noqa: E402

F64 = torch.float64
N = 1000


def _timesteps_match(grid, sch, n):
    """grid[i] = (k_i + 1)/N for each of the scheduler's timesteps k_i (float64 exact)."""
    m = min(len(grid), n)  # a final zero-length step is left out of the grid
    assert torch.equal(grid[:m] * N - 1, sch.timesteps[:m].to(F64))


DDIM_CASES = [c for c in itertools.product(
    [DDIMScheduler, DDPMScheduler], ["leading", "trailing", "linspace"], [0, 1], [True, False], [1, 4, 10, 50])]


@pytest.mark.parametrize("cls,spacing,offset,alpha_one,n", DDIM_CASES)
def test_ddim_ddpm_grid_matrix(cls, spacing, offset, alpha_one, n):
    kw = {"set_alpha_to_one": alpha_one} if cls is DDIMScheduler else {}
    sch = cls(timestep_spacing=spacing, steps_offset=offset, **kw)
    try:
        grid = timesteps_from_diffusers(sch, n)
    except ValueError as exc:
        # refused exactly when DDIM's step target k - N//n is not the next timestep (or no step remains)
        sch.set_timesteps(n)
        ks = sch.timesteps.tolist()
        assert cls is DDIMScheduler
        assert any(a - N // n != b for a, b in zip(ks, ks[1:])) or len(ks) == 1, exc
        return
    sch.set_timesteps(n)
    _timesteps_match(grid, sch, n)
    # the final point: where the scheduler's last step lands
    if cls is DDPMScheduler:
        assert float(grid[-1]) == 0.0
    else:
        prev = int(sch.timesteps[-1]) - N // n
        final_ac = sch.alphas_cumprod[prev] if prev >= 0 else sch.final_alpha_cumprod
        schedule = af.VPDiscrete(sch.alphas_cumprod)
        last = float(schedule.alpha(grid[-1]) ** 2)
        assert last == pytest.approx(float(final_ac), rel=1e-12, abs=0)


@pytest.mark.parametrize("spacing,final,kind,n", list(itertools.product(
    ["leading", "trailing", "linspace"], ["zero", "sigma_min"],
    [None, "use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas"], [1, 4, 25])))
def test_dpmsolver_grid_matrix(spacing, final, kind, n):
    kw = {kind: True} if kind else {}
    sch = DPMSolverMultistepScheduler(timestep_spacing=spacing, final_sigmas_type=final, steps_offset=1, **kw)
    grid = timesteps_from_diffusers(sch, n)
    sch.set_timesteps(n)
    schedule = af.VPDiscrete(sch.alphas_cumprod)
    ours = torch.where(grid > 0, schedule.sigma_tilde(grid), torch.zeros_like(grid))
    ref = sch.sigmas[: len(grid)].to(F64)  # diffusers keeps float32 sigmas
    torch.testing.assert_close(ours, ref, rtol=3e-7, atol=0)
    if kind is None:
        _timesteps_match(grid, sch, n)
    else:
        # the grid is exact in sigma; diffusers' network time is its own rounded interpolation
        m = min(len(grid), n)
        assert float((grid[:m] * N - 1 - sch.timesteps[:m].to(F64)).abs().max()) < 1.0


def test_dpmsolver_lambda_min_clipped():
    sch = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)
    grid = timesteps_from_diffusers(sch, 10)
    sch.set_timesteps(10)
    assert int(sch.timesteps[0]) < N - 1  # the option is active
    _timesteps_match(grid, sch, 10)


FLOW_CASES = [c for c in itertools.product(
    [1.0, 3.0], [None, "exponential", "linear"], [None, 0.1],
    [None, "use_karras_sigmas", "use_exponential_sigmas"], [1, 4, 28], [False, True]) if not (c[2] and c[4] == 1)]


@pytest.mark.parametrize("shift,dynamic,terminal,kind,n,custom", FLOW_CASES)
def test_flow_match_grid_matrix(shift, dynamic, terminal, kind, n, custom):
    kw = {kind: True} if kind else {}
    sch = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic is not None,
                                          time_shift_type=dynamic or "exponential", shift_terminal=terminal, **kw)
    mu = None if dynamic is None else (0.8 if dynamic == "exponential" else 1.7)
    sigmas = np.linspace(1.0, 1 / n, n) if custom else None
    grid = timesteps_from_diffusers(sch, n, mu=mu, sigmas=sigmas)
    sch.set_timesteps(n, mu=mu, sigmas=sigmas)
    # diffusers computes these sigmas in float32 (ours: float64): agreement to float32 rounding
    torch.testing.assert_close(grid, sch.sigmas.to(F64), rtol=0, atol=2.5e-7)
    torch.testing.assert_close(grid[:-1] * N, sch.timesteps.to(F64), rtol=0, atol=2.5e-7 * N)


def test_config_dict_gives_the_same_grid():
    sch = DDIMScheduler(steps_offset=1, set_alpha_to_one=False, beta_schedule="scaled_linear")
    cfg = dict(sch.config)
    del cfg["timestep_spacing"]  # missing keys take the class defaults ("leading" for DDIM)
    with pytest.raises(ValueError, match="_class_name"):
        timesteps_from_diffusers(cfg, 20)
    cfg["_class_name"] = "DDIMScheduler"
    assert torch.equal(timesteps_from_diffusers(cfg, 20), timesteps_from_diffusers(sch, 20))


# --- end to end: our solver on the grid equals the scheduler's loop -------------------------------
class TanhNet(nn.Module):
    """A fixed nonlinear network f(x, time) (``use_time=False``: independent of the time input)."""

    def __init__(self, dim=6, use_time=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.randn(dim, dim, generator=g, dtype=F64) / dim**0.5
        self.b = torch.randn(dim, generator=g, dtype=F64)
        self.use_time = use_time

    def forward(self, x, k):
        k = torch.as_tensor(k, dtype=F64).reshape(-1, 1) / N if self.use_time else 0.0
        return torch.tanh(x.to(F64) @ self.W.T + self.b * k + 0.3).to(x.dtype)


def _diffusers_loop(sch, net, x, n, **kw):
    sch.set_timesteps(n, **kw)
    for k in sch.timesteps:
        x = sch.step(net(x, k.expand(x.shape[0])), k, x).prev_sample
    return x


@pytest.mark.parametrize("cfg,n", [
    (dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False), 10),   # Stable Diffusion 1.x
    (dict(timestep_spacing="trailing", clip_sample=False), 8),
    (dict(timestep_spacing="leading", set_alpha_to_one=True, clip_sample=False), 4),
])
def test_ddim_solver_on_the_grid_equals_ddim_scheduler(cfg, n):
    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **cfg)
    net = TanhNet()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(n))
    ref = _diffusers_loop(sch, net, x.clone(), n)
    den = af.Denoiser.from_diffusers(net, sch)
    sol = af.solve(den, x, timesteps_from_diffusers(sch, n), af.DDIM())
    assert sol.nfe == n
    torch.testing.assert_close(sol.x, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("kind", ["use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas"])
def test_dpmpp2m_on_sigma_grids_equals_scheduler(kind):
    """Sigma schedules: with a network that ignores its time input (diffusers rounds the timestep), the
    solve on our grid equals diffusers' DPM-Solver++(2M) loop, so the grid is right in sigma."""
    sch = DPMSolverMultistepScheduler(**{kind: True})
    net = TanhNet(use_time=False)
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    ref = _diffusers_loop(sch, net, x.float(), 12).to(F64)
    den = af.Denoiser.from_diffusers(net, sch)
    sol = af.solve(den, x, timesteps_from_diffusers(sch, 12), af.DPMSolverPP(order=2))
    assert float((sol.x - ref).abs().max() / ref.abs().max()) < 2e-6


@pytest.mark.parametrize("kw", [dict(shift=3.0), dict(shift=3.0, use_karras_sigmas=True),
                                dict(use_dynamic_shifting=True, shift_terminal=0.05)])
def test_euler_on_the_grid_equals_flow_match_scheduler(kw):
    sch = FlowMatchEulerDiscreteScheduler(**kw)
    mu = 0.7 if kw.get("use_dynamic_shifting") else None
    net = TanhNet()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    ref = _diffusers_loop(sch, net, x.clone(), 9, mu=mu)
    den = af.Denoiser.from_diffusers(net, sch)
    sol = af.solve(den, x, timesteps_from_diffusers(sch, 9, mu=mu), af.Euler())
    torch.testing.assert_close(sol.x, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


# --- refusals ---------------------------------------------------------------------------------------
def test_refusals_name_the_option():
    cases = [
        (lambda: timesteps_from_diffusers(EulerDiscreteScheduler(), 10), "supports DDIMScheduler"),
        (lambda: timesteps_from_diffusers(DDIMScheduler(timestep_spacing="linspace"), 10), "k - N//n"),
        (lambda: timesteps_from_diffusers(DDIMScheduler(timestep_spacing="trailing"), 7), "no grid reproduces"),
        (lambda: timesteps_from_diffusers(DDIMScheduler(), 0), "positive int"),
        (lambda: timesteps_from_diffusers(DDIMScheduler(), 1001), "exceeds num_train_timesteps"),
        (lambda: timesteps_from_diffusers(DPMSolverMultistepScheduler(use_beta_sigmas=True), 10), "use_beta_sigmas"),
        (lambda: timesteps_from_diffusers(FlowMatchEulerDiscreteScheduler(use_beta_sigmas=True), 10),
         "use_beta_sigmas"),
        (lambda: timesteps_from_diffusers(FlowMatchEulerDiscreteScheduler(invert_sigmas=True), 10), "invert_sigmas"),
        (lambda: timesteps_from_diffusers(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 10), "pass mu"),
        (lambda: timesteps_from_diffusers(FlowMatchEulerDiscreteScheduler(), 10, mu=0.5), "use_dynamic_shifting"),
        (lambda: timesteps_from_diffusers(DDIMScheduler(), 10, sigmas=[1.0] * 10), "custom sigmas"),
        (lambda: timesteps_from_diffusers(FlowMatchEulerDiscreteScheduler(), 4, sigmas=[1.0, 0.5]), "n=4"),
        (lambda: timesteps_from_diffusers(EulerDiscreteScheduler(timestep_type="continuous"), 10), "supports"),
        (lambda: timesteps_from_diffusers(DDIMScheduler(timestep_spacing="banana"), 10), "timestep_spacing"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_scheduler_options_that_change_the_time_input_stay_refused():
    sch = DPMSolverMultistepScheduler(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        timesteps_from_diffusers(sch, 10)
