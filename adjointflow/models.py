"""Denoiser: a user network + a noise schedule + its prediction type, with exact conversions.

Every parameterisation of a Gaussian-path model is an affine function of the pair
``(x0_hat, eps_hat) = (E[x_0 | x_t], E[eps | x_t])`` tied by ``x_t = alpha x0_hat + sigma eps_hat``:

* ``"eps"``      noise prediction (DDPM):            ``eps_hat``
* ``"x0"``       data prediction:                    ``x0_hat``
* ``"v"``        v-prediction (Salimans & Ho 2022):   ``v = alpha eps_hat - sigma x0_hat``
* ``"velocity"`` flow-matching velocity / PF-ODE drift: ``u = alpha' x0_hat + sigma' eps_hat``
* ``"score"``    score:                               ``grad log p_t = -eps_hat / sigma``

The PF-ODE of any Gaussian path is ``dx/dt = u`` (``= f x + g^2/(2 sigma) eps_hat``; Song et al. 2021).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .schedules import NoiseSchedule, as_time

__all__ = ["Denoiser", "Prediction", "ClassifierFreeGuidance", "PREDICTIONS", "convert", "from_pair", "Coefficients"]

PREDICTIONS = ("eps", "x0", "v", "velocity", "score")


@dataclass(frozen=True)
class Coefficients:
    """``alpha, sigma`` and their time derivatives at one time, in the state's dtype."""

    alpha: Tensor
    sigma: Tensor
    dalpha: Tensor
    dsigma: Tensor

    @staticmethod
    def at(schedule: NoiseSchedule, t, like: Tensor) -> "Coefficients":
        t = as_time(t)
        vals = (schedule.alpha(t), schedule.sigma(t), schedule.dalpha_dt(t), schedule.dsigma_dt(t))
        return Coefficients(*(v.to(dtype=like.dtype, device=like.device) for v in vals))


def _require_nonzero(coef: Tensor, name: str, kind: str) -> None:
    # At a singular end of the path (alpha = 0 at t = 1 of LinearFlow/VPCosine, sigma = 0 at t = 0 of a VP
    # path) some conversions divide by zero: say so instead of letting NaN/Inf into the state.
    if bool((coef == 0).any()):
        end = "alpha = 0 (the noise end, t = 1)" if name == "alpha" else "sigma = 0 (the data end, t = 0)"
        raise ValueError(
            f"cannot convert a {kind!r} prediction where {end}: the conversion divides by {name}. "
            f"Move the grid's end off that time (e.g. t_start=0.999 / t_end=1e-3) or use a model whose "
            f"prediction type is finite there (velocity, v or x0 at alpha = 0; eps at sigma = 0)"
        )


def _pair(raw: Tensor, kind: str, x: Tensor, c: Coefficients) -> tuple[Tensor, Tensor]:
    """Return ``(x0_hat, eps_hat)`` from a model output of type ``kind``."""
    a, s, da, ds = c.alpha, c.sigma, c.dalpha, c.dsigma
    if kind in ("eps", "score"):
        _require_nonzero(a, "alpha", kind)
    elif kind == "x0":
        _require_nonzero(s, "sigma", kind)
    if kind == "eps":
        return (x - s * raw) / a, raw
    if kind == "x0":
        return raw, (x - a * raw) / s
    if kind == "v":
        n = a * a + s * s
        return (a * x - s * raw) / n, (s * x + a * raw) / n
    if kind == "velocity":
        det = a * ds - s * da
        return (ds * x - s * raw) / det, (a * raw - da * x) / det
    if kind == "score":
        eps = -s * raw
        return (x - s * eps) / a, eps
    raise ValueError(f"unknown prediction type {kind!r}; choose one of {PREDICTIONS}")


def convert(raw: Tensor, kind: str, target: str, x: Tensor, coeffs: Coefficients) -> Tensor:
    """Convert a model output of type ``kind`` at state ``x`` into type ``target`` (exact, affine)."""
    if target not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {target!r}; choose one of {PREDICTIONS}")
    if target == kind:
        return raw
    x0, eps = _pair(raw, kind, x, coeffs)
    return from_pair(x0, eps, target, coeffs)


