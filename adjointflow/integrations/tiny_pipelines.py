"""Tiny random-weight diffusers pipelines (no downloads, no text encoders) for tests and examples.

Each has the real pipeline class, network class, VAE class and scheduler of its family at toy size
(16x16 RGB images, 4-channel 8x8 latents, 10-50k parameters), so everything that runs on them runs
unchanged on the full-size pipelines. Conditioning is passed as embeddings:
``text_dim`` wide prompt embeddings, ``pooled_dim`` wide pooled embeddings (SD3/Flux).
"""
from __future__ import annotations

import torch

from ..diffusers_adapter import _require_diffusers

__all__ = ["tiny_sd_pipeline", "tiny_sd3_pipeline", "tiny_flux_pipeline", "TEXT_DIM", "POOLED_DIM"]

TEXT_DIM = 12
POOLED_DIM = 10


def _vae(scaling_factor: float, shift_factor: float | None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(scheduler=None, seed: int = 0):
    """``StableDiffusionPipeline``: ``UNet2DConditionModel`` + ``AutoencoderKL`` (``scaling_factor``
    0.18215, vae_scale_factor 2) + Stable Diffusion 1.x's DDIM settings unless ``scheduler`` is given."""
    diffusers = _require_diffusers()
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=4).eval()
    if scheduler is None:
        scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    return _quiet(diffusers.StableDiffusionPipeline(
        vae=_vae(0.18215, None), text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False))


def tiny_sd3_pipeline(scheduler=None, seed: int = 0):
    """``StableDiffusion3Pipeline``: ``SD3Transformer2DModel`` (patch 2) + ``AutoencoderKL`` with a
    shift factor + ``FlowMatchEulerDiscreteScheduler(shift=3)`` unless ``scheduler`` is given."""
    diffusers = _require_diffusers()
    torch.manual_seed(seed)
    tr = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0) if scheduler is None else scheduler
    return _quiet(diffusers.StableDiffusion3Pipeline(
        transformer=tr, scheduler=scheduler, vae=_vae(1.5305, 0.0609), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None))


def tiny_flux_pipeline(scheduler=None, seed: int = 0, guidance_embeds: bool = True):
    """``FluxPipeline``: ``FluxTransformer2DModel`` (packed 2x2 latent patches, distilled guidance input)
    + ``AutoencoderKL`` with a shift factor + dynamically shifted flow matching. Call it with
    ``height=16, width=16`` (Flux's default size is 1024 px)."""
    diffusers = _require_diffusers()
    torch.manual_seed(seed)
    tr = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4)).eval()
    if scheduler is None:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    return _quiet(diffusers.FluxPipeline(
        scheduler=scheduler, vae=_vae(0.3611, 0.1159), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=tr))
