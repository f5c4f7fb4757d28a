"""Pixel-space inverse problems on latent models: DPS, FlowChef, D-Flow and AdjointGuidance with
``decoded(MeasurementLoss(...), pm.decode)`` on the tiny SD (inpainting) and SD3 (2x super-resolution)
pipelines, each lowering the pixel-space loss below the unguided sample's; Checkpoint keeps the
activation memory flat in the number of steps through the UNet, CFG and the VAE decoder."""
import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import adjointflow as af  # noqa: E402
from adjointflow.adjoint import Backprop, Checkpoint, PeakMemory  # noqa: E402
from adjointflow.guidance import DPS, AdjointGuidance, DFlow, Downsample, FlowChef, Inpaint, MeasurementLoss  # noqa: E402
from adjointflow.integrations import from_pipeline  # noqa: E402
from adjointflow.integrations.latent_objectives import decoded  # noqa: E402
from adjointflow.integrations.tiny_pipelines import (  # noqa: E402
    POOLED_DIM, TEXT_DIM, tiny_sd3_pipeline, tiny_sd_pipeline)

B, STEPS = 2, 4


@functools.lru_cache(maxsize=None)
def problem(which):
    """Pipeline model, cond, start latents and the pixel-space loss of a measurement of a model sample."""
    g = torch.Generator().manual_seed(1)
    emb, neg = torch.randn(B, 5, TEXT_DIM, generator=g), torch.randn(B, 5, TEXT_DIM, generator=g)
    if which == "sd":
        pm = from_pipeline(tiny_sd_pipeline())
        cond, op = pm.cond(emb, neg), Inpaint((torch.rand(1, 16, 16, generator=g) > 0.5).float())
    else:
        pm = from_pipeline(tiny_sd3_pipeline())
        pool = torch.randn(B, POOLED_DIM, generator=g), torch.randn(B, POOLED_DIM, generator=g)
        cond, op = pm.cond(emb, neg, *pool), Downsample(2)
    grid = pm.grid(STEPS)
    with torch.no_grad():
        truth = pm.decode(af.solve(pm.denoiser, torch.randn(pm.latent_shape(B), generator=g), grid, pm.solver(),
                                   cond=cond).x)
    pixel_loss = MeasurementLoss(op, op(truth), sigma=0.05)
    z = torch.randn(pm.latent_shape(B), generator=g)
    return pm, cond, grid, z, pixel_loss


@pytest.fixture(scope="module", params=["sd", "sd3"])
def latent_problem(request):
    return (request.param, *problem(request.param))


def methods(pm, grid):
    return {
        "DPS": DPS(solver=pm.solver(), grid=grid, scale=0.5),
        "FlowChef": FlowChef(grid=grid, lr=0.05),
        "DFlow": DFlow(solver=pm.solver(), grid=grid, iterations=1, max_iter=2),
        "AdjointGuidance": AdjointGuidance(solver=pm.solver(), grid=grid, iterations=2, lr=0.1),
    }


@pytest.mark.parametrize("method", ["DPS", "FlowChef", "DFlow", "AdjointGuidance"])
def test_guidance_through_the_vae_lowers_the_pixel_loss(latent_problem, method):
    which, pm, cond, grid, z, pixel_loss = latent_problem
    with torch.no_grad():
        unguided = float(pixel_loss(pm.decode(af.solve(pm.denoiser, z, grid, pm.solver(), cond=cond).x)).mean())
    res = methods(pm, grid)[method].run(pm.denoiser, decoded(pixel_loss, pm.decode), z, cond=cond)
    assert res.x.shape == pm.latent_shape(B)
    with torch.no_grad():
        guided = float(pixel_loss(pm.decode(res.x)).mean())
    assert guided == pytest.approx(float(res.losses[-1].mean()), rel=1e-5)  # the reported loss is the pixel loss
    assert guided < 0.97 * unguided, f"{which} {method}: {guided:.1f} vs unguided {unguided:.1f}"


def test_decoded_objective_forwards_residual_norm_and_time():
    obj = decoded(MeasurementLoss(Inpaint(torch.ones(3, 4, 4)), torch.zeros(3, 4, 4), sigma=0.5), lambda z: 2 * z)
    z = torch.ones(1, 3, 4, 4)
    assert float(obj(z)[0]) == pytest.approx(0.5 * 48 * 4 / 0.25)
    assert float(obj.residual_norm(z)[0]) == pytest.approx((48 * 4) ** 0.5)
    assert not hasattr(decoded(lambda x: x.sum((1, 2, 3)), lambda z: z), "residual_norm")

    class TimeLoss:
        time_dependent = True

        def __call__(self, x, t):
            return x.flatten(1).sum(1) * t

    assert float(decoded(TimeLoss(), lambda z: z)(z, 0.5)[0]) == 24.0
    with pytest.raises(TypeError, match="instance"):
        decoded(MeasurementLoss, lambda z: z)
    with pytest.raises(TypeError, match="decode"):
        decoded(TimeLoss(), 3)


def _peak(pm, cond, z, pixel_loss, n, strategy):
    grid = pm.grid(n)
    x = z.clone().requires_grad_(True)
    with PeakMemory() as m:
        out = af.solve(pm.denoiser, x, grid, pm.solver(), cond=cond, gradient=strategy).x
        (g,) = torch.autograd.grad(decoded(pixel_loss, pm.decode)(out).sum(), x)
    assert torch.isfinite(g).all() and g.abs().max() > 0
    return m.peak


def test_checkpoint_memory_is_flat_in_steps_through_unet_and_vae():
    """Peak live bytes of one gradient of the decoded pixel loss: Checkpoint keeps the states and one
    step's graph (UNet with CFG, or the VAE decoder), so going from N = 2 to N = 6 steps barely moves it,
    while Backprop keeps every step's graph."""
    pm, cond, _, z, pixel_loss = problem("sd")
    ck2, ck6 = (_peak(pm, cond, z, pixel_loss, n, Checkpoint()) for n in (2, 6))
    bp2, bp6 = (_peak(pm, cond, z, pixel_loss, n, Backprop()) for n in (2, 6))
    assert ck6 <= 1.1 * ck2, (ck2, ck6)
    assert bp6 - bp2 >= 10 * (ck6 - ck2), (bp2, bp6, ck2, ck6)
    assert bp6 >= 1.5 * bp2