def from_pair(x0: Tensor, eps: Tensor, target: str, coeffs: Coefficients) -> Tensor:
    """Any prediction type from ``(x0_hat, eps_hat)`` (affine; see the module docstring)."""
    a, s, da, ds = coeffs.alpha, coeffs.sigma, coeffs.dalpha, coeffs.dsigma
    if target == "x0":
        return x0
    if target == "eps":
        return eps
    if target == "v":
        return a * eps - s * x0
    if target == "velocity":
        return da * x0 + ds * eps
    if target == "score":
        _require_nonzero(s, "sigma", "score")
        return -eps / s
    raise ValueError(f"unknown prediction type {target!r}; choose one of {PREDICTIONS}")


@dataclass(frozen=True)
class Prediction:
    """One network evaluation at ``(x, t)``, viewable as any prediction type (conversions are lazy)."""

    x: Tensor
    t: Tensor
    raw: Tensor
    kind: str
    source: "NoiseSchedule | Coefficients"  # a schedule (coefficients computed on demand) or the coefficients

    @cached_property
    def coeffs(self) -> Coefficients:
        # lazy: a solver that uses the network's own prediction type needs no coefficients
        if isinstance(self.source, Coefficients):
            return self.source
        return Coefficients.at(self.source, self.t, self.x)

    def as_(self, target: str) -> Tensor:
        """This evaluation as prediction type ``target`` (exact affine conversion)."""
        if target == self.kind:
            return self.raw
        return convert(self.raw, self.kind, target, self.x, self.coeffs)

    @cached_property
    def x0(self) -> Tensor:
        """Tweedie estimate ``E[x_0 | x_t]``."""
        return self.as_("x0")

    @cached_property
    def eps(self) -> Tensor:
        return self.as_("eps")

    @cached_property
    def velocity(self) -> Tensor:
        """PF-ODE drift ``dx/dt``."""
        return self.as_("velocity")

    @cached_property
    def score(self) -> Tensor:
        return self.as_("score")

    @cached_property
    def v(self) -> Tensor:
        return self.as_("v")


