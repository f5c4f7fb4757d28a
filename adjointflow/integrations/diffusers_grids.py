"""``timesteps_from_diffusers``: the grid a diffusers scheduler's ``set_timesteps(n)`` runs, in our ``t``.

Our time (:mod:`adjointflow.diffusers_adapter`): a DDPM-family table puts training timestep ``k`` at
``t = (k + 1)/N`` (``VPDiscrete``), a flow-matching scheduler's ``sigma`` is ``t`` itself
(``LinearFlow``). The grid is built from the scheduler's config with the same formulas diffusers
uses, independently of its ``set_timesteps`` (the tests compare the two), in float64:

* integer timesteps ``k_i`` (DDIM/DDPM spacing, DPM-Solver without a sigma schedule):
  ``t_i = (k_i + 1)/N``, exactly the table entry the scheduler steps to;
* sigma schedules of VP tables (Karras et al. 2022 eq. 5 with ``rho = 7``, exponential, Lu et al.'s
  uniform log-SNR): ``t_i`` with ``sigma/alpha = exp(-lambda(t_i)) = sigma_i``
  (``VPDiscrete.t_from_log_snr``). diffusers then feeds the network ``round(t(sigma_i))`` with its own
  log-sigma interpolation, not our ``N t_i - 1``: the grid is exact, the model's time input differs
  by less than one training timestep;
* flow matching: the shifted sigmas ``shift s / (1 + (shift - 1) s)`` (or ``e^mu / (e^mu + (1/s - 1))``
  with dynamic shifting, Esser et al. 2024 SD3), optionally stretched to ``shift_terminal`` and made
  Karras/exponential, then ``0``.

The final point is where the scheduler's last step lands: DDIM's ``final_alpha_cumprod``
(``set_alpha_to_one``: ``t = 0``, else the table's first entry ``t = 1/N``), DPM-Solver's
``final_sigmas_type`` (``"zero"``: ``t = 0``; ``"sigma_min"``: the table's first entry).
An option this module does not reproduce raises ``ValueError`` rather than returning a near-miss grid.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from ..diffusers_adapter import _config, _require_diffusers, schedule_from_diffusers

__all__ = ["timesteps_from_diffusers", "SUPPORTED_SCHEDULERS"]

#: scheduler classes whose grids are reproduced
SUPPORTED_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                        "FlowMatchEulerDiscreteScheduler")

F64 = torch.float64


def _complete_config(scheduler) -> tuple[str, Mapping[str, Any]]:
    """The scheduler's class name and its full config (a dict's missing keys take the class defaults)."""
    cfg = _config(scheduler)
    if isinstance(scheduler, Mapping) and "_class_name" not in cfg:
        raise ValueError("a scheduler config dict needs its '_class_name' (as in scheduler_config.json) to "
                         "know which spacing rules apply")
    name = str(cfg.get("_class_name") or type(scheduler).__name__)
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(f"timesteps_from_diffusers supports {', '.join(SUPPORTED_SCHEDULERS)}; got {name}. "
                         "Build the grid yourself from scheduler.timesteps / scheduler.sigmas")
    if isinstance(scheduler, Mapping):
        diffusers = _require_diffusers()
        scheduler = getattr(diffusers, name).from_config(dict(cfg))
        cfg = scheduler.config
    return name, cfg


def _check_n(n, limit: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of inference steps) must be a positive int, got {n!r}")
    if n > limit:
        raise ValueError(f"n={n} exceeds num_train_timesteps={limit}: the scheduler has no such grid")


def _refuse(cfg: Mapping[str, Any], name: str, options: tuple[str, ...]) -> None:
    on = [o for o in options if cfg.get(o)]
    if on:
        raise ValueError(f"{name} with {', '.join(f'{o}={cfg[o]!r}' for o in on)} is not supported by "
                         f"timesteps_from_diffusers (its grid is not reproduced here)")


def _spacing_error(name: str, spacing) -> ValueError:
    return ValueError(f"{name}: unknown timestep_spacing={spacing!r}; expected 'linspace', 'leading' or 'trailing'")


# --- DDIM / DDPM --------------------------------------------------------------------------------
def _ddim_timesteps(name: str, cfg, n: int) -> np.ndarray:
    N, spacing = int(cfg["num_train_timesteps"]), cfg.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return np.linspace(0, N - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(n) * (N // n)).round()[::-1].astype(np.int64) + int(cfg.get("steps_offset", 0))
    if spacing == "trailing":
        return np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1
    raise _spacing_error(name, spacing)


def _ddim_grid(name: str, cfg, n: int) -> Tensor:
    N = int(cfg["num_train_timesteps"])
    ks = [int(k) for k in _ddim_timesteps(name, cfg, n)]
    if name == "DDIMScheduler":
        # DDIM steps from k to k - N // n (not to the next listed timestep) and evaluates the network
        # at the next listed timestep: a grid exists only when the two agree
        jump = N // n
        for i in range(len(ks) - 1):
            if ks[i] - jump != ks[i + 1]:
                raise ValueError(
                    f"DDIMScheduler(timestep_spacing={cfg.get('timestep_spacing')!r}) with n={n}: step {i} goes from "
                    f"timestep {ks[i]} to {ks[i] - jump} (= k - N//n) but the next network call is at timestep "
                    f"{ks[i + 1]}, so the state is never at the time the network sees; no grid reproduces that. "
                    f"Use timestep_spacing='leading' (or 'trailing' with n dividing {N})")
        last = ks[-1] - jump
        if last >= 0:
            t_final = (last + 1) / N
        else:
            t_final = 0.0 if cfg.get("set_alpha_to_one", True) else 1.0 / N
    else:  # DDPM steps to the next listed timestep, after the last one to alpha = 1
        t_final = 0.0
    grid = [(k + 1) / N for k in ks] + [t_final]
    return torch.tensor(grid, dtype=F64)


# --- DPM-Solver multistep (VP table) -----------------------------------------------------------
def _dpm_timesteps(cfg, n: int, alphas_cumprod32: Tensor) -> np.ndarray:
    N, spacing = int(cfg["num_train_timesteps"]), cfg.get("timestep_spacing", "linspace")
    lam = torch.log(alphas_cumprod32.sqrt()) - torch.log((1 - alphas_cumprod32).sqrt())  # float32, as diffusers
    clipped = int(torch.searchsorted(torch.flip(lam, [0]), float(cfg.get("lambda_min_clipped", -math.inf))))
    last = N - clipped
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(cfg.get("steps_offset", 0))
    if spacing == "trailing":
        return np.arange(last, 0, -N / n).round().astype(np.int64) - 1
    raise _spacing_error("DPMSolverMultistepScheduler", spacing)


def _sigma_range(cfg, table_sigmas: np.ndarray) -> tuple[float, float]:
    """(sigma_max, sigma_min) of a sigma schedule: the config's if set, else the table's ends."""
    smax, smin = cfg.get("sigma_max"), cfg.get("sigma_min")
    return (float(table_sigmas[-1]) if smax is None else float(smax),
            float(table_sigmas[0]) if smin is None else float(smin))


def _karras(smax: float, smin: float, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    return (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def _exponential(smax: float, smin: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(smax), math.log(smin), n))


def _dpm_grid(cfg, n: int, schedule) -> Tensor:
    name = "DPMSolverMultistepScheduler"
    _refuse(cfg, name, ("use_beta_sigmas",))
    if cfg.get("use_flow_sigmas"):
        raise AssertionError  # handled by the flow branch
    N = schedule.num_train_timesteps
    ac32 = schedule.alphas_cumprod.to(torch.float32)
    sig32 = ((1 - ac32) / ac32) ** 0.5  # diffusers' VE sigmas, computed in float32
    table = sig32.numpy().astype(np.float64)
    final = cfg.get("final_sigmas_type", "zero")
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"{name}: unknown final_sigmas_type={final!r}; expected 'zero' or 'sigma_min'")
    t_final = 0.0 if final == "zero" else 1.0 / N
    if cfg.get("use_karras_sigmas") or cfg.get("use_exponential_sigmas") or cfg.get("use_lu_lambdas"):
        if cfg.get("use_lu_lambdas"):
            # Lu et al.'s uniform-lambda grid, in diffusers' log sigma = -lambda
            logs = np.log(table)
            sig = np.exp(np.linspace(float(logs[-1]), float(logs[0]), n))
        else:
            smax, smin = _sigma_range(cfg, table)
            sig = (_karras if cfg.get("use_karras_sigmas") else _exponential)(smax, smin, n)
        sig = torch.as_tensor(np.asarray(sig, dtype=np.float64))
        t = schedule.t_from_log_snr(-torch.log(sig)).clamp(0.0, 1.0)
        # the ends of the table sit exactly at t = 1 and t = 1/N (the inverse is exact only to rounding)
        t = torch.where(torch.isclose(sig, sig.new_tensor(table[-1]), rtol=1e-12, atol=0), 1.0, t)
        at_min = torch.isclose(sig, sig.new_tensor(table[0]), rtol=1e-12, atol=0)
        t = torch.where(at_min, 1.0 / N, t)
        return torch.cat([t, torch.tensor([t_final], dtype=F64)])
    ks = _dpm_timesteps(cfg, n, ac32)
    if len(ks) and (ks.min() < 0 or ks.max() > N - 1):
        raise ValueError(f"{name} with these spacing options gives timesteps outside [0, {N - 1}]: {ks.tolist()}")
    return torch.tensor([(int(k) + 1) / N for k in ks] + [t_final], dtype=F64)


# --- flow matching ------------------------------------------------------------------------------
def _shift(cfg, s: np.ndarray, mu, shift: float) -> np.ndarray:
    if cfg.get("use_dynamic_shifting"):
        m = math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu
        return m / (m + (1 / s - 1))
    return shift * s / (1 + (shift - 1) * s)


def _flow_grid(cfg, n: int, mu, sigmas) -> Tensor:
    name = "FlowMatchEulerDiscreteScheduler"
    _refuse(cfg, name, ("use_beta_sigmas", "invert_sigmas"))
    ttype = cfg.get("time_shift_type", "exponential")
    if ttype not in ("exponential", "linear"):
        raise ValueError(f"{name}: unknown time_shift_type={ttype!r}")
    if cfg.get("use_dynamic_shifting"):
        if mu is None:
            raise ValueError(f"{name} has use_dynamic_shifting=True: pass mu (the pipeline computes it from the "
                             "image's sequence length, e.g. diffusers' calculate_shift)")
    elif mu is not None:
        raise ValueError(f"mu={mu!r} given but {name} has use_dynamic_shifting=False (mu would be ignored)")
    N, shift = int(cfg["num_train_timesteps"]), float(cfg.get("shift", 1.0))
    if sigmas is None:
        # sigma_max / sigma_min are the float32 ends of the training table (1 and 1/N), shifted at
        # construction unless shifting is dynamic; the inference sigmas are then shifted (again)
        ends = torch.tensor([float(N), 1.0], dtype=torch.float32) / N
        if not cfg.get("use_dynamic_shifting"):
            ends = shift * ends / (1 + (shift - 1) * ends)
        smax, smin = float(ends[0]), float(ends[1])
        s = np.linspace(smax * N, smin * N, n) / N
    else:
        s = np.asarray(torch.as_tensor(sigmas, dtype=torch.float64).cpu()).astype(np.float32).astype(np.float64)
        if s.ndim != 1 or len(s) != n:
            raise ValueError(f"sigmas must be a 1-D sequence of n={n} values, got shape {tuple(s.shape)}")
    s = _shift(cfg, s, mu, shift)
    if cfg.get("shift_terminal"):
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - float(cfg["shift_terminal"])))
    if cfg.get("use_karras_sigmas") or cfg.get("use_exponential_sigmas"):
        smax = float(s[0]) if cfg.get("sigma_max") is None else float(cfg["sigma_max"])
        smin = float(s[-1]) if cfg.get("sigma_min") is None else float(cfg["sigma_min"])
        s = (_karras if cfg.get("use_karras_sigmas") else _exponential)(smax, smin, n)
    return torch.cat([torch.as_tensor(np.asarray(s, dtype=np.float64)), torch.zeros(1, dtype=F64)])


def _dpm_flow_grid(cfg, n: int, mu) -> Tensor:
    name = "DPMSolverMultistepScheduler"
    _refuse(cfg, name, ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas", "use_beta_sigmas"))
    shift = float(cfg.get("flow_shift", 1.0))
    if mu is not None:
        if not cfg.get("use_dynamic_shifting") or cfg.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"mu={mu!r} needs use_dynamic_shifting=True with time_shift_type='exponential'")
        shift = math.exp(mu)
    N = int(cfg["num_train_timesteps"])
    s = 1.0 - np.linspace(1, 1 / N, n + 1)
    s = np.flip(shift * s / (1 + (shift - 1) * s))[:-1]
    final = cfg.get("final_sigmas_type", "zero")
    if final != "zero":
        raise ValueError(f"{name} with use_flow_sigmas=True and final_sigmas_type={final!r} is not supported")
    return torch.cat([torch.as_tensor(s.copy(), dtype=F64), torch.zeros(1, dtype=F64)])


def timesteps_from_diffusers(scheduler, n: int, *, mu: float | None = None, sigmas=None) -> Tensor:
    """The decreasing float64 grid (``n + 1`` times in our ``t``) that ``scheduler.set_timesteps(n)``
    runs, ending where its last step lands; see the module docstring for the map.

    ``scheduler`` is a diffusers scheduler or its config dict (one of :data:`SUPPORTED_SCHEDULERS`).
    ``mu`` is the dynamic-shifting exponent a flow pipeline passes (``use_dynamic_shifting=True``);
    ``sigmas`` the custom flow sigmas a pipeline may pass (Flux passes ``linspace(1, 1/n, n)``).
    Options whose grid is not reproduced (beta sigmas, inverted sigmas, a DDIM spacing whose step
    target is not the next timestep, ...) raise ``ValueError``; so do schedulers that
    :func:`adjointflow.diffusers_adapter.schedule_from_diffusers` refuses.
    """
    name, cfg = _complete_config(scheduler)
    schedule = schedule_from_diffusers(cfg if isinstance(scheduler, Mapping) else scheduler)
    N = int(cfg["num_train_timesteps"])
    if sigmas is not None and name != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"custom sigmas are supported for FlowMatchEulerDiscreteScheduler only, not {name}")
    if mu is not None and name in ("DDIMScheduler", "DDPMScheduler"):
        raise ValueError(f"mu (dynamic shifting) does not apply to {name}")
    if name == "FlowMatchEulerDiscreteScheduler":
        _check_n(n, 10**9)
        grid = _flow_grid(cfg, n, mu, sigmas)
    elif name == "DPMSolverMultistepScheduler" and cfg.get("use_flow_sigmas"):
        _check_n(n, N)
        grid = _dpm_flow_grid(cfg, n, mu)
    elif name == "DPMSolverMultistepScheduler":
        if mu is not None:
            raise ValueError("mu (dynamic shifting) applies to DPMSolverMultistepScheduler with use_flow_sigmas=True only")
        _check_n(n, N)
        grid = _dpm_grid(cfg, n, schedule)
    else:
        _check_n(n, N)
        grid = _ddim_grid(name, cfg, n)
    if len(grid) > 2 and grid[-1] == grid[-2]:
        # diffusers' last step lands where it starts (e.g. DDIM's final alpha = the table's first entry
        # after timestep 0): a zero-length step returns its input, so it is left out
        grid = grid[:-1]
    from ..grids import validate_grid

    try:
        validate_grid(grid)
    except ValueError as exc:
        raise ValueError(f"{name} with n={n} gives no strictly decreasing grid ({exc})") from exc
    return grid
