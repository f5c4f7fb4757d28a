"""Wrap a diffusers model + scheduler as a :class:`~adjointflow.models.Denoiser` (optional dependency).

A diffusers DDPM-family scheduler (``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``,
...) is defined by a discrete table ``alphas_cumprod[k]``, ``k = 0..N-1``, with
``x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps``. :class:`~adjointflow.schedules.VPDiscrete` places
timestep ``k`` at our ``t = (k + 1)/N``, so the network receives ``k(t) = N t - 1`` (continuous; at
the grid points ``t = (k + 1)/N`` it is exactly the integer timestep the model was trained on).

``prediction_type`` maps as ``"epsilon" -> "eps"``, ``"sample" -> "x0"``, ``"v_prediction" -> "v"``.
Flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``, or ``use_flow_sigmas=True`` /
``prediction_type="flow_prediction"``) use ``x_s = (1 - s) x_0 + s eps`` with ``s`` in ``[0, 1]`` and a
network that predicts ``eps - x_0`` at timestep ``N s``: that is :class:`~adjointflow.schedules.LinearFlow`
with ``prediction="velocity"`` and ``t_net = N t`` (``shift`` only moves the sampling grid, not the model).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .models import Denoiser
from .schedules import LinearFlow, VPDiscrete

__all__ = ["from_diffusers", "schedule_from_diffusers", "PREDICTION_TYPES"]

#: diffusers ``prediction_type`` -> adjointflow prediction
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "velocity"}

_INSTALL_HINT = (
    "Denoiser.from_diffusers needs the optional dependency diffusers: "
    "pip install 'adjointflow[diffusers]' (or pip install diffusers)"
)


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return diffusers


def _config(scheduler) -> Mapping[str, Any]:
    if isinstance(scheduler, Mapping):
        return scheduler
    cfg = getattr(scheduler, "config", None)
    if not isinstance(cfg, Mapping):
        raise TypeError(
            "scheduler must be a diffusers scheduler (with a .config) or its config dict, "
            f"got {type(scheduler).__name__}"
        )
    return cfg


def _is_flow(scheduler, cfg: Mapping[str, Any]) -> bool:
    name = cfg.get("_class_name") or type(scheduler).__name__
    return (
        "FlowMatch" in str(name)
        or bool(cfg.get("use_flow_sigmas", False))
        or cfg.get("prediction_type") == "flow_prediction"
    )


def _alphas_cumprod(scheduler, cfg: Mapping[str, Any]) -> torch.Tensor:
    ac = getattr(scheduler, "alphas_cumprod", None) if not isinstance(scheduler, Mapping) else None
    if ac is None:
        # a config dict: let diffusers compute the table from betas exactly as it would at inference
        from diffusers import DDPMScheduler

        if "trained_betas" in cfg and cfg["trained_betas"] is not None:
            betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64)
            return torch.cumprod(1.0 - betas, 0)
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr")
        ac = DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg}).alphas_cumprod
    return torch.as_tensor(ac).detach().to(torch.float64).cpu()


def _refuse_unsupported(scheduler, cfg: Mapping[str, Any]) -> None:
    # Schedulers whose models are *not* DDPM-timestep or flow-matching networks: mapping them to a
    # VPDiscrete table would feed the network the wrong time (EDM preconditioning takes 0.25 log sigma,
    # a VE score model sigma itself) -- a silent wrong answer, so refuse.
    name = str(cfg.get("_class_name") or type(scheduler).__name__)
    if name.startswith("EDM") or "ScoreSdeVe" in name or "KarrasVe" in name:
        raise ValueError(f"{name} models use EDM/VE preconditioning and noise-level inputs; from_diffusers supports "
                         "DDPM-family (alphas_cumprod + integer timesteps) and flow-matching schedulers. Wrap the "
                         "model yourself with adjointflow.Denoiser(net, EDM() or VE(), ..., net_time=...)")
    if cfg.get("timestep_type", "discrete") == "continuous":
        raise ValueError("timestep_type='continuous' models take 0.25 log(sigma) as their time input, not a DDPM "
                         "timestep; wrap the model with adjointflow.Denoiser(..., net_time=...) yourself")
    if cfg.get("variance_type") in ("learned", "learned_range"):
        raise ValueError(f"variance_type={cfg.get('variance_type')!r}: the model outputs 2C channels (mean and "
                         "variance); wrap it so it returns only the first C channels")
    if cfg.get("rescale_betas_zero_snr", False):
        raise ValueError("rescale_betas_zero_snr=True gives alpha = 0 at the last timestep (zero terminal SNR), "
                         "which VPDiscrete's log-alpha interpolation cannot represent; not supported yet")


def schedule_from_diffusers(scheduler):
    """The adjointflow schedule of a diffusers scheduler (or its config): ``VPDiscrete`` or ``LinearFlow``.

    Refuses (``ValueError``) the schedulers whose models take other time inputs: EDM/VE schedulers,
    ``timestep_type="continuous"``, learned-variance outputs and zero-terminal-SNR tables. Sampler-only
    options (``clip_sample``, ``thresholding``, timestep spacing) are ignored: they do not change the model.
    """
    _require_diffusers()
    cfg = _config(scheduler)
    _refuse_unsupported(scheduler, cfg)
    if _is_flow(scheduler, cfg):
        if cfg.get("invert_sigmas", False):
            raise ValueError("flow-matching schedulers with invert_sigmas=True are not supported")
        return LinearFlow()
    try:
        return VPDiscrete(_alphas_cumprod(scheduler, cfg))
    except ValueError as exc:
        raise ValueError(f"the scheduler's alphas_cumprod table is not a valid VP schedule: {exc}") from exc


def from_diffusers(model, scheduler, *, prediction: str | None = None, net_time=None) -> Denoiser:
    """``Denoiser`` for a diffusers ``model`` (e.g. ``UNet2DModel``) trained with ``scheduler``.

    * DDPM-family scheduler: ``schedule = VPDiscrete(scheduler.alphas_cumprod)``, the network sees
      ``t_net = VPDiscrete.timestep(t) = N t - 1`` (Ho et al. 2020's integer timesteps, continuous).
    * flow-matching scheduler: ``schedule = LinearFlow()``, ``prediction = "velocity"``, ``t_net = N t``.

    ``prediction`` overrides the scheduler's ``prediction_type`` (one of adjointflow's prediction
    names); ``net_time`` overrides the map from our ``t`` to the model's time input (e.g.
    ``lambda t: t`` for Flux-style transformers, whose pipelines pass ``timestep / 1000``). The model is called ``model(x, t_net[, cond])`` and its output's ``.sample`` is used;
    for a ``UNet2DModel`` a tensor ``cond`` is passed as ``class_labels``, a dict as keyword arguments
    (e.g. ``{"encoder_hidden_states": emb}`` for a ``UNet2DConditionModel``).
    Raises ``ImportError`` when diffusers is not installed.
    """
    _require_diffusers()
    if not callable(model):
        raise TypeError(f"model must be a callable diffusers model, got {type(model).__name__}")
    net_time_override = net_time
    cfg = _config(scheduler)
    schedule = schedule_from_diffusers(scheduler)
    n = int(cfg.get("num_train_timesteps", 1000))
    if isinstance(schedule, LinearFlow):
        kind = "velocity"
        net_time = _FlowTime(n)
    else:
        ptype = cfg.get("prediction_type", "epsilon")
        if ptype not in PREDICTION_TYPES or PREDICTION_TYPES[ptype] == "velocity":
            raise ValueError(
                f"unsupported diffusers prediction_type {ptype!r}; expected 'epsilon', 'sample' or 'v_prediction'"
            )
        kind = PREDICTION_TYPES[ptype]
        net_time = schedule.timestep
    if prediction is not None:
        kind = prediction  # validated by Denoiser
    return Denoiser(model, schedule, kind, net_time=net_time if net_time_override is None else net_time_override)


class _FlowTime:
    """``t -> N t``: diffusers flow-matching models take ``timestep = sigma * num_train_timesteps``."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, t):
        return t * self.n

    def __repr__(self):
        return f"lambda t: {self.n} * t"
