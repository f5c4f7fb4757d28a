"""DiffPIR: denoising diffusion models for plug-and-play image restoration (Zhu, Zhang, Liang, Cao, Wen,
Timofte, Van Gool; CVPR 2023 workshops, Alg. 1), half-quadratic splitting with the operator's proximal map.

Per step, with the denoiser's ``x0_hat`` at ``(x_t, t)`` and the VE noise level ``rho = sigma / alpha``:

    x0_tilde  = argmin_x ||y - A x||^2 + mu_t ||x - x0_hat||^2,   mu_t = lambda sigma_y^2 / r_t^2   (data step)
    eps_tilde = (x_t - alpha x0_tilde) / sigma
    x_{t'}    = alpha' x0_tilde + sigma' (sqrt(1 - zeta) eps_tilde + sqrt(zeta) z)

The data step is closed form in the operator's SVD (:meth:`SpectralMeasurement.prox`). The paper
uses ``r_t^2 = rho^2`` (here ``data_variance = inf``); ``r_t^2 = c rho^2 / (c + rho^2)`` (finite
``c``) is ``Cov[x_0 | x_t]`` of data ``N(m, c I)`` and stays bounded at a flow's ``t = 1``. With
``lambda = 1``, ``zeta = 0`` and Gaussian data ``N(m, c I)`` the data step is the exact
``E[x_0 | x_t, y]``, and the sampler is the posterior's probability-flow ODE in DDIM form.
One network evaluation per step, no VJP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .base import check_nonneg_float
from .spectral import SpectralMeasurement
from .stepwise import Step, StepwiseSampler, check_fraction, check_variance, tweedie_variance

__all__ = ["DiffPIR"]


@dataclass(frozen=True, eq=False)
class DiffPIR(StepwiseSampler):
    """DiffPIR (Zhu et al. 2023) for diffusion and flow models; see the module docstring.

    Fields (defaults and their source):

    * ``steps = 100`` -- the paper's 100 NFE; ``grid`` (decreasing) overrides it.
    * ``lam = 1.0``, ``zeta = 1.0`` -- ``lambda`` of the data step and the fresh-noise fraction of the
      variance (in ``[0, 1]``): chosen on the digits benchmark's validation digits, the best of
      ``lam`` in {1, 7, 25} x ``zeta`` in {0.1, 0.3, 1} for inpainting, 2x super-resolution and
      deblurring at 50 and 100 NFE alike (benchmarks/results/inverse.md). The paper uses ``lambda``
      3-25 (deepinv's default 7) and ``zeta`` 0.3 (super-resolution, deblurring) or 1 (inpainting).
    * ``data_variance = 1.0`` -- ``c`` in ``r_t^2``; ``inf`` is the paper's ``rho^2``.
    * ``stop = None`` -- a noise level ``rho = sigma / alpha`` at which to return the data step's
      ``x0_tilde`` instead of a sample: posterior-mean output, see :mod:`adjointflow.guidance.stepwise`.
    * ``seed = 0``; ``progress = None``, ``callback = None`` (see :class:`~adjointflow.guidance.base.RunMonitor`).

    The objective must be ``MeasurementLoss(op, y, sigma)`` with Gaussian noise and an operator with a
    closed-form SVD. Cost: ``steps`` NFE, zero VJPs.
    """

    steps: int = 100
    lam: float = 1.0
    zeta: float = 1.0
    data_variance: float = 1.0
    stop: float | None = None
    grid: Any = None
    seed: int = 0
    progress: bool | None = None
    callback: Any = None

    label = "DiffPIR"

    def __post_init__(self):
        self._check_common()
        check_nonneg_float("lam", self.lam)
        check_fraction("zeta", self.zeta)
        check_variance(self.data_variance)

    def _prepare(self, denoiser, objective, x):
        return SpectralMeasurement.of(objective, x, "DiffPIR")

    def _corrected(self, m: SpectralMeasurement, step: Step, x):
        """``(x0_hat, x0_tilde)`` at ``(x, step.t)``: the network's estimate and the data step's (one NFE)."""
        h = step.host
        with torch.no_grad():
            x0 = step.model(x, step.at).x0
            r = h.sigma / h.alpha if h.alpha > 0 else math.inf
            rho2 = r * r  # a product overflows to inf where ** raises OverflowError
            return x0, m.prox(x0, self.lam * m.sigma**2 / tweedie_variance(rho2, self.data_variance))

    def _update(self, m: SpectralMeasurement, step: Step, x):
        x0, x0_tilde = self._corrected(m, step, x)
        with torch.no_grad():
            eps_tilde = (x - step.alpha * x0_tilde) / step.sigma
            return step.renoise(x0_tilde, eps_tilde, math.sqrt(self.zeta)), x0

    def _estimate(self, m: SpectralMeasurement, step: Step, x):
        return self._corrected(m, step, x)[1]
