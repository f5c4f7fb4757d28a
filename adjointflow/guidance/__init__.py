"""Guidance: steer a pretrained diffusion/flow model toward an objective without retraining.

* :class:`DPS` -- per-step guidance through the denoiser's Tweedie estimate (Chung et al. 2023).
* :class:`FlowChef` -- per-step guidance with the network's Jacobian skipped (Patel et al. 2024).
* :class:`DFlow` -- optimise the source latent through the whole solve (Ben-Hamu et al. 2024).
* :class:`AdjointGuidance` -- gradient descent on latent, conditioning and/or parameters through the
  solve with an adjoint or checkpointed gradient (Blasingame & Liu 2024, AdjointDEIS).

All share ``run(denoiser, objective, x_init, cond=None) -> GuidanceResult``. Objectives are callables
``x0 -> (batch,)`` losses; :mod:`~adjointflow.guidance.objectives` has measurement operators and
:class:`MeasurementLoss`.
"""
from .adjoint_guidance import AdjointGuidance
from .base import GuidanceResult
from .dflow import DFlow, chi_regularizer, gaussian_regularizer
from .dps import DPS
from .flowchef import FlowChef
from .objectives import (Downsample, FourierMagnitude, GaussianBlur, Inpaint, MatrixOperator, MeasurementLoss,
                         Operator)

__all__ = [
    "GuidanceResult", "DPS", "FlowChef", "DFlow", "AdjointGuidance", "gaussian_regularizer", "chi_regularizer",
    "Operator", "Inpaint", "Downsample", "GaussianBlur", "FourierMagnitude", "MatrixOperator", "MeasurementLoss",
]
