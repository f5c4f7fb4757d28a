"""LanPaint-style exact inpainting: Langevin steps inside each ODE step (after Zheng, Lan, Wang; TMLR 2025,
arXiv 2502.03491), on the measured/unmeasured split of the operator's singular basis.

In the singular basis (``c = V^T x``, ``y_bar = U^T y / s``) a measured coordinate is
``y_bar_i = c0_i + tau_i n_i`` with ``tau_i = sigma_y / s_i``. While the noise level ``rho = sigma / alpha``
is at least ``tau_i``, the coordinate of ``x_t`` given ``y`` is *pinned* to the noised measurement

    c_i = alpha y_bar_i + sqrt(sigma^2 - alpha^2 tau_i^2) xi_i          (one xi per run: a consistent path),

which has the law of ``alpha c0_i + sigma eps_i`` (the coupling of DDRM's ``eta_b = 1``). The free
coordinates are then moved toward ``p_t(free | pinned)`` by ``K`` unadjusted Langevin steps with the
model's score ``-eps_hat / sigma`` (step ``delta = step_size sigma^2``), and one ancestral step
(DDPM's ``q(x_t' | x_t, x0_hat)``: DDIM with ``eta^2 = 1 - (rho' / rho)^2``) carries everything to the
next time. At the level where ``rho = tau`` the pinned coordinates equal ``alpha y_bar``, which
determines ``y``, so ``p(x_0 | x_t, y) = p(x_0 | x_t)``: from there the unconditional reverse process is
the exact posterior sampler (the ancestral steps, not the probability-flow ODE, which transports
marginals but not conditionals), and no more Langevin steps are taken. Hence, for operators whose non-zero singular
values are all equal (:class:`Inpaint`, :class:`Downsample`) and with that level on the grid (the run
moves the nearest grid time onto it), the sampler is exact as the Langevin chain mixes, the step size
shrinks and the steps grow. LanPaint's own "BiG score" and fast Langevin scheme are not reproduced.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from .base import check_nonneg_float
from .spectral import SpectralMeasurement
from .stepwise import Step, StepwiseSampler, check_int

__all__ = ["LanPaint"]


@dataclass(frozen=True)
class _Pinned:
    m: SpectralMeasurement
    ybar: torch.Tensor
    tau: torch.Tensor   # sigma_y / s (inf where s = 0)
    xi: torch.Tensor
    pinned_any: tuple = ()  # per grid time: is any coordinate pinned there (read once per run)


@dataclass(frozen=True, eq=False)
class LanPaint(StepwiseSampler):
    """Exact inpainting by Langevin steps inside each ODE step (LanPaint-style); see the module docstring.

    Fields (defaults and their source):

    * ``steps = 50`` -- ODE steps; ``grid`` (decreasing) overrides it (its time nearest the level
      ``sigma / alpha = sigma_y / s_max`` is moved onto that level).
    * ``langevin_steps = 5`` -- inner Langevin steps per ODE step while coordinates are pinned
      ("LanPaint-5", the paper's common setting).
    * ``step_size = 0.2`` -- Langevin step ``delta = step_size sigma^2`` (stable below 2).
    * ``seed = 0``; ``progress = None``, ``callback = None`` (see :class:`~adjointflow.guidance.base.RunMonitor`).

    The objective must be ``MeasurementLoss(op, y, sigma)`` with Gaussian noise and an operator with a
    closed-form SVD. Cost: ``steps`` NFE plus ``langevin_steps`` per pinned step; zero VJPs.
    """

    steps: int = 50
    langevin_steps: int = 5
    step_size: float = 0.2
    grid: Any = None
    seed: int = 0
    progress: bool | None = None
    callback: Any = None

    label = "LanPaint"

    def __post_init__(self):
        self._check_common()
        check_int("langevin_steps", self.langevin_steps)
        if self.langevin_steps < 0:
            raise ValueError(f"langevin_steps must be >= 0, got {self.langevin_steps!r}")
        check_nonneg_float("step_size", self.step_size)

    def _prepare(self, denoiser, objective, x):
        m = SpectralMeasurement.of(objective, x, "LanPaint")
        seen = m.s > 0
        s_safe = torch.where(seen, m.s, torch.ones_like(m.s))
        tau = torch.where(seen, m.sigma / s_safe, torch.full_like(m.s, math.inf))
        gen = torch.Generator(device=x.device).manual_seed(self.seed + 1)
        xi = torch.randn(m.u.shape, generator=gen, dtype=x.dtype, device=x.device)
        return _Pinned(m, torch.where(seen, m.u / s_safe, torch.zeros_like(m.u)), tau, xi)

    def _grid(self, p: _Pinned, denoiser, grid):
        # the level rho = sigma_y / s_max, where the pinned coordinates become exact (log-SNR lambda = -log rho)
        lam_star = -math.log(float(p.tau.min()))
        lam = denoiser.schedule.log_snr(grid)
        k = int((lam[1:-1] - lam_star).abs().argmin()) + 1 if len(grid) > 2 else 0
        if 0 < k < len(grid) - 1 and float(lam[0]) < lam_star < float(lam[-1]):
            grid = grid.clone()
            grid[k] = denoiser.schedule.t_from_log_snr(torch.tensor(lam_star, dtype=torch.float64))
        return grid

    def _plan(self, p: _Pinned, alphas, sigmas):
        # the test _pin makes, for every grid time at once: one host read per run instead of one per step
        shape = (-1,) + (1,) * p.tau.ndim
        pinned = sigmas.reshape(shape) * (1.0 + 1e-5) >= alphas.reshape(shape) * p.tau
        return dataclasses.replace(p, pinned_any=tuple(pinned.flatten(1).any(1).tolist()))

    def _pin(self, p: _Pinned, c, a, sg):
        # the relative slack keeps the level moved onto the grid pinned despite rounding of t(lambda)
        pinned = sg * (1.0 + 1e-5) >= a * p.tau
        var = (sg * sg - (a * torch.where(pinned, p.tau, torch.zeros_like(p.tau))) ** 2).clamp_min(0.0)
        return torch.where(pinned, a * p.ybar + var.sqrt() * p.xi, c), pinned

    def _update(self, p: _Pinned, step: Step, x):
        a, sg, h = step.alpha, step.sigma, step.host
        with torch.no_grad():
            c, pinned = self._pin(p, p.m.vt(x), a, sg)
            if p.pinned_any[step.i] and self.langevin_steps > 0:
                delta = self.step_size * sg * sg
                for _ in range(self.langevin_steps):
                    e = p.m.vt(step.model(p.m.v(c), step.at).eps)
                    moved = c - (delta / sg) * e + torch.sqrt(2.0 * delta) * step.noise(c)
                    c = torch.where(pinned, c, moved)
            x = p.m.v(c)
            pred = step.model(x, step.at)
            # ancestral (DDPM) step: rho'/rho of the noise is kept, the rest drawn fresh
            keep = h.sigma_next * h.alpha / (h.sigma * h.alpha_next) if h.alpha > 0 else 0.0
            return step.renoise(pred.x0, pred.eps, math.sqrt(max(1.0 - keep * keep, 0.0))), pred.x0
