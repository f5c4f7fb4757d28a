"""``from_pipeline`` on tiny random-weight SD / SD3 / Flux pipelines: our solve on the pipeline's grid
with the matching solver reproduces ``pipe(..., latents=..., output_type="latent")``; the VAE wrappers
reproduce the pipeline's images; gradients through ``decode`` against float64 finite differences;
bad input."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # diffusers' pipeline classes need it (no text encoder is built)

import adjointflow as af  # noqa: E402
from adjointflow.integrations.diffusers_pipelines import _pack, _unpack, from_pipeline  # noqa: E402
from adjointflow.integrations.tiny_pipelines import (  # noqa: E402
    POOLED_DIM, TEXT_DIM, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline)

B = 2


def embeds(seed=0, length=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, length, TEXT_DIM, generator=g), torch.randn(B, length, TEXT_DIM, generator=g),
            torch.randn(B, POOLED_DIM, generator=g), torch.randn(B, POOLED_DIM, generator=g))


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _dpm():
    return diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 steps_offset=1)


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


@pytest.mark.parametrize("scheduler,n", [(None, 5), (None, 12), ("dpm", 6), ("dpm", 12)])
def test_sd_pipeline_is_reproduced(scheduler, n):
    pipe = tiny_sd_pipeline(_dpm() if scheduler == "dpm" else None)
    pm = from_pipeline(pipe, guidance_scale=4.0)
    assert isinstance(pm.solver(), af.DDIM if scheduler is None else af.DPMSolverPP)
    emb, neg, _, _ = embeds()
    x = torch.randn(pm.latent_shape(B), generator=torch.Generator().manual_seed(n))
    ref = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, latents=x, output_type="latent",
               num_inference_steps=n, guidance_scale=4.0).images
    with torch.no_grad():
        sol = af.solve(pm.denoiser, x, pm.grid(n), pm.solver(), cond=pm.cond(emb, neg))
    assert sol.nfe == n
    assert rel(sol.x, ref) <= 1e-5
    if n == 5:
        # the comparison can fail: another guidance scale is far off
        other = from_pipeline(pipe, guidance_scale=3.0)
        with torch.no_grad():
            wrong = af.solve(other.denoiser, x, pm.grid(n), pm.solver(), cond=pm.cond(emb, neg)).x
        assert rel(wrong, ref) > 100 * 1e-5


@pytest.mark.parametrize("dynamic", [False, True])
def test_sd3_pipeline_is_reproduced(dynamic):
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic)
    pipe = tiny_sd3_pipeline(sch)
    pm = from_pipeline(pipe)  # the pipeline's default guidance scale (7.0)
    assert isinstance(pm.solver(), af.Euler) and (pm.mu is not None) == dynamic
    emb, neg, pool, npool = embeds(1)
    x = torch.randn(pm.latent_shape(B), generator=torch.Generator().manual_seed(3))
    ref = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, pooled_prompt_embeds=pool,
               negative_pooled_prompt_embeds=npool, latents=x, output_type="latent", num_inference_steps=6).images
    with torch.no_grad():
        sol = af.solve(pm.denoiser, x, pm.grid(6), pm.solver(), cond=pm.cond(emb, neg, pool, npool))
    assert rel(sol.x, ref) <= 1e-5


@pytest.mark.parametrize("true_cfg", [1.0, 2.5])
def test_flux_pipeline_is_reproduced(flux, true_cfg):
    pm = from_pipeline(flux, height=16, width=16, true_cfg_scale=true_cfg)
    emb, neg, pool, npool = embeds(2)
    x = torch.randn(pm.latent_shape(B), generator=torch.Generator().manual_seed(4))
    kw = dict(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=npool) if true_cfg > 1 else {}
    ref = flux(prompt_embeds=emb, pooled_prompt_embeds=pool, latents=x, output_type="latent", num_inference_steps=6,
               height=16, width=16, true_cfg_scale=true_cfg, **kw).images
    with torch.no_grad():
        sol = af.solve(pm.denoiser, x, pm.grid(6), pm.solver(),
                       cond=pm.cond(emb, kw.get("negative_prompt_embeds"), pool, kw.get("negative_pooled_prompt_embeds")))
    assert rel(sol.x, ref) <= 1e-5


@pytest.mark.parametrize("which", ["sd", "sd3", "flux"])
def test_decode_gives_the_pipelines_images(which, sd, sd3, flux):
    """decode(solve(...)) mapped to [0, 1] is the pipeline's own image output (scaling, shift, packing)."""
    pipe = {"sd": sd, "sd3": sd3, "flux": flux}[which]
    size = dict(height=16, width=16)
    pm = from_pipeline(pipe, **size)
    emb, neg, pool, npool = embeds(5)
    x = torch.randn(pm.latent_shape(B), generator=torch.Generator().manual_seed(5))
    kw = dict(prompt_embeds=emb)
    if which != "flux":
        kw["negative_prompt_embeds"] = neg
    if which != "sd":
        kw["pooled_prompt_embeds"] = pool
    if which == "sd3":
        kw["negative_pooled_prompt_embeds"] = npool
    ref = pipe(latents=x, output_type="pt", num_inference_steps=3, **kw, **size).images
    with torch.no_grad():
        z = af.solve(pm.denoiser, x, pm.grid(3), pm.solver(), cond=pm.cond(**kw)).x
        img = (pm.decode(z) / 2 + 0.5).clamp(0, 1)
    assert img.shape == (B, 3, 16, 16)
    torch.testing.assert_close(img, ref, rtol=0, atol=1e-5)


