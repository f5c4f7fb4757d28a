"""Guidance: steer a pretrained diffusion/flow model toward an objective without retraining.

* :class:`DPS` -- per-step guidance through the denoiser's Tweedie estimate (Chung et al. 2023).
* :class:`FlowChef` -- per-step guidance with the network's Jacobian skipped (Patel et al. 2024).
* :class:`DFlow` -- optimise the source latent through the whole solve (Ben-Hamu et al. 2024).
* :class:`AdjointGuidance` -- gradient descent on latent, conditioning and/or parameters through the
  solve with an adjoint or checkpointed gradient (Blasingame & Liu 2024, AdjointDEIS).
* :class:`DDRM` -- per-entry updates in the operator's singular basis (Kawar et al. 2022).
* :class:`PiGDM` -- pseudo-inverse guidance, Gaussian likelihood through one VJP (Song et al. 2023).
* :class:`DiffPIR` -- half-quadratic splitting with the operator's proximal map (Zhu et al. 2023).
* :class:`FlowDPS` -- likelihood steps on the clean part of the flow step (Kim et al. 2025).
* :class:`LanPaint` -- exact inpainting: Langevin steps inside each ODE step (after Zheng et al. 2025).

All share ``run(denoiser, objective, x_init, cond=None) -> GuidanceResult`` and the ``callback`` /
Ctrl-C / ``progress`` protocol of :mod:`~adjointflow.guidance.base`. Objectives are callables
``x0 -> (batch,)`` losses; :mod:`~adjointflow.guidance.objectives` has measurement operators and
:class:`MeasurementLoss`.
"""
from .adjoint_guidance import AdjointGuidance
from .base import GuidanceResult, GuidanceStep
from .ddrm import DDRM
from .dflow import DFlow, chi_regularizer, gaussian_regularizer
from .diffpir import DiffPIR
from .dps import DPS
from .flowchef import FlowChef
from .flowdps import FlowDPS
from .lanpaint import LanPaint
from .objectives import (Downsample, FourierMagnitude, GaussianBlur, Inpaint, MatrixOperator, MeasurementLoss,
                         Operator)
from .pigdm import PiGDM

__all__ = [
    "GuidanceResult", "GuidanceStep", "DPS", "FlowChef", "DFlow", "AdjointGuidance", "gaussian_regularizer",
    "chi_regularizer", "DDRM", "PiGDM", "DiffPIR", "FlowDPS", "LanPaint",
    "Operator", "Inpaint", "Downsample", "GaussianBlur", "FourierMagnitude", "MatrixOperator", "MeasurementLoss",
]
