"""DDIM: the first-order exponential integrator (order 1, 1 NFE/step)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..plan import At
from .base import State
from .exponential import ExponentialIntegrator, FirstOrder, Steps, check_choice, first_order, first_order_coefficients

__all__ = ["DDIM"]


class DDIMRow(NamedTuple):
    s: At  # model evaluation at t_s
    first: FirstOrder  # x_t = a x_s + b x0_hat (data form) / b eps_hat (noise form), or the limit at a singular end


@dataclass(frozen=True)
class DDIM(ExponentialIntegrator):
    """Deterministic DDIM (Song, Meng & Ermon 2021, arXiv:2010.02502, eq. 12 with eta = 0):

        x_t = alpha_t x0_hat(x_s, s) + sigma_t eps_hat(x_s, s).

    It is the first-order exponential integrator in ``lambda = log(alpha/sigma)``
    (Lu et al. 2022 = DPM-Solver-1; Zhang & Chen 2022 = DEIS-1), evaluated in one of the two
    algebraically identical forms (``h = lambda_t - lambda_s``):

    * ``prediction="eps"`` (noise form): ``x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_hat``
    * ``prediction="x0"`` (data form):  ``x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) x0_hat``

    They differ only by rounding. (The continuous adjoint's form is chosen by
    ``ContinuousAdjoint(form=...)``, independently of this field.)
    Steps from ``alpha = 0`` (``t = 1`` of LinearFlow) and to ``sigma = 0`` (denoise to ``t = 0``)
    take their exact limits (see :mod:`adjointflow.solvers.exponential`). Global order 1.
    """

    prediction: str = "eps"

    def __post_init__(self):
        check_choice("DDIM", "prediction", self.prediction, ("eps", "x0"))

    def rows(self, plan):
        firsts = first_order_coefficients(Steps(plan.start, plan.end), self.prediction)
        return [DDIMRow(plan.at(i), fo) for i, fo in enumerate(firsts)]

    def step(self, model, state, c, noise=None):
        return State(first_order(state.x, model(state.x, c.s), c.first))