def test_encode_is_the_scaled_shifted_posterior_mean(sd3, flux):
    img = torch.rand(B, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    for pipe in (sd3, flux):
        pm = from_pipeline(pipe, height=16, width=16)
        s, b = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
        assert b != 0  # the shift is exercised
        with torch.no_grad():
            mean = pipe.vae.encode(img).latent_dist.mean
            z = pm.encode(img)
        assert z.shape == pm.latent_shape(B)
        zz = _unpack(z, *pm.latent_hw) if pm.packed else z
        torch.testing.assert_close(zz, (mean - b) * s)
    z = torch.randn(B, 4, 8, 8)
    assert torch.equal(_unpack(_pack(z), 8, 8), z)


def test_decode_gradient_matches_float64_finite_differences():
    pm = from_pipeline(tiny_sd3_pipeline(seed=7).to(torch.float64))
    z = torch.randn(1, *pm.latent_shape(1)[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    w = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def f(zz):
        return (w * torch.tanh(pm.decode(zz))).sum()

    zg = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(zg), zg)
    h = 1e-6
    for k in range(3):
        v = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + k))
        with torch.no_grad():
            fd = (f(z + h * v) - f(z - h * v)) / (2 * h)
        assert float((g * v).sum()) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)


# --- bad input ------------------------------------------------------------------------------------
def test_unsupported_pipeline_is_refused():
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                 norm_num_groups=4, layers_per_block=1)
    with pytest.raises(ValueError, match="StableDiffusionPipeline, StableDiffusion3Pipeline, FluxPipeline"):
        from_pipeline(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()))


def test_embeddings_of_the_wrong_shape_or_batch_name_the_expected_shape(sd, sd3):
    pm, pm3 = from_pipeline(sd), from_pipeline(sd3)
    emb, neg, pool, npool = embeds()
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(B, L, 12\), got \(2, 5, 7\)"):
        pm.cond(torch.randn(B, 5, 7), neg)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds must have shape \(2, 5, 12\)"):
        pm.cond(emb, torch.randn(B, 6, TEXT_DIM))
    with pytest.raises(ValueError, match="needs negative_prompt_embeds"):
        pm.cond(emb)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds of shape \(B, 10\) is required"):
        pm3.cond(emb, neg)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds must have shape \(B, 10\)"):
        pm3.cond(emb, neg, torch.randn(B, 3), npool)
    with pytest.raises(ValueError, match="takes no pooled"):
        pm.cond(emb, neg, pool)
    x = torch.randn(pm.latent_shape(3))
    with pytest.raises(ValueError, match="batch size of x"):
        af.solve(pm.denoiser, x, pm.grid(2), pm.solver(), cond=pm.cond(emb, neg))
    with pytest.raises(ValueError, match="latents must have shape"):
        pm.decode(torch.randn(B, 4, 6, 6))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 16, 16\)"):
        pm.encode(torch.randn(B, 3, 8, 8))
    # no CFG at scale 1: negatives are not needed
    assert set(from_pipeline(sd, guidance_scale=1.0).cond(emb)) == {"prompt_embeds"}


def test_bad_options_are_refused(sd):
    with pytest.raises(ValueError, match="continuous"):
        from_pipeline(tiny_sd_pipeline(diffusers.EulerDiscreteScheduler(timestep_type="continuous",
                                                                        prediction_type="v_prediction")))
    with pytest.raises(ValueError, match="true_cfg_scale applies to FluxPipeline"):
        from_pipeline(sd, true_cfg_scale=2.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        from_pipeline(sd, guidance_scale=float("nan"))
    from adjointflow.integrations.diffusers_solvers import matching_solver

    for sch, match in [(diffusers.DDIMScheduler(clip_sample=True), "clip_sample"),
                       (diffusers.DPMSolverMultistepScheduler(thresholding=True), "thresholding"),
                       (diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
                       (diffusers.DPMSolverMultistepScheduler(solver_order=3), "solver_order=3"),
                       (diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), "stochastic_sampling")]:
        with pytest.raises(ValueError, match=match):
            matching_solver(sch)
    pm = from_pipeline(tiny_sd_pipeline(diffusers.PNDMScheduler()))
    with pytest.raises(ValueError, match="supports DDIMScheduler"):
        pm.grid(10)
    with pytest.raises(ValueError, match="no solver reproduces PNDMScheduler"):
        pm.solver()
