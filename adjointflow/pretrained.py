"""Models that ship with adjointflow, ready to sample from (no download).

    import adjointflow as af
    from adjointflow import pretrained

    den = pretrained.digits()                         # 16x16 digits, LinearFlow, velocity prediction
    solver = pretrained.digits_solver(nfe=10)         # a BespokeSolver trained for it
    x = af.solve(den, torch.randn(10, 1, 16, 16), solver.timesteps(), solver, cond=torch.arange(10)).x

The digits model is a 0.5 M-parameter conv net trained by flow matching on scikit-learn's 8x8 digits
(bilinearly upsampled to 16x16, pixels in ``[-1, 1]``); see :mod:`adjointflow.demo.digits`. It needs
the demo extras (``pip install 'adjointflow[demo]'``: safetensors to read the weights).
"""
from __future__ import annotations

__all__ = ["digits", "digits_solver", "digits_solver_nfes"]


def _digits_with_metadata(weights=None):
    """``(Denoiser, metadata)`` of the digits model; ``weights`` as in :func:`digits`."""
    from .demo.digits import load_digits_model
    from .models import Denoiser
    from .schedules import LinearFlow

    try:
        net, meta = load_digits_model(weights)
    except ImportError as exc:  # safetensors is a demo extra
        raise ImportError(f"the digits model needs the demo extras ({exc}): pip install 'adjointflow[demo]'") from exc
    if meta.get("schedule", "LinearFlow") != "LinearFlow" or meta.get("prediction", "velocity") != "velocity":
        raise ValueError(f"expected a LinearFlow velocity model, the weights say {meta.get('schedule')}/"
                         f"{meta.get('prediction')}")
    net.requires_grad_(False)
    return Denoiser(net, LinearFlow(), "velocity"), meta


def digits(weights=None):
    """The bundled class-conditional digits flow model as a ready :class:`~adjointflow.Denoiser`.

    Rectified-flow path ``x_t = (1 - t) x0 + t eps`` (:class:`~adjointflow.LinearFlow`), velocity
    prediction ``u = eps - x0``; samples have shape ``(batch, 1, 16, 16)`` with pixels in ``[-1, 1]``.
    ``cond``: labels 0-9 as a ``(batch,)`` LongTensor, ``None`` or 10 for unconditional (trained with
    10 % label dropout, so :class:`~adjointflow.ClassifierFreeGuidance` works), or ``(batch, 10)``
    float class weights (differentiable). The network's parameters are frozen
    (``requires_grad=False``); call ``den.net.requires_grad_(True)`` to differentiate or fine-tune them.

    ``weights``: another ``.safetensors`` file or directory written by
    ``python -m adjointflow train-digits`` (default: the bundled one, sha256-checked).
    """
    return _digits_with_metadata(weights)[0]


def digits_solver_nfes() -> tuple[int, ...]:
    """The NFE budgets with a bundled trained solver for :func:`digits`."""
    from .demo.bespoke_digits import BUNDLED

    return tuple(sorted(BUNDLED))


def digits_solver(nfe: int = 10, denoiser=None):
    """The :class:`~adjointflow.BespokeSolver` bundled for :func:`digits` at ``nfe`` network evaluations
    (Shaul et al. 2023; a :class:`~adjointflow.BespokeNSSolver`, Shaul et al. 2024, at NFE 5 and 20; trained
    by :mod:`adjointflow.demo.bespoke_digits` on ``t = 0.999 -> 1e-3``).
    Sample on its own grid: ``solve(den, x, solver.timesteps(), solver)``.

    ``denoiser``: the model it is checked against (default :func:`digits`); a solver trained for
    another model is refused (``ValueError``). Its parameters are frozen; ``solver.requires_grad_(True)``
    to train it further with :func:`~adjointflow.fit_bespoke`.
    """
    from .demo.bespoke_digits import load_bundled_bespoke

    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe not in digits_solver_nfes():
        raise ValueError(f"nfe={nfe!r}: bundled digits solvers exist for NFE {list(digits_solver_nfes())}")
    solver = load_bundled_bespoke(digits() if denoiser is None else denoiser, nfe)
    return solver.requires_grad_(False)  # trained: sampling with it should build no graph