class Denoiser(nn.Module):
    """A network, the schedule it was trained with, and what it predicts.

    ``Denoiser(net, schedule, prediction, net_time=None, noise_at_zero=False)``

    The output is cast to the state's dtype (so a network under autocast cannot change it).
    The network is called as ``net(x, t_net)``, ``net(x, t_net, cond)`` for a tensor ``cond`` or
    ``net(x, t_net, **cond)`` for a dict, with ``t_net = net_time(t)`` of shape ``(batch,)`` in the
    state's dtype (``net_time`` defaults to the identity; e.g. ``lambda t: 999 * t`` for a model
    trained on integer timesteps).

    ``noise_at_zero=True`` plugs in a flow-matching model trained with the opposite convention
    (Lipman et al. 2023: ``t' = 0`` noise, ``t' = 1`` data): the network sees ``t' = 1 - t`` and,
    for ``prediction="velocity"``, its output is negated (``dx/dt = -dx/dt'``).

    Calling the denoiser returns a :class:`Prediction`; ``.eps``, ``.x0``, ``.velocity``, ``.score``
    and ``.v`` are exact conversions of the one network output.
    """

    def __init__(
        self,
        net: Callable,
        schedule: NoiseSchedule,
        prediction: str,
        net_time: Callable[[Tensor], Tensor] | None = None,
        noise_at_zero: bool = False,
    ):
        super().__init__()
        if isinstance(net, type):
            raise TypeError(f"net must be a network instance, got the class {net.__name__}")
        if not callable(net):
            raise TypeError(f"net must be callable, got {type(net).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(
                f"schedule must be a NoiseSchedule instance (e.g. VPLinear()), got {schedule!r}"
            )
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")
        if net_time is not None and not callable(net_time):
            raise TypeError("net_time must be a callable mapping t (float64 tensor) to the network's time")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.net_time = net_time
        self.noise_at_zero = bool(noise_at_zero)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, prediction={self.prediction!r}, noise_at_zero={self.noise_at_zero}"

    def network_time(self, t, x: Tensor) -> Tensor:
        """The time tensor of shape ``(batch,)`` the network receives for our ``t``."""
        # the one-op hot path goes through float(t), so only when no gradient w.r.t. t is wanted
        if self.net_time is None and not self.noise_at_zero and (not isinstance(t, Tensor) or (t.ndim == 0 and not t.requires_grad)):
            return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)  # hot path: one op
        t = as_time(t)
        tm = 1.0 - t if self.noise_at_zero else t
        tn = self.net_time(tm) if self.net_time is not None else tm
        tn = torch.as_tensor(tn)
        if tn.is_floating_point():
            tn = tn.to(dtype=x.dtype)
        return tn.to(device=x.device).expand(x.shape[0]) if tn.ndim == 0 else tn.to(device=x.device)

    def raw(self, x: Tensor, t, cond=None) -> Tensor:
        """The network output at ``(x, t)`` in this denoiser's prediction type and our time convention."""
        tn = self.network_time(t, x)
        if cond is None:
            out = self.net(x, tn)
        elif isinstance(cond, Mapping):
            out = self.net(x, tn, **cond)
        else:
            out = self.net(x, tn, cond)
        if not isinstance(out, Tensor):
            # diffusers models return an output object with .sample
            out = getattr(out, "sample", out)
            if not isinstance(out, Tensor):
                raise TypeError(f"network returned {type(out).__name__}, expected a tensor")
        if out.shape != x.shape:
            raise ValueError(f"network returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
        if not out.is_floating_point():
            raise TypeError(f"network returned dtype {out.dtype}; expected a floating-point tensor")
        if out.dtype != x.dtype:
            # e.g. a network under autocast: the state keeps the user's dtype (DESIGN §2)
            out = out.to(x.dtype)
        if self.noise_at_zero and self.prediction == "velocity":
            out = -out
        return out

    def forward(self, x: Tensor, t, cond=None) -> Prediction:
        t = as_time(t)
        return Prediction(x, t, self.raw(x, t, cond), self.prediction, self.schedule)

    # convenience single-type accessors (one network call each)
    def eps(self, x, t, cond=None) -> Tensor:
        """Noise prediction ``E[eps | x_t]`` (one network call)."""
        return self(x, t, cond).eps

    def x0(self, x, t, cond=None) -> Tensor:
        """Data prediction ``E[x_0 | x_t]`` (one network call)."""
        return self(x, t, cond).x0

    def velocity(self, x, t, cond=None) -> Tensor:
        """PF-ODE drift ``dx/dt`` (one network call)."""
        return self(x, t, cond).velocity

    def score(self, x, t, cond=None) -> Tensor:
        """Score ``grad log p_t(x)`` (one network call)."""
        return self(x, t, cond).score

    @classmethod
    def from_diffusers(cls, model, scheduler, **kwargs) -> "Denoiser":
        """Wrap a diffusers model + scheduler config (``alphas_cumprod`` -> :class:`VPDiscrete`,
        ``prediction_type`` -> prediction, our ``t`` -> the model's timestep). Needs ``diffusers``."""
        from .diffusers_adapter import from_diffusers

        return from_diffusers(model, scheduler, **kwargs)


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) as a network wrapper.

    ``out = net(x, t, null) + scale * (net(x, t, cond) - net(x, t, null))`` in one batched call.
    Every prediction type is affine in the network output at fixed ``(x, t)``, so guiding the raw
    output equals guiding ``eps``. ``null_cond`` is broadcast to ``cond``'s shape (per key for a dict).
    """

    def __init__(self, net: Callable, scale: float, null_cond):
        super().__init__()
        self.net = net
        self.scale = float(scale)
        self.null_cond = null_cond

    def forward(self, x: Tensor, t: Tensor, cond=None, **cond_kwargs):
        if cond_kwargs:
            if cond is not None:
                raise TypeError("pass cond either positionally or as keywords, not both")
            cond = cond_kwargs
        if cond is None:
            raise ValueError("ClassifierFreeGuidance needs a conditioning")
        b = x.shape[0]

        def both(c, null):
            null = torch.as_tensor(null, dtype=c.dtype, device=c.device).expand_as(c)
            return torch.cat([c, null])

        x2, t2 = torch.cat([x, x]), torch.cat([t, t])
        if isinstance(cond, Mapping):
            null = self.null_cond if isinstance(self.null_cond, Mapping) else {k: self.null_cond for k in cond}
            out = self.net(x2, t2, **{k: both(v, null[k]) for k, v in cond.items()})
        else:
            out = self.net(x2, t2, both(cond, self.null_cond))
        out = getattr(out, "sample", out)
        c, u = out[:b], out[b:]
        return u + self.scale * (c - u)
