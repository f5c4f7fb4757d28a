"""AdjointGuidance: gradient descent on the latent, the conditioning and/or the network's parameters
through the whole solve (Blasingame & Liu, "AdjointDEIS: Efficient Gradients for Diffusion Models",
NeurIPS 2024; Pan et al., AdjointDPM, ICLR 2024).

Per iteration, with ``x = solve(denoiser, z, grid, solver, cond=c)`` under the parameters ``theta``:

    (z, c, theta) <- optimiser step on  sum_b L(x_b)

The gradients come from the chosen gradient strategy: :class:`~adjointflow.adjoint.ContinuousAdjoint`
(AdjointDEIS-1/-2M for exponential integrators: a_x, a_z, a_theta integrated backward along the
recorded states, one network graph alive at a time; an O(h^k) approximation of the discrete gradient)
or :class:`~adjointflow.adjoint.Backprop` / :class:`~adjointflow.adjoint.Checkpoint` (the exact gradient of
the solver that was run). Only the
optimised tensors receive gradients; nothing accumulates in the network's ``.grad``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from ..adjoint import Backprop, ContinuousAdjoint, GradientStrategy
from ..adjoint.equations import check_params, cond_leaves, default_params, with_cond_leaves
from ..driver import solve
from ..solvers.base import Solver
from ..solvers.ddim import DDIM
from .base import (Counter, CountedDenoiser, GuidanceResult, RunMonitor, Timer, check_callback, check_discrepancy,
                   check_nonneg_float, check_positive_int, check_progress, check_run_inputs, discrepancy_target,
                   evaluate_objective, resolve_noise, sampling_grid, stack_losses, step_scale)

__all__ = ["AdjointGuidance"]

TARGETS = ("latent", "cond", "params")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True, eq=False)
class AdjointGuidance:
    """Optimise latent / ``cond`` / parameters through the solve; see the module docstring.

    Fields (defaults and their source):

    * ``solver = DDIM()``, ``steps = 4`` -- the paper samples with 20 DDIM steps (N = M = 20); on the
      digits demo's tasks 4 steps and 100 iterations beat the hand-tuned 5-step settings by 1.3-1.5 dB at
      the same NFE (``benchmarks/results/guidance_defaults.md``), where 20 steps cost 5x per iteration.
    * ``gradient = None`` -> ``Backprop()``: the exact gradient of the solver that was run, keeping
      ``steps`` network graphs. ``Checkpoint()``: the same gradient with memory flat in the steps
      (stored states + one step's graph) at 1.7x the NFE (recomputation); the AdjointDEIS authors now
      recommend exact gradients over the continuous adjoint (project page, 2026), whose error at few
      steps can be large; ``ContinuousAdjoint()`` (AdjointDEIS-1/-2M) is the opt-in.
    * ``optimize = ("latent",)`` -- any of ``"latent"``, ``"cond"``, ``"params"``.
    * ``params = None`` -- with ``"params"``: the tensors to optimise (default: every parameter of the
      denoiser that requires grad). They are updated **in place**, like a training step.
    * ``iterations = 100`` -- twice the paper's 50 gradient-descent steps, for the cheaper 4-step solve
      (a cap: the discrepancy stop ends measurement fits earlier).
    * ``optimizer = "adam"``, ``lr = 0.1`` -- Adam's steps do not depend on the loss's scale. The paper
      uses plain gradient descent with lr 0.1 (its Table 6) on an O(1) identity loss;
      ``optimizer="sgd", lr=0.1`` reproduces that. SGD steps are ``lr * s * grad`` with ``s`` the
      objective's ``step_scale`` (``sigma_y^2`` for a Gaussian :class:`MeasurementLoss`, 1 otherwise),
      so ``lr`` does not depend on the noise level (``sgd, lr=1`` reached the same PSNR as Adam 0.1 on
      the digits tasks; ``lr=4`` diverged).
    * ``noise`` -- a :class:`~adjointflow.noise.BrownianNoise` for SDE solvers (default: seeded from torch's
      generator, so ``torch.manual_seed`` reproduces it; reused
      every iteration so the objective is a fixed function).
    * ``discrepancy = 1.0`` -- with ``optimize=("latent",)``: a sample stops once its loss is at most
      ``discrepancy * E[L(x_true)]`` (the objective's ``noise_floor``; see :class:`DFlow`) and keeps
      the latent that met it; the run ends when all have (``stop_reason="discrepancy"``). ``None``: off.
    * ``progress = None`` -- a bar once the run has lasted a few seconds (``True``/``False``: always/never).
    * ``callback = None`` -- called after every iteration (and for the final iterate) with a
      :class:`~adjointflow.guidance.base.GuidanceStep`; a true return value stops the run. Stopped by it
      or by Ctrl-C, the result is, with ``optimize=("latent",)``, each sample's best iterate so far,
      else the latest (``cond`` and parameters are left at the latest iterate).

    Cost per iteration: one solve (``steps * nfe_per_step`` NFE) plus the strategy's backward pass
    (Backprop: one VJP per NFE; ContinuousAdjoint: one NFE + one VJP per adjoint evaluation;
    Checkpoint: the solve's NFE again and as many VJPs).
    """

    solver: Solver = field(default_factory=DDIM)
    steps: int = 4
    grid: Any = None
    gradient: Any = None
    optimize: tuple = ("latent",)
    params: Any = None
    iterations: int = 100
    optimizer: str = "adam"
    lr: float = 0.1
    noise: Any = None
    discrepancy: float | None = 1.0
    progress: bool | None = None
    callback: Any = None

    def __post_init__(self):
        if isinstance(self.solver, type) or not isinstance(self.solver, Solver):
            raise TypeError(f"solver must be an adjointflow Solver instance, e.g. DDIM(), got {self.solver!r}")
        check_positive_int("steps", self.steps)
        check_positive_int("iterations", self.iterations)
        check_nonneg_float("lr", self.lr)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        opt = (self.optimize,) if isinstance(self.optimize, str) else tuple(self.optimize)
        bad = [o for o in opt if o not in TARGETS]
        if not opt or bad or len(set(opt)) != len(opt):
            raise ValueError(f"optimize must be a non-empty selection of {TARGETS} without repeats, got {self.optimize!r}")
        object.__setattr__(self, "optimize", opt)
        if self.params is not None and "params" not in opt:
            raise ValueError("params were given but 'params' is not in optimize")
        if isinstance(self.gradient, type):
            raise TypeError(f"gradient must be an instance, e.g. {self.gradient.__name__}(), not the class")
        if self.gradient is not None and not isinstance(self.gradient, GradientStrategy):
            raise TypeError(f"gradient must be a strategy (ContinuousAdjoint(), Checkpoint(), ...), got {self.gradient!r}")
        check_discrepancy(self.discrepancy)
        check_progress(self.progress)
        check_callback(self.callback)

    # --- set-up ---------------------------------------------------------------------------------
    def _leaves(self, denoiser, x_init: Tensor, cond):
        """Fresh leaf copies of the latent and ``cond``, and the parameter list, as optimised."""
        z = x_init.detach().clone().requires_grad_("latent" in self.optimize)
        keys, cvals = [], []
        if "cond" in self.optimize:
            if cond is None:
                raise ValueError("optimize contains 'cond' but no cond was given")
            keys = [k for k, _ in cond_leaves(cond)]
            if not keys:
                raise ValueError("optimize contains 'cond' but cond has no floating-point tensor to optimise")
            cvals = [v.detach().clone().requires_grad_(True) for _, v in cond_leaves(cond)]
            cond = with_cond_leaves(cond, keys, cvals)
        elif cond is not None:
            cond = {k: v.detach() for k, v in cond.items()} if isinstance(cond, Mapping) else cond.detach()
        params: list[Tensor] = []
        if "params" in self.optimize:
            params = check_params(self.params) if self.params is not None else default_params(denoiser)
            if not params:
                raise ValueError("optimize contains 'params' but the denoiser has no parameter that requires grad")
        return z, cond, keys, cvals, params

    def _strategy(self, params):
        g = Backprop() if self.gradient is None else self.gradient
        if isinstance(g, ContinuousAdjoint):
            # differentiate exactly the optimised parameters (none otherwise): no wasted work, no side effects
            g = dataclasses.replace(g, params=tuple(params))
        return g

    def _loss_and_grads(self, den, objective, grid, strategy, noise, z, cond, wrt, where):
        x = solve(den, z, grid, self.solver, cond=cond, gradient=strategy, noise=noise).x
        loss = evaluate_objective(objective, x, where=where)
        grads = torch.autograd.grad(loss.sum(), wrt, allow_unused=True)
        return x.detach(), loss.detach(), [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]

    # --- public -----------------------------------------------------------------------------------
    def gradients(self, denoiser, objective, x_init: Tensor, cond=None) -> dict:
        """One evaluation: the objective at ``solve(x_init)`` and its gradients w.r.t. the optimised
        tensors, ``{"loss", "latent", "cond", "params"}`` (absent targets are ``None``; ``cond`` has
        ``cond``'s structure; ``params`` is a tuple). Nothing is updated."""
        check_run_inputs(denoiser, objective, x_init, cond)
        grid = sampling_grid(denoiser, self.steps, self.grid)
        z, c, keys, cvals, params = self._leaves(denoiser, x_init, cond)
        wrt = ([z] if "latent" in self.optimize else []) + cvals + params
        noise = resolve_noise(self.solver, self.noise, x_init, grid)
        with torch.enable_grad():
            _, loss, grads = self._loss_and_grads(denoiser, objective, grid, self._strategy(params), noise, z, c, wrt, "")
        out = {"loss": loss, "latent": None, "cond": None, "params": None}
        k = 0
        if "latent" in self.optimize:
            out["latent"], k = grads[0], 1
        if cvals:
            g = grads[k:k + len(cvals)]
            out["cond"] = g[0] if isinstance(cond, Tensor) else dict(zip(keys, g))
            k += len(cvals)
        if params:
            out["params"] = tuple(grads[k:])
        return out

    def run(self, denoiser, objective, x_init: Tensor, cond=None) -> GuidanceResult:
        """Optimise from ``x_init`` (and ``cond``, and the parameters, as selected by ``optimize``)."""
        check_run_inputs(denoiser, objective, x_init, cond)
        timer, counter = Timer(), Counter()
        grid = sampling_grid(denoiser, self.steps, self.grid)
        den = CountedDenoiser(denoiser, counter)
        z, c, keys, cvals, params = self._leaves(denoiser, x_init, cond)
        strategy, noise = self._strategy(params), resolve_noise(self.solver, self.noise, x_init, grid)
        wrt = ([z] if "latent" in self.optimize else []) + cvals + params
        opt = (torch.optim.SGD(wrt, lr=self.lr * step_scale(objective)) if self.optimizer == "sgd"
               else torch.optim.Adam(wrt, lr=self.lr))
        saved = [p.grad for p in params]  # the optimiser reads .grad; the user's are restored afterwards
        latent_only = self.optimize == ("latent",)
        # per-sample stopping and best-so-far need samples that do not share what is optimised
        target = discrepancy_target(objective, x_init, self.discrepancy) if latent_only else None
        mon = RunMonitor("AdjointGuidance", self.iterations + 1, callback=self.callback, progress=self.progress,
                         keep_best=latent_only)
        reason = "completed"
        with mon:
            try:
                for it in range(self.iterations + 1):
                    last = it == self.iterations  # evaluate the final iterate, no update after it
                    with torch.set_grad_enabled(not last):
                        if last:
                            x = solve(den, z.detach(), grid, self.solver, cond=c, noise=noise).x
                            loss = evaluate_objective(objective, x, where="at the final sample")
                        else:
                            x, loss, grads = self._loss_and_grads(den, objective, grid, strategy, noise, z, c, wrt,
                                                                  f"at iteration {it}")
                    if mon.record(it, loss, x, latent=z):
                        reason = "callback"
                        break
                    if mon.meet(loss, target):
                        reason = "discrepancy"
                        break
                    if last:
                        break
                    for w, g in zip(wrt, grads):
                        w.grad = g
                    frozen = mon.accepted(x_init.shape[0]).to(z.device)
                    keep = z.detach()[frozen].clone()
                    opt.step()
                    if bool(frozen.any()):  # samples at the target stay where they met it
                        with torch.no_grad():
                            z[frozen] = keep
            finally:
                for w in wrt:
                    w.grad = None
                for p, g in zip(params, saved):
                    p.grad = g
        x, z_out, last_loss = mon.estimate(z)
        c_out = c
        if cvals:
            c_out = with_cond_leaves(c, keys, [v.detach() for v in cvals])
        return GuidanceResult(x, z_out.detach(), stack_losses(mon.losses + [last_loss]), counter.nfe, counter.vjps,
                              timer.seconds, c_out, "interrupted" if mon.interrupted else reason)
