"""Pixel-space objectives on latent models: ``decoded(objective, decode)``.

A latent diffusion / flow model samples latents ``z``; measurements live in pixel space. The
objective on latents is the composition ``L(z) = objective(D(z))`` with ``D`` the differentiable VAE
decoder (e.g. :meth:`PipelineModel.decode`), so every guidance method differentiates through the
decoder by the chain rule, ``grad_z L = J_D(z)^T grad_x objective(D(z))`` (as in latent DPS,
Rout et al. 2023 "PSLD", without their gluing term).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

__all__ = ["decoded", "DecodedObjective"]


class DecodedObjective:
    """``objective(decode(z))``; time-dependent objectives get ``(decode(z), t)``. If ``objective`` has
    ``residual_norm`` (a :class:`~adjointflow.guidance.MeasurementLoss`), so does this one, on decoded
    latents (DPS's step-size rule uses it). ``operator`` and ``y`` are the pixel-space ones."""

    def __init__(self, objective: Callable, decode: Callable[[Tensor], Tensor]):
        if isinstance(objective, type) or not callable(objective):
            raise TypeError(f"objective must be a callable x -> (batch,) loss (an instance), got {objective!r}")
        if not callable(decode):
            raise TypeError(f"decode must be a callable latents -> images, got {type(decode).__name__}")
        self.objective, self.decode = objective, decode
        self.time_dependent = bool(getattr(objective, "time_dependent", False))

    def __repr__(self):
        return f"decoded({self.objective!r})"

    def __call__(self, z: Tensor, t=None) -> Tensor:
        x = self.decode(z)
        return self.objective(x, t) if self.time_dependent else self.objective(x)

    def __getattr__(self, name):
        # expose residual_norm only when the pixel objective has one (DPS checks with hasattr)
        if name == "residual_norm" and hasattr(self.__dict__.get("objective"), "residual_norm"):
            return lambda z: self.objective.residual_norm(self.decode(z))
        raise AttributeError(name)


def decoded(objective: Callable, decode: Callable[[Tensor], Tensor]) -> DecodedObjective:
    """The latent objective ``z -> objective(decode(z))``; see :class:`DecodedObjective`."""
    return DecodedObjective(objective, decode)
