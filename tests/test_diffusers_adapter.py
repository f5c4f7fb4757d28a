"""``Denoiser.from_diffusers``: schedule / prediction / timestep mapping against diffusers itself,
gradients through a wrapped ``UNet2DModel``, and DPM-Solver++(2M) against diffusers' scheduler."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import adjointflow as af
from adjointflow.diffusers_adapter import from_diffusers, schedule_from_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)

N_TRAIN = 1000


def tiny_unet(seed=0):
    """A randomly initialised 8x8 UNet2DModel (~40k parameters), built offline."""
    torch.manual_seed(seed)
    net = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return net.eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.mark.parametrize("ptype", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("k", [0, 137, 999])
def test_x0_matches_diffusers_pred_original_sample(unet, ptype, k):
    """At our t = (k+1)/N the wrapped model sees timestep k and its x0 equals diffusers' Tweedie
    estimate ``pred_original_sample`` from the same model output (so schedule, prediction type and
    timestep are all mapped right)."""
    sch = DDPMScheduler(num_train_timesteps=N_TRAIN, prediction_type=ptype, clip_sample=False)
    den = af.Denoiser.from_diffusers(unet, sch)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        ours = den(x, (k + 1) / N_TRAIN).x0
        out = unet(x, torch.full((3,), k)).sample
        ref = sch.step(out, k, x, generator=g).pred_original_sample
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert den.prediction == {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[ptype]


def test_schedule_is_the_alphas_cumprod_table():
    for sch in (DDPMScheduler(beta_schedule="scaled_linear"), DDIMScheduler(beta_schedule="squaredcos_cap_v2")):
        s = schedule_from_diffusers(sch)
        assert isinstance(s, af.VPDiscrete)
        k = torch.arange(N_TRAIN, dtype=torch.float64)
        ac = sch.alphas_cumprod.double()
        torch.testing.assert_close(s.alpha((k + 1) / N_TRAIN) ** 2, ac, rtol=1e-12, atol=0)
        torch.testing.assert_close(s.timestep((k + 1) / N_TRAIN), k, rtol=0, atol=1e-9)


def test_config_dict_equals_scheduler_object():
    sch = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    a = schedule_from_diffusers(sch)
    b = schedule_from_diffusers(dict(sch.config))
    torch.testing.assert_close(a.alphas_cumprod, b.alphas_cumprod, rtol=0, atol=0)


def test_flow_matching_scheduler_maps_to_linear_flow(unet):
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N_TRAIN, shift=3.0)
    den = from_diffusers(unet, sch)
    assert isinstance(den.schedule, af.LinearFlow) and den.prediction == "velocity"
    x = torch.randn(2, 1, 8, 8)
    sigma = 0.3
    with torch.no_grad():
        out = unet(x, torch.full((2,), sigma * N_TRAIN)).sample
        # diffusers' flow Euler step: x_next = x + (sigma_next - sigma) * model_output
        torch.testing.assert_close(den(x, sigma).velocity, out)


def test_prediction_override_and_bad_inputs(unet):
    den = from_diffusers(unet, DDPMScheduler(), prediction="x0")
    assert den.prediction == "x0"
    with pytest.raises(ValueError, match="prediction type"):
        from_diffusers(unet, DDPMScheduler(), prediction="noise")
    with pytest.raises(TypeError, match="scheduler"):
        from_diffusers(unet, object())
    with pytest.raises(TypeError, match="callable"):
        from_diffusers(42, DDPMScheduler())
    bad = dict(DDPMScheduler().config)
    bad["prediction_type"] = "banana"
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(unet, bad)


def test_clear_import_error_without_diffusers(monkeypatch, unet):
    sch = DDPMScheduler()
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'adjointflow\[diffusers\]'"):
        af.Denoiser.from_diffusers(unet, sch)


def _gradient_check(strategy):
    """d loss / d (latent, UNet weights) through a wrapped UNet under ``strategy`` equals plain backprop."""
    unet = tiny_unet(seed=1)
    den = af.Denoiser.from_diffusers(unet, DDPMScheduler(num_train_timesteps=N_TRAIN))
    grid = af.timesteps(den.schedule, 4, t_start=1.0, t_end=0.02)
    x1 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    w = unet.conv_out.weight
    grads = []
    for gradient in (af.Backprop(), strategy):
        x = x1.clone().requires_grad_(True)
        sol = af.solve(den, x, grid, af.Heun(), gradient=gradient)
        loss = (sol.x**2).mean()
        gx, gw = torch.autograd.grad(loss, (x, w))
        assert torch.isfinite(gx).all() and gx.abs().max() > 0 and gw.abs().max() > 0
        grads.append((gx, gw))
    (gx0, gw0), (gx1, gw1) = grads
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-6)


def test_gradients_flow_through_wrapped_unet_backprop():
    """Backprop's d loss / d (latent, UNet weight) through a wrapped float64 UNet equals central finite
    differences along random directions (the reference the other strategies are compared with)."""
    unet = tiny_unet(seed=1).double()
    den = af.Denoiser.from_diffusers(unet, DDPMScheduler(num_train_timesteps=N_TRAIN))
    grid = af.timesteps(den.schedule, 4, t_start=1.0, t_end=0.02)
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    w = unet.conv_out.weight
    dx, dw = torch.randn(x1.shape, generator=g, dtype=x1.dtype), torch.randn(w.shape, generator=g, dtype=w.dtype)

    def loss(x):
        return (af.solve(den, x, grid, af.Heun(), gradient=af.Backprop()).x ** 2).mean()

    x = x1.clone().requires_grad_(True)
    gx, gw = torch.autograd.grad(loss(x), (x, w))
    h = 1e-5
    with torch.no_grad():
        fd_x = (loss(x1 + h * dx) - loss(x1 - h * dx)) / (2 * h)
        w0 = w.detach().clone()
        w.copy_(w0 + h * dw)
        up = loss(x1)
        w.copy_(w0 - h * dw)
        down = loss(x1)
        w.copy_(w0)
    fd_w = (up - down) / (2 * h)
    assert abs(float(fd_x)) > 1e-4 and abs(float(fd_w)) > 1e-4  # both directions matter
    torch.testing.assert_close((gx * dx).sum(), fd_x, rtol=1e-6, atol=0)
    torch.testing.assert_close((gw * dw).sum(), fd_w, rtol=1e-6, atol=0)


def test_gradients_flow_through_wrapped_unet_checkpoint():
    from adjointflow.adjoint import Checkpoint

    _gradient_check(Checkpoint())


def _diffusers_dpmpp2m(unet, sch, x):
    with torch.no_grad():
        for k in sch.timesteps:
            x = sch.step(unet(x, k).sample, k, x).prev_sample
    return x


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("n", [5, 12, 20])
def test_dpmsolverpp2m_matches_diffusers_multistep_scheduler(unet, ptype, n):
    """Our DPMSolverPP(order=2) on the wrapped UNet, on diffusers' own grid (t = (k+1)/N for its
    timesteps k, then t = 0 for ``final_sigmas_type="zero"``), equals diffusers'
    DPMSolverMultistepScheduler (dpmsolver++, midpoint, lower_order_final) to float32 precision."""
    from adjointflow.solvers import DPMSolverPP

    sch = DPMSolverMultistepScheduler(num_train_timesteps=N_TRAIN, solver_order=2, algorithm_type="dpmsolver++",
                                      solver_type="midpoint", prediction_type=ptype)
    sch.set_timesteps(n)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(n))
    ref = _diffusers_dpmpp2m(unet, sch, x.clone())
    den = af.Denoiser.from_diffusers(unet, sch)
    grid = torch.cat([(sch.timesteps.double() + 1) / N_TRAIN, torch.zeros(1, dtype=torch.float64)])
    with torch.no_grad():
        sol = af.solve(den, x, grid, DPMSolverPP(order=2))
    assert sol.nfe == n
    scale = float(ref.abs().max())
    # float32: the model output is identical, the coefficients differ by rounding (ours float64)
    torch.testing.assert_close(sol.x, ref, rtol=1e-5, atol=2e-6 * scale)
    if ptype == "epsilon":
        # the comparison can fail: the network one timestep off (N t instead of N t - 1) is detected
        off = af.Denoiser(unet, den.schedule, "eps", net_time=lambda t: t * N_TRAIN)
        with torch.no_grad():
            wrong = af.solve(off, x, grid, DPMSolverPP(order=2)).x
        assert float((wrong - ref).abs().max()) > 100 * 2e-6 * scale


def test_unsupported_schedulers_are_refused(unet):
    # Review regressions: these used to fall back to a default linear-beta VPDiscrete table and feed the
    # network integer timesteps it was never trained on.
    from diffusers import EDMEulerScheduler, EulerDiscreteScheduler, ScoreSdeVeScheduler

    for sched, match in [
        (EDMEulerScheduler(), "EDM"),
        (ScoreSdeVeScheduler(), "VE"),
        (EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction"), "continuous"),
        (DDPMScheduler(variance_type="learned_range"), "learned_range"),
        (DDPMScheduler(rescale_betas_zero_snr=True), "zero terminal SNR"),
    ]:
        with pytest.raises(ValueError, match=match):
            from_diffusers(unet, sched)


def test_net_time_override(unet):
    den = from_diffusers(unet, FlowMatchEulerDiscreteScheduler(), net_time=lambda t: t)
    assert float(den.network_time(torch.tensor(0.5, dtype=torch.float64), torch.zeros(2, 1, 8, 8))[0]) == 0.5
