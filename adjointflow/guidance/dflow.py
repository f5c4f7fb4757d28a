"""D-Flow: optimise the source latent through the whole solve (Ben-Hamu, Puny, Gat, Karrer, Singer,
Lipman; "D-Flow: Differentiating through Flows for Controlled Generation", ICML 2024).

    z* = argmin_z  L(psi(z)) + w R(z),     psi(z) = solve(denoiser, z, grid, solver)

with the gradient of the *discretised* solve (discretise-then-optimise; default strategy
``Backprop``, or ``Checkpoint`` for memory flat in the number of steps) and L-BFGS with a
strong-Wolfe line search, stopped per sample by the discrepancy principle. Differentiating through the flow pre-conditions the latent gradient by the
data covariance (the paper's implicit prior): directions without data variance receive no update.

Regularisers ``R`` (per sample, ``d`` = entries per sample):

* ``"gaussian"``: ``R(z) = ||z||^2 / 2`` (the latent's ``-log N(0, I)``; with the Gaussian
  likelihood and ``w = 1`` the optimum is the posterior MAP in latent space);
* ``"chi"``: ``R(z) = ||z||^2/2 - (d - 1) log ||z||`` (``-log chi_d(||z||)``, minimum at
  ``||z|| = sqrt(d - 1)``, the typical set of ``N(0, I)``; PnP-Flow's corrected sign, commit da3f625).

Blend initialisation (``blend = b``): ``z_0 = sqrt(b) z_inv + sqrt(1 - b) xi`` where ``z_inv`` is the
ODE inversion of the back-projected measurement ``A^+ y`` and ``xi = x_init``; the square roots
keep unit variance for independent unit-variance inputs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..adjoint import Backprop, ContinuousAdjoint
from ..driver import solve
from ..errors import NonFiniteError
from ..solvers.base import Solver
from ..solvers.ddim import DDIM
from .base import (Counter, CountedDenoiser, GuidanceResult, RunMonitor, Timer, check_callback, check_discrepancy,
                   check_nonneg_float, check_positive_int, check_progress, check_run_inputs, discrepancy_target,
                   evaluate_objective, sampling_grid, stack_losses)
from .objectives import MeasurementLoss

__all__ = ["DFlow", "gaussian_regularizer", "chi_regularizer", "REGULARIZERS"]


def gaussian_regularizer(z: Tensor) -> Tensor:
    """``R(z) = ||z||^2 / 2`` per sample, shape ``(batch,)``."""
    return 0.5 * z.reshape(z.shape[0], -1).pow(2).sum(1)


def chi_regularizer(z: Tensor) -> Tensor:
    """``R(z) = ||z||^2/2 - (d - 1) log ||z||`` per sample (``-log`` of the chi_d density of ``||z||``
    up to a constant); ``grad R = z - (d - 1) z / ||z||^2`` pushes ``||z||`` toward ``sqrt(d - 1)``."""
    zf = z.reshape(z.shape[0], -1)
    d = zf.shape[1]
    sq = zf.pow(2).sum(1)
    return 0.5 * sq - 0.5 * (d - 1) * torch.log(sq)


REGULARIZERS = {None: None, "gaussian": gaussian_regularizer, "chi": chi_regularizer}


@dataclass(frozen=True, eq=False)
class DFlow:
    """D-Flow (Ben-Hamu et al., ICML 2024); see the module docstring.

    Fields (defaults and their source):

    * ``solver = DDIM()``, ``steps = 4`` -- chosen on the digits demo's tasks (validation digits the
      demo does not report; ``benchmarks/results/guidance_defaults.md``): a 4-step first-order map is
      smooth enough to optimise through; with the discrepancy stop it is within 0.4 dB of (inpainting)
      or 1.3 dB above (2x super-resolution) the demo's hand-tuned regularised settings at 0.8-0.9x
      their NFE. The re-implementations' midpoint (Heun) at 6 steps cost 3x the NFE and 3-5 dB.
      DDIM is Euler on a rectified flow and the robust first-order step for diffusion schedules.
      ``grid`` overrides ``steps``.
    * ``gradient = None`` -> ``Backprop()``: the exact gradient of the discrete solve, keeping ``steps``
      network graphs; ``Checkpoint()`` gives the same gradient with memory flat in the steps at about
      1.7x the NFE (recomputation; for large models), ``ContinuousAdjoint()`` an approximation.
    * ``iterations = 20``, ``max_iter = 20``, ``history_size = 100``, strong-Wolfe line search,
      ``lr = 1`` -- PnP-Flow's D-Flow baseline: 20 outer L-BFGS steps of up to 20 iterations (a cap;
      the discrepancy stop ends measurement fits much earlier). Stops early when an L-BFGS step needs
      no further evaluation (converged).
    * ``tolerance_grad = 1e-7``, ``tolerance_change = 1e-9`` -- torch's L-BFGS defaults.
    * ``regularizer = None`` (``"gaussian"`` or ``"chi"``), ``reg_weight = 1.0`` (PnP-Flow uses 0.01
      with ``"chi"``). With the discrepancy stop no regulariser is needed: the stop is the
      regularisation (``"gaussian"`` added 1 dB in inpainting, -0.3 dB in super-resolution, at 5-7x
      the NFE; without the stop the fit reaches the noise and loses 2.7-3.4 dB at 8x the NFE).
    * ``blend = None`` -- e.g. 0.1 (PnP-Flow; FlowChef's latent re-implementation); needs a
      :class:`MeasurementLoss` with a linear operator (its pseudo-inverse).
    * ``discrepancy = 1.0`` -- Morozov's discrepancy principle: a sample stops once its data loss is at
      most ``discrepancy * E[L(x_true)]`` (the objective's ``noise_floor``; for a
      :class:`MeasurementLoss`, half the number of measurements the operator sees plus the part of
      ``y`` no image can explain): fitting further explains noise. Samples that meet it keep the
      latent that met it, and the run ends when all have met it (``stop_reason="discrepancy"``).
      ``None`` (or an objective without ``noise_floor``) turns it off. (``1.2`` cost 1.5 dB on the
      inpainting task.)
    * ``progress = None`` -- a bar once the run has lasted a few seconds (``True``/``False``: always/never).
    * ``callback = None`` -- called after every objective evaluation with a
      :class:`~adjointflow.guidance.base.GuidanceStep`; a true return value stops the run. Stopped by it
      or by Ctrl-C, the result is each sample's best evaluation so far (lowest data + regulariser).

    The loss summed over the batch is minimised jointly (samples stay independent in value, but share
    L-BFGS's line search). NFE per objective evaluation = one solve (+ recomputation by Checkpoint),
    plus one solve of the final latent.
    """

    solver: Solver = field(default_factory=DDIM)
    steps: int = 4
    grid: Any = None
    gradient: Any = None
    iterations: int = 20
    max_iter: int = 20
    history_size: int = 100
    lr: float = 1.0
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    regularizer: str | None = None
    reg_weight: float = 1.0
    blend: float | None = None
    discrepancy: float | None = 1.0
    progress: bool | None = None
    callback: Any = None

    def __post_init__(self):
        if isinstance(self.solver, type) or not isinstance(self.solver, Solver):
            raise TypeError(f"solver must be an adjointflow Solver instance, e.g. DDIM(), got {self.solver!r}")
        if self.solver.stochastic:
            raise ValueError("D-Flow optimises the latent of a deterministic map; use an ODE solver")
        for name in ("steps", "iterations", "max_iter", "history_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("lr", "tolerance_grad", "tolerance_change", "reg_weight"):
            check_nonneg_float(name, getattr(self, name))
        if self.lr == 0:  # L-BFGS would not move (and divides by the step it took)
            raise ValueError("lr must be > 0, got 0")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {list(REGULARIZERS)}, got {self.regularizer!r}")
        if self.blend is not None and not (isinstance(self.blend, (int, float)) and 0 <= self.blend <= 1):
            raise ValueError(f"blend must be None or a number in [0, 1], got {self.blend!r}")
        if isinstance(self.gradient, type):
            raise TypeError(f"gradient must be an instance, e.g. {self.gradient.__name__}(), not the class")
        check_discrepancy(self.discrepancy)
        check_progress(self.progress)
        check_callback(self.callback)

    def initial_latent(self, denoiser, objective, x_init: Tensor, cond=None) -> Tensor:
        """The latent the optimisation starts from: ``x_init``, or with ``blend = b``,
        ``sqrt(b) z_inv + sqrt(1 - b) x_init`` with ``z_inv`` the ODE inversion of ``A^+ y``."""
        check_run_inputs(denoiser, objective, x_init, cond)
        return self._init_latent(denoiser, objective, x_init, sampling_grid(denoiser, self.steps, self.grid), cond)

    def _init_latent(self, den, objective, x_init, grid, cond) -> Tensor:
        if self.blend is None:
            return x_init.detach().clone()
        op = getattr(objective, "operator", None)
        if not isinstance(objective, MeasurementLoss) or not op.linear:
            raise ValueError("blend initialisation needs a MeasurementLoss with a linear operator (it inverts A^+ y)")
        with torch.no_grad():
            y = objective._y_like(op(x_init.detach()))  # (batch, *out), validated against A's output
        x_back = op.pinv(y)
        if x_back.shape != x_init.shape:
            raise ValueError(f"A^+ y has shape {tuple(x_back.shape)} but x_init has {tuple(x_init.shape)}")
        with torch.no_grad():
            z_inv = solve(den, x_back, grid.flip(0), self.solver, cond=cond).x
        b = float(self.blend)
        return (math.sqrt(b) * z_inv + math.sqrt(1.0 - b) * x_init).detach().clone()

    def run(self, denoiser, objective, x_init: Tensor, cond=None) -> GuidanceResult:
        """Optimise the latent starting from ``x_init`` (or the blend of it with the inverted ``A^+ y``)."""
        check_run_inputs(denoiser, objective, x_init, cond)
        timer, counter = Timer(), Counter()
        grid = sampling_grid(denoiser, self.steps, self.grid)
        den = CountedDenoiser(denoiser, counter)
        gradient = Backprop() if self.gradient is None else self.gradient
        if isinstance(gradient, ContinuousAdjoint):  # the latent only: no parameter integrals
            gradient = dataclasses.replace(gradient, params=())
        reg = REGULARIZERS[self.regularizer]
        cond_d = None if cond is None else (cond.detach() if isinstance(cond, Tensor) else cond)
        z = self._init_latent(den, objective, x_init, grid, cond_d).requires_grad_(True)
        target = discrepancy_target(objective, x_init, self.discrepancy)
        batch = x_init.shape[0]
        max_eval = self.max_iter * 5 // 4  # torch's L-BFGS default per step
        mon = RunMonitor("DFlow", self.iterations * max_eval, callback=self.callback, progress=self.progress,
                         keep_best=True)

        def closure():
            x = solve(den, z, grid, self.solver, cond=cond_d, gradient=gradient).x
            data = evaluate_objective(objective, x, where=f"at L-BFGS evaluation {len(mon.losses)}")
            per = data if reg is None else data + self.reg_weight * reg(z)
            if not bool(torch.isfinite(per).all()):
                raise NonFiniteError("the D-Flow regulariser is not finite (||z|| = 0 with 'chi'?)")
            # samples that met the target keep their accepted result; they stay in the joint objective
            # (masking them out and restarting L-BFGS cost ~10 % more evaluations on the digits tasks)
            total = per.sum()
            # only the latent's gradient: nothing accumulates in the network's .grad
            (z.grad,) = torch.autograd.grad(total, z)
            if mon.record(len(mon.losses), data, x, latent=z, score=per):
                raise _Stop("callback")
            if mon.meet(data, target):
                raise _Stop("discrepancy")
            return total

        opt = torch.optim.LBFGS([z], lr=self.lr, max_iter=self.max_iter, max_eval=max_eval,
                                history_size=self.history_size, tolerance_grad=self.tolerance_grad,
                                tolerance_change=self.tolerance_change, line_search_fn="strong_wolfe")
        reason = "completed"
        with mon:
            for _ in range(self.iterations):
                before = len(mon.losses)
                try:
                    opt.step(closure)
                except _Stop as stop:
                    reason = stop.reason
                    break
                if len(mon.losses) - before <= 1:  # converged: L-BFGS stopped at its first evaluation
                    reason = "converged"
                    break
        if mon.interrupted or reason == "callback":  # each sample's best evaluation so far
            x, z, last = mon.estimate(x_init)
        else:  # the optimiser's final latent, with the samples that met the target at the latent that met it
            z = z.detach()
            done = mon.accepted(batch).to(z.device)
            z[done] = mon.estimate(z)[1][done].to(z.dtype)
            with torch.no_grad():
                x = solve(den, z, grid, self.solver, cond=cond_d).x
                last = evaluate_objective(objective, x, where="at the final sample")
        return GuidanceResult(x, z, stack_losses(mon.losses + [last]), counter.nfe, counter.vjps, timer.seconds, cond,
                              "interrupted" if mon.interrupted else reason)


class _Stop(Exception):
    """Ends the L-BFGS step from inside its closure."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
