"""Bridges to other libraries (all optional dependencies, imported only when used).

* :mod:`~adjointflow.integrations.diffusers_grids` -- ``timesteps_from_diffusers``: the exact grid a
  diffusers scheduler runs, in our ``t``.
* :mod:`~adjointflow.integrations.diffusers_pipelines` -- ``from_pipeline``: denoiser, grid, solver,
  latent shape and a differentiable VAE from a Stable Diffusion / SD3 / Flux pipeline.
* :mod:`~adjointflow.integrations.latent_objectives` -- ``decoded(objective, decode)``: a pixel-space
  objective as an objective on latents.
* :mod:`~adjointflow.integrations.deepinv_operators` -- ``DeepinvOperator``: a ``deepinv.physics``
  operator as the operator of :class:`~adjointflow.guidance.MeasurementLoss`.
"""
from .diffusers_grids import SUPPORTED_SCHEDULERS, timesteps_from_diffusers
from .diffusers_pipelines import SUPPORTED_PIPELINES, PipelineModel, from_pipeline
from .diffusers_solvers import matching_solver
from .deepinv_operators import DeepinvOperator
from .latent_objectives import DecodedObjective, decoded

__all__ = ["timesteps_from_diffusers", "SUPPORTED_SCHEDULERS", "from_pipeline", "PipelineModel",
           "SUPPORTED_PIPELINES", "matching_solver", "decoded", "DecodedObjective", "DeepinvOperator"]
