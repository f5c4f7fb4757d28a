"""A Gaussian measurement ``y = A x_0 + sigma_y n`` seen in the singular basis of ``A = U diag(s) V^T``.

With ``c = V^T x`` and ``u = U^T y`` the likelihood decouples per spectral entry,
``u_i = s_i c_i + sigma_y n_i``, which gives the closed forms the SVD-based methods need:

* :meth:`SpectralMeasurement.prox` -- ``argmin_x ||y - A x||^2 + mu ||x - z||^2``
  ``= V (s u + mu V^T z) / (s^2 + mu)`` (entrywise; ``V^T z`` where ``s = mu = 0``).
* :meth:`SpectralMeasurement.gain` -- ``A^T (r^2 A A^T + sigma_y^2 I)^{-1} (y - A z)``
  ``= V [s (u - s V^T z) / (r^2 s^2 + sigma_y^2)]``, the Gaussian-likelihood score of PiGDM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .objectives import MeasurementLoss, Operator, svd_operator_names

__all__ = ["SpectralMeasurement"]


@dataclass(frozen=True, eq=False)
class SpectralMeasurement:
    """``s`` (one sample's spectral layout), ``u = U^T y`` (batch), ``sigma_y`` of a Gaussian measurement."""

    operator: Operator
    s: Tensor
    u: Tensor
    sigma: float

    @classmethod
    def of(cls, objective, x: Tensor, who: str) -> "SpectralMeasurement":
        """Check that ``objective`` is a Gaussian :class:`MeasurementLoss` whose operator has an SVD,
        and express its measurement in that basis for samples shaped like ``x``."""
        if not isinstance(objective, MeasurementLoss):
            raise TypeError(f"{who} needs the objective MeasurementLoss(operator, y, sigma) (it uses the operator's "
                            f"SVD and the noise level sigma_y), got {type(objective).__name__}")
        if objective.noise != "gaussian":
            raise ValueError(f"{who} needs Gaussian measurement noise, got MeasurementLoss(noise={objective.noise!r})")
        op = objective.operator
        if not op.has_svd:
            raise TypeError(f"{who} needs an operator with a closed-form SVD ({', '.join(svd_operator_names())}); "
                            f"{type(op).__name__} has none")
        with torch.no_grad():
            ax = op(x)
            y = objective._y_like(ax)
            return cls(op, op.singular_values(x), op.svd_ut(y), objective.sigma)

    def vt(self, x: Tensor) -> Tensor:
        return self.operator.svd_vt(x)

    def v(self, c: Tensor) -> Tensor:
        return self.operator.svd_v(c)

    def prox(self, z: Tensor, mu: float) -> Tensor:
        """``argmin_x ||y - A x||^2 + mu ||x - z||^2`` (``mu >= 0``; the least-squares solution closest
        to ``z`` at ``mu = 0``)."""
        c, s = self.vt(z), self.s
        den = s * s + mu
        safe = torch.where(den > 0, den, torch.ones_like(den))
        return self.v(torch.where(den > 0, (s * self.u + mu * c) / safe, c))

    def gain(self, z: Tensor, r2: float) -> Tensor:
        """``A^T (r2 A A^T + sigma_y^2 I)^{-1} (y - A z)``."""
        c, s = self.vt(z), self.s
        return self.v(s * (self.u - s * c) / (r2 * s * s + self.sigma**2))
