"""DDRM: Denoising Diffusion Restoration Models (Kawar, Elad, Ermon, Song; NeurIPS 2022, Eq. 7-8).

In the singular basis of ``A = U diag(s) V^T`` (``c = V^T x``, ``u = U^T y``, ``y_bar = u / s``) the
measurement is per-entry, ``y_bar_i = c_i + (sigma_y / s_i) n_i``, and DDRM updates every entry on
its own. In the paper's variance-exploding form ``x = x0 + rho eps`` (``rho = sigma / alpha``; any
Gaussian path is that form scaled by ``alpha``), with ``c0 = V^T x0_hat``, ``e = V^T eps_hat`` and the
next noise level ``rho'``:

* ``s_i = 0`` (unseen):              ``c_i' = c0_i + rho' (sqrt(1 - eta^2) e_i + eta z_i)``
* ``rho' < sigma_y / s_i`` (y is the noisier): ``c_i' = c0_i + rho' (sqrt(1 - eta^2) (y_bar_i - c0_i) s_i / sigma_y + eta z_i)``
* ``rho' >= sigma_y / s_i``:         ``c_i' = (1 - eta_b) c0_i + eta_b y_bar_i + sqrt(rho'^2 - eta_b^2 sigma_y^2 / s_i^2) z_i``

then ``x_{t'} = alpha' V c'`` (written without dividing by ``s`` or ``alpha``, so tiny singular values
and ``alpha' -> 0`` stay finite). One network evaluation per step, no VJP.

``stop = rho_s`` (see :mod:`adjointflow.guidance.stepwise`) returns the network's ``E[x0 | x_t]`` at the
level ``rho_s`` instead of a sample. At ``rho_s = sigma_y / s`` of an operator with equal singular values
(``eta_b = 1``) the measured entries of ``x_t`` are exactly ``alpha y_bar``, the measurement at its own
noise level, and the rest is DDRM's chain at that level, so the estimate there is the posterior mean of
the measured entries given the chain (exactly, for Gaussian data).

DDRM is not an exact posterior sampler, not even for Gaussian data: the clean estimate is the
*unconditional* ``E[x0 | x_t]``, and ``eta > 0`` re-draws a fixed fraction of the noise every step, so
with many steps at ``eta = 1`` the unseen coordinates drift back toward the prior.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .spectral import SpectralMeasurement
from .stepwise import Step, StepwiseSampler, check_fraction

__all__ = ["DDRM"]


@dataclass(frozen=True, eq=False)
class DDRM(StepwiseSampler):
    """DDRM (Kawar et al. 2022) for diffusion and flow models; see the module docstring.

    Fields (defaults and their source):

    * ``steps = 20`` -- the paper's 20 steps ("DDRM-20"); ``grid`` (decreasing) overrides it.
    * ``eta = 0.85``, ``eta_b = 1.0`` -- the paper's defaults; both in ``[0, 1]``.
    * ``stop = None`` -- a noise level ``rho = sigma / alpha`` at which to return the clean estimate
      instead of a sample (posterior-mean output; ``sigma_y / s`` of the operator is the natural level).
    * ``seed = 0`` -- seeds the noise ``z``.
    * ``progress = None``, ``callback = None`` (see :class:`~adjointflow.guidance.base.RunMonitor`).

    The objective must be ``MeasurementLoss(op, y, sigma)`` with Gaussian noise and an operator with
    a closed-form SVD (:class:`Inpaint`, :class:`Downsample`, :class:`GaussianBlur`, :class:`MatrixOperator`).
    Cost: ``steps`` NFE, zero VJPs.
    """

    steps: int = 20
    eta: float = 0.85
    eta_b: float = 1.0
    stop: float | None = None
    grid: Any = None
    seed: int = 0
    progress: bool | None = None
    callback: Any = None

    label = "DDRM"

    def __post_init__(self):
        self._check_common()
        check_fraction("eta", self.eta)
        check_fraction("eta_b", self.eta_b)

    def _prepare(self, denoiser, objective, x):
        return SpectralMeasurement.of(objective, x, "DDRM")

    def _update(self, m: SpectralMeasurement, step: Step, x):
        with torch.no_grad():
            pred = step.model(x, step.at)
            x0, eps = pred.x0, pred.eps
            c0, e = m.vt(x0), m.vt(eps)
            z = step.noise(c0)
            a, sg, s, u, sy = step.alpha_next, step.sigma_next, m.s, m.u, m.sigma
            keep = (1.0 - self.eta**2) ** 0.5
            unseen = a * c0 + sg * (keep * e + self.eta * z)
            noisier_y = a * c0 + sg * (keep * (u - s * c0) / sy + self.eta * z)
            # rho' >= sigma_y / s  <=>  s sigma' >= sigma_y alpha'; there s > 0 is bounded below. The relative
            # slack keeps a grid time put exactly on that level (stop) pinned despite rounding of t(lambda)
            cleaner_y = s * sg * (1.0 + 1e-5) >= sy * a
            s_safe = torch.where(cleaner_y, s, torch.ones_like(s))
            var = (sg * sg - (a * self.eta_b * sy / s_safe) ** 2).clamp_min(0.0)
            pinned = a * ((1.0 - self.eta_b) * c0 + self.eta_b * u / s_safe) + var.sqrt() * z
            c = torch.where(s > 0, torch.where(cleaner_y, pinned, noisier_y), unseen)
            return m.v(c), x0
