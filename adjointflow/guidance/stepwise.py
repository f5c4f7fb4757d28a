"""The loop shared by the decomposition samplers (DDRM, PiGDM, DiffPIR, FlowDPS, LanPaint).

Each step turns the network's evaluation at ``(x_t, t)`` into the pair ``(x0_hat, eps_hat)`` tied by
``x_t = alpha x0_hat + sigma eps_hat``, corrects it toward the measurement (the method's own rule),
and re-noises to the next time in DDIM form (Song, Meng, Ermon 2021, written for any Gaussian path):

    x_{t'} = alpha' x0_tilde + sigma' (sqrt(1 - eta^2) eps_tilde + eta z),    z ~ N(0, I).

With ``eta = 0`` and ``(x0_tilde, eps_tilde) = (x0_hat, eps_hat)`` this is DDIM (= Euler on a rectified
flow). A method subclasses :class:`StepwiseSampler` and implements ``_prepare`` (per run) and
``_update`` (per step); the loop owns validation, the grid, NFE/VJP counting, noise, records and errors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..driver import ModelCall
from ..errors import NonFiniteError
from .base import (Counter, CountedDenoiser, GuidanceResult, RunMonitor, Timer, check_callback, check_positive_int,
                   check_progress, check_run_inputs, evaluate_objective, sampling_grid)

__all__ = ["StepwiseSampler", "Step", "check_fraction", "tweedie_variance"]


def check_fraction(name: str, v) -> None:
    """``v`` must be a number in ``[0, 1]``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")


def check_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r}")


def tweedie_variance(rho2, data_variance: float):
    """``r^2 = c rho^2 / (c + rho^2)``: ``Cov[x_0 | x_t]`` of data ``N(m, c I)`` at noise ``rho = sigma/alpha``
    (``rho^2`` for ``c = inf``, ``c`` for ``rho = inf``)."""
    c = data_variance
    if c == float("inf"):
        return rho2
    if rho2 == float("inf"):
        return c
    return c * rho2 / (c + rho2)


def check_variance(v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0):
        raise ValueError(f"data_variance must be a number > 0 (inf allowed), got {v!r}")


@dataclass(frozen=True)
class Step:
    """One step ``t -> t_next`` of the loop: the model, the schedule's values at both times (in the
    state's dtype) and the run's noise generator."""

    model: ModelCall
    i: int
    t: Tensor
    t_next: Tensor
    alpha: Tensor
    sigma: Tensor
    alpha_next: Tensor
    sigma_next: Tensor
    generator: torch.Generator

    def noise(self, like: Tensor) -> Tensor:
        """Fresh ``N(0, I)`` noise shaped like ``like`` from the run's seeded generator."""
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype, device=like.device)

    def renoise(self, x0: Tensor, eps: Tensor, eta: float, z: Tensor | None = None) -> Tensor:
        """``alpha' x0 + sigma' (sqrt(1 - eta^2) eps + eta z)`` (``z`` drawn fresh if not given)."""
        out = self.alpha_next * x0 + self.sigma_next * math.sqrt(1.0 - eta * eta) * eps
        if eta > 0:
            out = out + self.sigma_next * eta * (self.noise(x0) if z is None else z)
        return out

    def where(self) -> str:
        return f"at step {self.i} (t={float(self.t):.6g})"


class StepwiseSampler:
    """Base of the decomposition samplers: subclasses are frozen dataclasses with fields ``steps``,
    ``grid``, ``seed``, ``progress`` and ``callback`` (and their own), and implement ``_prepare`` /
    ``_update``. The run follows the callback / Ctrl-C / progress protocol of
    :class:`~adjointflow.guidance.base.RunMonitor` (stopped early, it returns the latest clean estimate)."""

    label: ClassVar[str] = "sampler"

    def _prepare(self, denoiser, objective, x: Tensor) -> Any:
        """Per-run context (e.g. the measurement in the operator's singular basis)."""
        return None

    def _grid(self, ctx, denoiser, grid: Tensor) -> Tensor:
        """The grid the run uses (a method may move a point onto a time it needs)."""
        return grid

    def _update(self, ctx, step: Step, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """One step from ``x`` at ``step.t``: returns ``(x_next, x0_hat)`` (the clean estimate is recorded)."""
        raise NotImplementedError

    def _check_common(self) -> None:
        check_positive_int("steps", self.steps)
        check_int("seed", self.seed)
        check_progress(self.progress)
        check_callback(self.callback)

    def run(self, denoiser, objective, x_init: Tensor, cond=None) -> GuidanceResult:
        """Sample from ``x_init`` (the state at ``grid[0]``) toward the measurement in ``objective``."""
        check_run_inputs(denoiser, objective, x_init, cond)
        timer, counter = Timer(), Counter()
        x = x_init.detach()
        ctx = self._prepare(denoiser, objective, x)
        grid = self._grid(ctx, denoiser, sampling_grid(denoiser, self.steps, self.grid))
        model = ModelCall(CountedDenoiser(denoiser, counter), cond)
        sch = denoiser.schedule
        alphas = sch.alpha(grid).to(dtype=x.dtype, device=x.device)
        sigmas = sch.sigma(grid).to(dtype=x.dtype, device=x.device)
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        mon = RunMonitor(self.label, len(grid) - 1, callback=self.callback, progress=self.progress)
        with mon:
            for i in range(len(grid) - 1):
                model.step = i
                step = Step(model, i, grid[i], grid[i + 1], alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1], gen)
                x, x0 = self._update(ctx, step, x)
                x = x.detach()
                if not bool(torch.isfinite(x).all()):
                    raise NonFiniteError(f"the {self.label} update produced NaN/Inf {step.where()}",
                                         step=i, t=float(step.t))
                with torch.no_grad():
                    loss = evaluate_objective(objective, x0.detach(), step.t, where=step.where())
                if mon.record(i, loss, x0, t=step.t):
                    break
        x, losses = mon.sampler_end(x, x_init, objective, grid[-1])
        return GuidanceResult(x, x_init.detach(), losses, counter.nfe, counter.vjps, timer.seconds, cond,
                              mon.stop_reason)
