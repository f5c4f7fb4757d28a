"""PiGDM: pseudo-inverse-guided diffusion models (Song, Vahdat, Mardani, Kautz; ICLR 2023).

The likelihood of a Gaussian measurement given ``x_t`` is approximated with
``p(x_0 | x_t) ~ N(x0_hat, r_t^2 I)``, so ``p(y | x_t) ~ N(A x0_hat, r_t^2 A A^T + sigma_y^2 I)`` and

    g = grad_{x_t} log p(y | x_t) = J^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat),   J = d x0_hat / d x_t

(one VJP through the network; the inverse in closed form through the operator's SVD). The paper's
``r_t^2 = rho^2 / (1 + rho^2)`` (``rho = sigma / alpha``) is ``Cov[x_0 | x_t]`` of unit-variance data;
``data_variance = c`` gives ``r_t^2 = c rho^2 / (c + rho^2)``.

Update (Bayes' weight): Tweedie's formula for the posterior, ``E[x0 | x_t, y] = E[x0 | x_t] +
(sigma^2 / alpha) grad log p(y | x_t)``, gives the corrected pair

    x0_tilde = x0_hat + scale (sigma^2 / alpha) g,    eps_tilde = (x_t - alpha x0_tilde) / sigma

and the DDIM step ``x_{t'} = alpha' x0_tilde + sigma' (sqrt(1 - eta^2) eps_tilde + eta z)``. With
``scale = 1``, ``eta = 0`` and a likelihood that is exact (Gaussian data ``N(m, c I)``), this is the
posterior's probability-flow ODE, so samples converge to the exact posterior as steps grow. (The
paper adds ``sqrt(alpha_bar_t) g`` to a DDIM step instead, a heuristic weight; ``scale`` plays that role.)
At ``alpha = 0`` (a flow's ``t = 1``) ``x_t`` carries no information on ``x_0``: the step is unguided.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import check_nonneg_float
from .spectral import SpectralMeasurement
from .stepwise import Step, StepwiseSampler, check_fraction, check_variance, tweedie_variance

__all__ = ["PiGDM"]


@dataclass(frozen=True, eq=False)
class PiGDM(StepwiseSampler):
    """PiGDM (Song et al. 2023) for diffusion and flow models; see the module docstring.

    Fields (defaults and their source):

    * ``steps = 100`` -- the paper's 100 steps; ``grid`` (decreasing) overrides it.
    * ``eta = 1.0`` -- the paper's DDIM ``eta`` (fresh-noise fraction here); ``0`` is deterministic.
    * ``scale = 1.0`` -- multiplies Bayes' weight ``sigma^2 / alpha`` of the likelihood score.
    * ``data_variance = 1.0`` -- ``c`` in ``r_t^2`` (the paper's unit variance).
    * ``stop = None`` -- a noise level ``rho = sigma / alpha`` at which to return ``x0_tilde`` (Tweedie's
      ``E[x0 | x_t, y]``) instead of a sample: posterior-mean output, see :mod:`adjointflow.guidance.stepwise`.
    * ``seed = 0``; ``progress = None``, ``callback = None`` (see :class:`~adjointflow.guidance.base.RunMonitor`).

    The objective must be ``MeasurementLoss(op, y, sigma)`` with Gaussian noise and an operator with a
    closed-form SVD. Cost: ``steps`` NFE and ``steps`` VJPs through the network.
    """

    steps: int = 100
    eta: float = 1.0
    scale: float = 1.0
    data_variance: float = 1.0
    stop: float | None = None
    grid: Any = None
    seed: int = 0
    progress: bool | None = None
    callback: Any = None

    label = "PiGDM"

    def __post_init__(self):
        self._check_common()
        check_fraction("eta", self.eta)
        check_nonneg_float("scale", self.scale)
        check_variance(self.data_variance)

    def _prepare(self, denoiser, objective, x):
        return SpectralMeasurement.of(objective, x, "PiGDM")

    def _corrected(self, m: SpectralMeasurement, step: Step, x):
        """``(x0_hat, x0_tilde)`` at ``(x, step.t)``: one NFE, one VJP where guided."""
        h = step.host
        guided = h.alpha > 0 and self.scale > 0
        xg = x.detach().requires_grad_(guided)
        with torch.set_grad_enabled(guided):
            x0 = step.model(xg, step.at).x0
        x0_tilde = x0.detach()
        if guided:
            r = h.sigma / h.alpha
            r2 = tweedie_variance(r * r, self.data_variance)  # r * r overflows to inf where ** would raise
            (g,) = torch.autograd.grad(x0, xg, grad_outputs=m.gain(x0_tilde, r2))
            # sigma^2 / alpha from the same float64 host values as the guard above (alpha > 0 there may round
            # to 0 in the state's dtype)
            x0_tilde = x0_tilde + self.scale * (h.sigma * h.sigma / h.alpha) * g
        return x0.detach(), x0_tilde

    def _update(self, m: SpectralMeasurement, step: Step, x):
        x0, x0_tilde = self._corrected(m, step, x)
        with torch.no_grad():
            eps_tilde = (x - step.alpha * x0_tilde) / step.sigma
            return step.renoise(x0_tilde, eps_tilde, self.eta), x0

    def _estimate(self, m: SpectralMeasurement, step: Step, x):
        return self._corrected(m, step, x)[1]
