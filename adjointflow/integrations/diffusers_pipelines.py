"""``from_pipeline``: a loaded diffusers text-to-image pipeline as adjointflow pieces.

Supported: ``StableDiffusionPipeline`` (``UNet2DConditionModel``, DDPM-family scheduler),
``StableDiffusion3Pipeline`` (``SD3Transformer2DModel``, flow matching) and ``FluxPipeline``
(``FluxTransformer2DModel``, flow matching on packed 2x2 latent patches). One call gives

* ``denoiser``: the network with classifier-free guidance at the pipeline's scale, in the pipeline's
  order ``out = u + w (c - u)`` with ``u``/``c`` the outputs for the negative/positive embeddings
  (Ho & Salimans 2022); Flux's distilled guidance enters as its ``guidance`` input, and its "true"
  CFG (``true_cfg_scale > 1``) as above. Conditioning is the dict :meth:`PipelineModel.cond` builds
  from embeddings you pass (no tokenizer or text encoder is needed);
* ``grid(n)``: the pipeline's grid (``timesteps_from_diffusers`` with the ``mu``/``sigmas`` it passes);
* ``solver()``: the solver that takes the scheduler's steps (``matching_solver``);
* ``latent_shape(batch)`` and a differentiable VAE: ``decode(z) = D(z / s + b)``,
  ``encode(x) = (mean(E(x)) - b) s`` with the VAE's ``scaling_factor`` ``s`` and ``shift_factor`` ``b``
  (``b = 0`` for SD), Flux latents (un)packed around it. Images are the VAE's range, ``[-1, 1]``.

With the same initial latents, ``solve(denoiser, latents, grid(n), solver(), cond=cond)`` equals
``pipe(..., latents=latents, output_type="latent")`` to float32 rounding (tests/test_diffusers_pipelines.py).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusers_adapter import _FlowTime, _require_diffusers, from_diffusers
from ..models import Denoiser
from .diffusers_grids import timesteps_from_diffusers
from .diffusers_solvers import matching_solver

__all__ = ["from_pipeline", "PipelineModel", "SUPPORTED_PIPELINES"]

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusion3Pipeline", "FluxPipeline")


def _check_emb(name: str, v, shape: tuple, batch: int | None = None) -> None:
    """``v`` must be a floating tensor of ``shape`` (``None`` entries are free; ``batch`` fixes dim 0)."""
    want = tuple("B" if i == 0 and s is None else ("L" if s is None else s) for i, s in enumerate(shape))
    if not isinstance(v, Tensor) or not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape {want}, got {type(v).__name__}")
    ok = v.ndim == len(shape) and all(s is None or v.shape[i] == s for i, s in enumerate(shape))
    if batch is not None and ok and v.shape[0] != batch:
        raise ValueError(f"{name} has batch {v.shape[0]} but the latents have batch {batch}; expected shape "
                         f"({batch}, {', '.join(map(str, want[1:]))})")
    if not ok:
        raise ValueError(f"{name} must have shape ({', '.join(map(str, want))}), got {tuple(v.shape)}")


class _GuidedNet(nn.Module):
    """Shared CFG logic: ``raw(x, t, pos, neg)`` is one network call (or a batched pair)."""

    def __init__(self, model: nn.Module, guidance_scale: float, emb_dim: int, pooled_dim: int | None):
        super().__init__()
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.emb_dim, self.pooled_dim = emb_dim, pooled_dim

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def check(self, batch, prompt_embeds, negative_prompt_embeds=None, pooled_prompt_embeds=None,
              negative_pooled_prompt_embeds=None) -> None:
        """Shapes of the conditioning (errors name the expected shape)."""
        _check_emb("prompt_embeds", prompt_embeds, (None, None, self.emb_dim), batch)
        if self.pooled_dim is not None:
            if pooled_prompt_embeds is None:
                raise ValueError(f"pooled_prompt_embeds of shape (B, {self.pooled_dim}) is required")
            _check_emb("pooled_prompt_embeds", pooled_prompt_embeds, (None, self.pooled_dim), batch)
        elif pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
            raise ValueError("this pipeline's network takes no pooled embeddings")
        if self.cfg:
            if negative_prompt_embeds is None:
                raise ValueError(f"guidance scale {self.guidance_scale} > 1 needs negative_prompt_embeds of shape "
                                 f"{tuple(prompt_embeds.shape)} (encode the empty prompt once and pass it)")
            _check_emb("negative_prompt_embeds", negative_prompt_embeds, tuple(prompt_embeds.shape))
            if self.pooled_dim is not None:
                if negative_pooled_prompt_embeds is None:
                    raise ValueError(f"guidance needs negative_pooled_prompt_embeds of shape (B, {self.pooled_dim})")
                _check_emb("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds,
                           tuple(pooled_prompt_embeds.shape))

    def forward(self, x, t, prompt_embeds, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                negative_pooled_prompt_embeds=None):
        self.check(x.shape[0], prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                   negative_pooled_prompt_embeds)
        if not self.cfg:
            return self.call(x, t, prompt_embeds, pooled_prompt_embeds)
        u, c = self.pair(x, t, (negative_prompt_embeds, prompt_embeds),
                         (negative_pooled_prompt_embeds, pooled_prompt_embeds))
        return u + self.guidance_scale * (c - u)

    def pair(self, x, t, embs, pooled):
        """``(u, c)``: the pipeline evaluates both in one batch ``[negative, positive]``."""
        pool = None if pooled[0] is None else torch.cat(pooled)
        out = self.call(torch.cat([x, x]), torch.cat([t, t]), torch.cat(embs), pool)
        return out.chunk(2)

    def call(self, x, t, emb, pooled):  # pragma: no cover - abstract
        raise NotImplementedError


class _SDNet(_GuidedNet):
    def call(self, x, t, emb, pooled):
        return self.model(x, t, encoder_hidden_states=emb, return_dict=False)[0]


class _SD3Net(_GuidedNet):
    def call(self, x, t, emb, pooled):
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled,
                          return_dict=False)[0]


class _FluxNet(_GuidedNet):
    """Flux: distilled guidance as the ``guidance`` input; true CFG (two separate calls, as the
    pipeline) only with ``true_cfg_scale > 1``; position ids of the packed latent grid fixed."""

    def __init__(self, model, true_cfg_scale, emb_dim, pooled_dim, guidance, img_ids):
        super().__init__(model, true_cfg_scale, emb_dim, pooled_dim)
        self.guidance = guidance
        self.register_buffer("img_ids", img_ids, persistent=False)

    def call(self, x, t, emb, pooled):
        g = None if self.guidance is None else torch.full((x.shape[0],), self.guidance, dtype=torch.float32,
                                                          device=x.device)
        txt_ids = torch.zeros(emb.shape[1], 3, dtype=x.dtype, device=x.device)
        return self.model(hidden_states=x, timestep=t, guidance=g, pooled_projections=pooled,
                          encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=self.img_ids.to(x.dtype),
                          return_dict=False)[0]

    def pair(self, x, t, embs, pooled):
        return self.call(x, t, embs[0], pooled[0]), self.call(x, t, embs[1], pooled[1])


def _pack(z: Tensor) -> Tensor:
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(z: Tensor, h: int, w: int) -> Tensor:
    b, _, c4 = z.shape
    return z.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


@dataclass(frozen=True, eq=False)
class PipelineModel:
    """What :func:`from_pipeline` returns; see the module docstring.

    ``latent_hw`` is the latent image's ``(height, width)`` (before Flux's packing); ``mu`` the
    dynamic-shifting exponent the pipeline would pass (``None`` without dynamic shifting).
    """

    pipeline: Any
    denoiser: Denoiser
    height: int
    width: int
    latent_channels: int
    latent_hw: tuple
    packed: bool
    mu: float | None

    @property
    def net(self) -> _GuidedNet:
        return self.denoiser.net

    def latent_shape(self, batch: int) -> tuple:
        """Shape of the latents ``pipe(..., latents=...)`` takes for ``batch`` images."""
        h, w = self.latent_hw
        if self.packed:
            return (batch, (h // 2) * (w // 2), self.latent_channels * 4)
        return (batch, self.latent_channels, h, w)

    def grid(self, n: int) -> Tensor:
        """The grid the pipeline runs for ``num_inference_steps=n``, in our ``t``."""
        sigmas = None
        sch = self.pipeline.scheduler
        if self.packed and not sch.config.get("use_flow_sigmas", False):
            sigmas = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)  # what FluxPipeline passes
        return timesteps_from_diffusers(sch, n, mu=self.mu, sigmas=sigmas)

    def solver(self):
        """The solver that takes the pipeline scheduler's steps (see ``matching_solver``)."""
        return matching_solver(self.pipeline.scheduler)

    def cond(self, prompt_embeds: Tensor, negative_prompt_embeds: Tensor | None = None,
             pooled_prompt_embeds: Tensor | None = None, negative_pooled_prompt_embeds: Tensor | None = None) -> dict:
        """The conditioning dict for ``solve(..., cond=...)`` and the guidance methods, checked:
        ``prompt_embeds`` ``(B, L, D)`` (``D`` the network's text width), pooled ``(B, P)`` for SD3/Flux,
        negatives of the same shapes when the guidance scale exceeds 1."""
        self.net.check(None, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                       negative_pooled_prompt_embeds)
        out = {"prompt_embeds": prompt_embeds}
        for k, v in (("negative_prompt_embeds", negative_prompt_embeds), ("pooled_prompt_embeds", pooled_prompt_embeds),
                     ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds)):
            if v is not None and (self.net.cfg or not k.startswith("negative")):
                out[k] = v
        return out

    # --- VAE ----------------------------------------------------------------------------------------
    def _factors(self):
        cfg = self.pipeline.vae.config
        return float(cfg.scaling_factor), float(cfg.get("shift_factor", None) or 0.0)

    def decode(self, latents: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[-1, 1]`` from latents, differentiably: ``D(z / s + b)``."""
        if tuple(latents.shape[1:]) != self.latent_shape(1)[1:]:
            raise ValueError(f"latents must have shape {('B',) + self.latent_shape(1)[1:]}, got {tuple(latents.shape)}")
        s, b = self._factors()
        z = _unpack(latents, *self.latent_hw) if self.packed else latents
        vae = self.pipeline.vae
        return vae.decode((z / s + b).to(vae.dtype), return_dict=False)[0].to(latents.dtype)

    def encode(self, images: Tensor) -> Tensor:
        """Latents from images in ``[-1, 1]``: ``(mean(E(x)) - b) s`` (the posterior mean, deterministic)."""
        want = (3, self.height, self.width)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, want))}), got {tuple(images.shape)}")
        s, b = self._factors()
        vae = self.pipeline.vae
        z = (vae.encode(images.to(vae.dtype)).latent_dist.mean - b) * s
        z = z.to(images.dtype)
        return _pack(z) if self.packed else z


def _call_default(pipe, name: str):
    return inspect.signature(type(pipe).__call__).parameters[name].default


def _calculate_shift(seq_len: int, cfg) -> float:
    """``mu`` linear in the image's token count between ``(base_image_seq_len, base_shift)`` and
    ``(max_image_seq_len, max_shift)`` (SD3 / Flux resolution-dependent shifting)."""
    x0, x1 = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    y0, y1 = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (y1 - y0) / (x1 - x0)
    return seq_len * m + (y0 - m * x0)


def from_pipeline(pipe, *, guidance_scale: float | None = None, true_cfg_scale: float | None = None,
                  height: int | None = None, width: int | None = None) -> PipelineModel:
    """Denoiser (with CFG), grid, solver, latent shape and VAE of a diffusers pipeline.

    ``guidance_scale`` defaults to the pipeline's ``__call__`` default (SD 7.5, SD3 7.0, Flux 3.5: for
    Flux it is the distilled-guidance input); ``true_cfg_scale`` (Flux only) to 1 (off); ``height`` and
    ``width`` (pixels) to the pipeline's defaults. Raises ``ValueError`` for other pipeline classes.
    """
    diffusers = _require_diffusers()
    classes = {n: getattr(diffusers, n) for n in SUPPORTED_PIPELINES}
    kind = next((n for n, c in classes.items() if isinstance(pipe, c)), None)
    if kind is None:
        raise ValueError(f"from_pipeline supports {', '.join(SUPPORTED_PIPELINES)}; got {type(pipe).__name__}")
    if true_cfg_scale is not None and kind != "FluxPipeline":
        raise ValueError("true_cfg_scale applies to FluxPipeline only; use guidance_scale")
    scale = float(_call_default(pipe, "guidance_scale") if guidance_scale is None else guidance_scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    vsf = pipe.vae_scale_factor
    sch_cfg = pipe.scheduler.config
    if kind == "StableDiffusionPipeline":
        unet = pipe.unet
        if unet.config.get("time_cond_proj_dim") is not None:
            raise ValueError("UNets with time_cond_proj_dim (guidance-distilled, e.g. LCM) are not supported")
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        height, width = height or size[0] * vsf, width or size[1] * vsf
        net = _SDNet(unet, scale, unet.config.cross_attention_dim, None)
        channels, hw, packed, mu = unet.config.in_channels, (height // vsf, width // vsf), False, None
        den = from_diffusers(net, pipe.scheduler)
    elif kind == "StableDiffusion3Pipeline":
        tr = pipe.transformer
        height, width = height or pipe.default_sample_size * vsf, width or pipe.default_sample_size * vsf
        net = _SD3Net(tr, scale, tr.config.joint_attention_dim, tr.config.pooled_projection_dim)
        channels, hw, packed = tr.config.in_channels, (height // vsf, width // vsf), False
        p = tr.config.patch_size
        mu = _calculate_shift((hw[0] // p) * (hw[1] // p), sch_cfg) if sch_cfg.get("use_dynamic_shifting") else None
        den = from_diffusers(net, pipe.scheduler)
    else:
        tr = pipe.transformer
        height, width = height or pipe.default_sample_size * vsf, width or pipe.default_sample_size * vsf
        hw = (2 * (height // (vsf * 2)), 2 * (width // (vsf * 2)))
        true = 1.0 if true_cfg_scale is None else float(true_cfg_scale)
        ids = torch.zeros(hw[0] // 2, hw[1] // 2, 3)
        ids[..., 1] += torch.arange(hw[0] // 2)[:, None]
        ids[..., 2] += torch.arange(hw[1] // 2)[None, :]
        guidance = scale if tr.config.guidance_embeds else None
        net = _FluxNet(tr, true, tr.config.joint_attention_dim, tr.config.pooled_projection_dim, guidance,
                       ids.reshape(-1, 3))
        channels, packed = tr.config.in_channels // 4, True
        mu = _calculate_shift((hw[0] // 2) * (hw[1] // 2), sch_cfg) if sch_cfg.get("use_dynamic_shifting") else None
        n_train = int(sch_cfg.get("num_train_timesteps", 1000))
        # the pipeline passes timestep / 1000 with timestep = sigma * N
        den = from_diffusers(net, pipe.scheduler, net_time=_FlowTime(n_train / 1000.0))
    return PipelineModel(pipe, den, int(height), int(width), int(channels), hw, packed, mu)

