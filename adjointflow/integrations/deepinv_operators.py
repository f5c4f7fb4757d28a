"""``DeepinvOperator``: a ``deepinv.physics`` operator as an adjointflow measurement operator.

``MeasurementLoss(DeepinvOperator(physics), y, sigma)`` is ``||y - A(x0)||^2 / (2 sigma^2)`` with
``A = physics.A``; gradients flow through ``physics.A`` by autograd. For a ``LinearPhysics``,
``transpose`` is ``physics.A_adjoint`` and ``pinv`` is ``physics.A_dagger`` (closed form for
decomposable operators such as ``Inpainting``, a least-squares solve otherwise), which D-Flow's blend
initialisation uses. Only ``A`` is used, never ``physics(x)``: the measurement's noise is the loss's
``sigma``, not the physics' noise model.

deepinv is not a dependency: this module never imports it (any object with ``A`` works, and with
``A_adjoint`` it counts as linear). See the README for installing deepinv beside a CPU torch.
"""
from __future__ import annotations

from torch import Tensor

from ..guidance.objectives import Operator, _check_x

__all__ = ["DeepinvOperator"]


class DeepinvOperator(Operator):
    """Wrap ``physics`` (e.g. ``deepinv.physics.Inpainting``, ``Downsampling``, ``BlurFFT``): ``A(x) =
    physics.A(x)``; linear (``A^T = physics.A_adjoint``, ``A^+ = physics.A_dagger``) when ``physics``
    has ``A_adjoint``. ``dagger_kwargs`` go to ``A_dagger`` (e.g. ``max_iter``, ``tol`` of its solver)."""

    def __init__(self, physics, **dagger_kwargs):
        if isinstance(physics, type):
            raise TypeError(f"physics must be an instance, e.g. {physics.__name__}(...), not the class")
        if not callable(getattr(physics, "A", None)):
            raise TypeError(f"physics must be a deepinv.physics.Physics (with a method A), got {type(physics).__name__}")
        self.physics = physics
        self.linear = callable(getattr(physics, "A_adjoint", None))
        self.dagger_kwargs = dagger_kwargs

    def __repr__(self):
        return f"DeepinvOperator({type(self.physics).__name__})"

    def _forward(self, x: Tensor) -> Tensor:
        return self.physics.A(x)

    def transpose(self, y: Tensor) -> Tensor:
        """``physics.A_adjoint(y)``."""
        if not self.linear:
            return super().transpose(y)
        _check_x(y, "y")
        return self.physics.A_adjoint(y)

    def pinv(self, y: Tensor) -> Tensor:
        """``physics.A_dagger(y)``."""
        if not self.linear:
            return super().pinv(y)
        _check_x(y, "y")
        return self.physics.A_dagger(y, **self.dagger_kwargs)
