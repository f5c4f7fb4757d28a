"""The loop shared by the decomposition samplers (DDRM, PiGDM, DiffPIR, FlowDPS, LanPaint).

Each step turns the network's evaluation at ``(x_t, t)`` into the pair ``(x0_hat, eps_hat)`` tied by
``x_t = alpha x0_hat + sigma eps_hat``, corrects it toward the measurement (the method's own rule),
and re-noises to the next time in DDIM form (Song, Meng, Ermon 2021, written for any Gaussian path):

    x_{t'} = alpha' x0_tilde + sigma' (sqrt(1 - eta^2) eps_tilde + eta z),    z ~ N(0, I).

With ``eta = 0`` and ``(x0_tilde, eps_tilde) = (x0_hat, eps_hat)`` this is DDIM (= Euler on a rectified
flow). A method subclasses :class:`StepwiseSampler` and implements ``_prepare`` (per run) and
``_update`` (per step); the loop owns validation, the grid, NFE/VJP counting, noise, records and errors.

Posterior-mean output (``stop``): a sample ``x`` of ``p(x_0 | y)`` has twice the error of the posterior
mean, ``E||x - x_0||^2 = 2 E||E[x_0 | y] - x_0||^2``. A method with the field ``stop = rho_s`` follows
its chain only down to the noise level ``rho = sigma / alpha = rho_s`` and returns the method's
data-corrected clean estimate there (``E[x_0 | x_t, y]``-style). If ``x_t`` has the posterior's
marginal, this estimate is unbiased for ``E[x_0 | y]`` and its error is

    E||x0_est - x_0||^2 = E||E[x_0 | y] - x_0||^2 + tr Cov[x0_est],   tr Cov[x0_est] <= tr Cov[x_0 | y],

falling to the posterior mean's own as ``rho_s`` grows (``x_t`` then carries nothing beyond ``y``); a
large ``rho_s`` trusts the data-corrected estimate's likelihood approximation more. The default grid
then has ``steps`` points from the schedule's start to ``t(rho_s)``, each one NFE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..driver import ModelCall
from ..grids import timesteps
from ..models import EvalPoint
from ..plan import Plan
from .base import (Counter, CountedDenoiser, GuidanceResult, RunMonitor, Timer, check_callback, check_positive_int,
                   check_progress, check_run_inputs, evaluate_objective, sampling_grid)
from .witnesses import Witnesses, at_step

__all__ = ["StepwiseSampler", "Step", "HostValues", "check_fraction", "tweedie_variance", "stop_grid"]


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


def check_stop(v) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf)):
        raise ValueError(f"stop must be None or a noise level rho = sigma / alpha > 0 (finite), got {v!r}")


def stop_grid(schedule, grid: Tensor, stop: float) -> Tensor:
    """``grid``'s points of noise level ``rho > stop``, then the time of ``rho = stop`` itself (``lambda =
    log(alpha / sigma) = -log(stop)``), where the run evaluates its final estimate."""
    lam_stop = -math.log(stop)
    lam = schedule.log_snr(grid)
    if not float(lam[0]) < lam_stop:
        raise ValueError(f"stop={stop:g} is not below the noise level rho = {math.exp(-float(lam[0])):.6g} of the "
                         f"grid's first time t={float(grid[0]):.6g}")
    if not float(lam[-1]) >= lam_stop:
        raise ValueError(f"stop={stop:g} is below the noise level rho = {math.exp(-float(lam[-1])):.6g} of the "
                         f"grid's last time t={float(grid[-1]):.6g}")
    t_stop = schedule.t_from_log_snr(torch.tensor(lam_stop, dtype=torch.float64)).to(grid.dtype).reshape(1)
    return torch.cat([grid[lam < lam_stop], t_stop])


def check_variance(v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0):
        raise ValueError(f"data_variance must be a number > 0 (inf allowed), got {v!r}")


class HostValues(NamedTuple):
    """A step's times and schedule values as Python floats (float64, planned once per run): what a method
    decides on the host (``alpha > 0``, ``rho^2``) without reading the device."""

    t: float
    t_next: float
    alpha: float
    sigma: float
    alpha_next: float
    sigma_next: float


@dataclass(frozen=True)
class Step:
    """One step ``t -> t_next`` of the loop: the model and its evaluation point ``at`` (planned network
    time and conversions), the grid times (0-dim tensors, the objective's ``t``), the schedule's values at
    both times (in the state's dtype, on its device), the same values on the host (``host``), the run's
    noise generator and its deferred NaN/Inf checks (``witnesses``)."""

    model: ModelCall
    i: int
    t: Tensor
    t_next: Tensor
    at: EvalPoint
    alpha: Tensor
    sigma: Tensor
    alpha_next: Tensor
    sigma_next: Tensor
    host: HostValues
    generator: torch.Generator
    witnesses: Witnesses

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
        return at_step(self.i, self.host.t)


class StepwiseSampler:
    """Base of the decomposition samplers: subclasses are frozen dataclasses with fields ``steps``,
    ``grid``, ``seed``, ``progress`` and ``callback`` (and their own), and implement ``_prepare`` /
    ``_update``. The run follows the callback / Ctrl-C / progress protocol of
    :class:`~adjointflow.guidance.base.RunMonitor` (stopped early, it returns the latest clean estimate)."""

    label: ClassVar[str] = "sampler"
    stop = None  # methods that support posterior-mean output declare ``stop: float | None = None`` as a field

    def _prepare(self, denoiser, objective, x: Tensor) -> Any:
        """Per-run context (e.g. the measurement in the operator's singular basis)."""
        return None

    def _grid(self, ctx, denoiser, grid: Tensor) -> Tensor:
        """The grid the run uses (a method may move a point onto a time it needs)."""
        return grid

    def _plan(self, ctx, alphas: Tensor, sigmas: Tensor) -> Any:
        """The context with what depends only on the grid added, computed once per run (``alphas``,
        ``sigmas``: the schedule at the grid's times, in the state's dtype and device)."""
        return ctx

    def _update(self, ctx, step: Step, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """One step from ``x`` at ``step.t``: returns ``(x_next, x0_hat)`` (the clean estimate is recorded)."""
        raise NotImplementedError

    def _estimate(self, ctx, step: Step, x: Tensor) -> Tensor:
        """The data-corrected clean estimate at ``(x, step.t)`` returned at the ``stop`` level (one NFE);
        by default the estimate ``_update`` records."""
        return self._update(ctx, step, x)[1]

    def _check_common(self) -> None:
        check_positive_int("steps", self.steps)
        check_int("seed", self.seed)
        check_progress(self.progress)
        check_callback(self.callback)
        check_stop(self.stop)
        if self.stop is not None and self.grid is None and self.steps < 2:
            raise ValueError(f"steps must be >= 2 with stop (the start and the stop level are both evaluated), "
                             f"got {self.steps}")

    def _full_grid(self, denoiser) -> Tensor:
        """The grid to ``t = 0`` (without ``stop``), or to the ``stop`` level (the last point is evaluated)."""
        sch = denoiser.schedule
        if self.stop is None or self.grid is not None:
            grid = sampling_grid(denoiser, self.steps, self.grid)
            return grid if self.stop is None else stop_grid(sch, grid, self.stop)
        t_stop = sch.t_from_log_snr(torch.tensor(-math.log(self.stop), dtype=torch.float64))
        if not float(t_stop) < sch.t_start:
            raise ValueError(f"stop={self.stop:g} is not below the noise level of the schedule's start "
                             f"t={sch.t_start:g}")
        grid = timesteps(sch, self.steps - 1, t_end=float(t_stop))
        grid[-1] = t_stop  # exactly the level (the grid's own end may round)
        return grid

    def run(self, denoiser, objective, x_init: Tensor, cond=None) -> GuidanceResult:
        """Sample from ``x_init`` (the state at ``grid[0]``) toward the measurement in ``objective``."""
        check_run_inputs(denoiser, objective, x_init, cond)
        timer, counter = Timer(), Counter()
        x = x_init.detach()
        ctx = self._prepare(denoiser, objective, x)
        grid = self._grid(ctx, denoiser, self._full_grid(denoiser))
        updates = len(grid) - 1  # then, with stop, one evaluation at grid[-1] for the estimate
        # the guidance loop checks its own updates (Witnesses): the model's record is not kept
        model = ModelCall(CountedDenoiser(denoiser, counter), cond, check_finite=False)
        sch = denoiser.schedule
        plan = Plan(sch, grid)  # float64 schedule values on the host, once
        evals = plan.bind(model.denoiser, x).evals  # network times and conversions, one copy to the device
        alphas, sigmas = plan.on_grid(x, "alpha", "sigma")
        ctx = self._plan(ctx, alphas, sigmas)
        host = list(zip(plan.times, plan.nodes.alpha.tolist(), plan.nodes.sigma.tolist()))
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        total = updates + (self.stop is not None)
        mon = RunMonitor(self.label, total, callback=self.callback, progress=self.progress)
        with mon:
            for i in range(total):
                j = min(i + 1, updates)
                (t, a, s), (t_next, a_next, s_next) = host[i], host[j]
                step = Step(model, i, grid[i], grid[j], evals[i], alphas[i], sigmas[i], alphas[j], sigmas[j],
                            HostValues(t, t_next, a, s, a_next, s_next), gen, mon.finite)
                if i < updates:
                    x, x0 = self._update(ctx, step, x)
                else:
                    x = x0 = self._estimate(ctx, step, x)
                x = x.detach()
                mon.finite.add(x, f"the {self.label} update produced NaN/Inf {step.where()}", i, t)
                with torch.no_grad():
                    loss = evaluate_objective(objective, x0.detach(), step.t, where=step.where(),
                                              witnesses=mon.finite, step=i, t_host=t)
                if mon.record(i, loss, x0, t=t):
                    break
        x, losses = mon.sampler_end(x, x_init, objective, grid[-1])
        return GuidanceResult(x, x_init.detach(), losses, counter.nfe, counter.vjps, timer.seconds, cond,
                              mon.stop_reason)
