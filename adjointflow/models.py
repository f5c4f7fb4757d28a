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

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .schedules import NoiseSchedule, as_time

__all__ = ["Denoiser", "Prediction", "ClassifierFreeGuidance", "PREDICTIONS", "convert", "from_pair", "Coefficients",
           "Conversion", "EvalPoint", "affine_coefficients"]

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


def affine_coefficients(kind: str, target: str, a, s, da, ds):
    """``(p, q)`` with ``target = p x + q raw`` for a model output ``raw`` of type ``kind`` at state ``x``.

    Every prediction type is affine in ``(x, raw)`` at a fixed time (module docstring); the pair is
    first written for ``(x0_hat, eps_hat)`` and then mapped to ``target``. ``a, s, da, ds`` are
    ``alpha, sigma, alpha', sigma'`` (floats or tensors of any shape). Where a conversion divides by
    zero the result is infinite or NaN (the caller decides what to say).
    """
    if kind == "eps":
        x0, eps = (1 / a, -s / a), (0.0, 1.0)
    elif kind == "x0":
        x0, eps = (0.0, 1.0), (1 / s, -a / s)
    elif kind == "v":
        n = a * a + s * s
        x0, eps = (a / n, -s / n), (s / n, a / n)
    elif kind == "velocity":
        det = a * ds - s * da
        x0, eps = (ds / det, -s / det), (-da / det, a / det)
    elif kind == "score":
        x0, eps = (1 / a, s * s / a), (0.0, -s)
    else:
        raise ValueError(f"unknown prediction type {kind!r}; choose one of {PREDICTIONS}")
    return tuple(_combine(target, x0[j], eps[j], a, s, da, ds) for j in (0, 1))


def _combine(target: str, x0, eps, a, s, da, ds):
    """``target`` as a linear combination of ``(x0_hat, eps_hat)`` (module docstring)."""
    if target == "x0":
        return x0
    if target == "eps":
        return eps
    if target == "v":
        return a * eps - s * x0
    if target == "velocity":
        return da * x0 + ds * eps
    if target == "score":
        return -eps / s
    raise ValueError(f"unknown prediction type {target!r}; choose one of {PREDICTIONS}")


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
    if kind in ("eps", "score"):
        _require_nonzero(c.alpha, "alpha", kind)
    elif kind == "x0":
        _require_nonzero(c.sigma, "sigma", kind)
    coef = (c.alpha, c.sigma, c.dalpha, c.dsigma)
    return tuple(p * x + q * raw for p, q in (affine_coefficients(kind, target, *coef) for target in ("x0", "eps")))


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
    if target == "score":
        _require_nonzero(coeffs.sigma, "sigma", "score")
    return _combine(target, x0, eps, coeffs.alpha, coeffs.sigma, coeffs.dalpha, coeffs.dsigma)


def singular_conversion_message(kind: str, target: str, t: float, alpha: float, sigma: float) -> str:
    """Why ``kind -> target`` has no finite value at time ``t`` (a singular end of the path)."""
    if alpha == 0.0 and kind in ("eps", "score"):
        return (f"cannot convert a {kind!r} prediction to {target!r} at t={t:.6g}, where alpha = 0 (the noise end): "
                f"x0 = (x - sigma eps)/alpha divides by alpha. Start the grid at t < 1 (e.g. timesteps(schedule, n, "
                f"t_start=0.999)) or use a model whose prediction is finite there (velocity, v or x0)")
    if sigma == 0.0:
        return (f"cannot convert a {kind!r} prediction to {target!r} at t={t:.6g}, where sigma = 0 (the data end): "
                f"the conversion divides by sigma or the PF-ODE drift is infinite there. Start an inversion grid at "
                f"t > 0 or end a sampling grid above 0 (t_end=1e-3), or use an 'eps' model")
    return (f"cannot convert a {kind!r} prediction to {target!r} at t={t:.6g}: the schedule's alpha, sigma or their "
            f"time derivatives make the conversion infinite there")


class Conversion:
    """The conversions of one model output at one time: ``target = p x + q raw`` for every target type.

    ``pq[target]`` is ``(p, q)`` (0-dim tensors of the state's dtype and device), ``(None, q)``
    where ``p = 0``, or ``None`` where the conversion is not finite at this time (a singular end:
    :meth:`apply` raises ``ValueError`` saying why). ``where = (t, alpha, sigma)`` names the time.
    Built once per solve by :class:`~adjointflow.plan.Plan` from float64 schedule values, for the targets
    solvers read (``x0``, ``eps``, ``velocity``); :meth:`apply` returns ``None`` for another target, which
    :class:`Prediction` then converts from ``schedule``.
    """

    __slots__ = ("kind", "pq", "where", "schedule")

    def __init__(self, kind: str, pq: dict, where: tuple, schedule=None):
        self.kind, self.pq, self.where, self.schedule = kind, pq, where, schedule

    def apply(self, target: str, x: Tensor, raw: Tensor) -> Tensor:
        if target == self.kind:
            return raw
        if target not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {target!r}; choose one of {PREDICTIONS}")
        pq = self.pq.get(target, False)
        if pq is False:
            return None  # not planned: the caller converts from the schedule
        if pq is None:
            raise ValueError(singular_conversion_message(self.kind, target, *self.where))
        p, q = pq
        if p is None:
            return raw * q
        return torch.addcmul(raw * q, p, x)


class EvalPoint:
    """A time at which a solve evaluates the model, bound to that solve: ``t`` (float), the network's
    time tensor ``t_net`` of shape ``(batch,)`` and the output's :class:`Conversion` (precomputed)."""

    __slots__ = ("index", "t", "t_net", "conversion")

    def __init__(self, index: int, t: float, t_net: Tensor, conversion: Conversion):
        self.index, self.t, self.t_net, self.conversion = index, t, t_net, conversion

    def __repr__(self):
        return f"EvalPoint(t={self.t:.6g})"

    def __float__(self):
        return self.t


@dataclass(slots=True)
class Prediction:
    """One network evaluation at ``(x, t)``, viewable as any prediction type (conversions are lazy and cached).

    ``source`` gives the conversion coefficients: the schedule (evaluated on demand), the
    :class:`Coefficients`, or a precomputed :class:`Conversion` (inside ``solve``).
    """

    x: Tensor
    t: "Tensor | EvalPoint"
    raw: Tensor
    kind: str
    source: "NoiseSchedule | Coefficients | Conversion"
    # plain dict rather than functools.cached_property: the latter takes a lock that torch.compile cannot trace
    # (and a slotted, non-frozen dataclass: built once per network call, its __init__ is a few assignments);
    # made on the first conversion, since a solver reading the network's own type never needs one
    _cache: "dict | None" = field(default=None, init=False, repr=False, compare=False)

    @property
    def coeffs(self) -> Coefficients:
        """``alpha, sigma`` and derivatives at ``t`` (for a schedule or :class:`Coefficients` source)."""
        if isinstance(self.source, Coefficients):
            return self.source
        if isinstance(self.source, Conversion):
            return Coefficients.at(self.source.schedule, self.t.t, self.x)
        return Coefficients.at(self.source, self.t, self.x)

    def as_(self, target: str) -> Tensor:
        """This evaluation as prediction type ``target`` (exact affine conversion)."""
        if target == self.kind:
            return self.raw
        cache = self._cache
        if cache is None:
            cache = self._cache = {}
        out = cache.get(target)
        if out is None:
            out = self.source.apply(target, self.x, self.raw) if isinstance(self.source, Conversion) else None
            if out is None:
                out = convert(self.raw, self.kind, target, self.x, self.coeffs)
            cache[target] = out
        return out

    @property
    def x0(self) -> Tensor:
        """Tweedie estimate ``E[x_0 | x_t]``."""
        return self.as_("x0")

    @property
    def eps(self) -> Tensor:
        return self.as_("eps")

    @property
    def velocity(self) -> Tensor:
        """PF-ODE drift ``dx/dt``."""
        return self.as_("velocity")

    @property
    def score(self) -> Tensor:
        return self.as_("score")

    @property
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
        """The time tensor of shape ``(batch,)`` the network receives for our ``t`` (a float, a tensor, or an
        :class:`EvalPoint` whose network time was computed once per solve by :meth:`network_times`)."""
        if type(t) is EvalPoint:
            return t.t_net
        if not isinstance(t, Tensor) and self.net_time is None and not self.noise_at_zero:
            return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        # a tensor time is never read on the host (no device sync; gradients w.r.t. t flow)
        tn = self._map_time(as_time(t), x)
        return tn.to(device=x.device).expand(x.shape[0]) if tn.ndim == 0 else tn.to(device=x.device)

    def network_times(self, t: Tensor, x: Tensor) -> Tensor:
        """Network times for the 1-D float64 times ``t`` at once: shape ``(len(t), batch)``, row ``j`` is what
        :meth:`network_time` gives for ``t[j]`` (``net_time`` must act elementwise, as a time map does)."""
        tn = self._map_time(t, x)
        if tuple(tn.shape) != tuple(t.shape):
            raise ValueError(f"net_time must map a 1-D tensor of times elementwise; for shape {tuple(t.shape)} it "
                             f"returned shape {tuple(tn.shape)}")
        return tn.to(device=x.device)[:, None].expand(t.shape[0], x.shape[0]).contiguous()

    def _map_time(self, t: Tensor, x: Tensor) -> Tensor:
        tm = 1.0 - t if self.noise_at_zero else t
        tn = torch.as_tensor(self.net_time(tm) if self.net_time is not None else tm)
        return tn.to(dtype=x.dtype) if tn.is_floating_point() else tn

    def raw(self, x: Tensor, t, cond=None) -> Tensor:
        """The network output at ``(x, t)`` in this denoiser's prediction type and our time convention."""
        tn = self.network_time(t, x)
        version = None if torch.compiler.is_compiling() else tn._version
        if cond is None:
            out = self.net(x, tn)
        elif isinstance(cond, Mapping):
            out = self.net(x, tn, **cond)
        else:
            out = self.net(x, tn, cond)
        if version is not None and tn._version != version:
            # the time tensors of a solve are planned once and reused: an in-place change would leak into later calls
            raise ValueError("the network modified its time input in place; use out-of-place ops on t (t = t * c)")
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
            # e.g. a network under autocast: the state keeps the user's dtype (docs/design.md §2)
            out = out.to(x.dtype)
        if self.noise_at_zero and self.prediction == "velocity":
            out = -out
        return out

    def forward(self, x: Tensor, t, cond=None) -> Prediction:
        if isinstance(t, EvalPoint):
            return Prediction(x, t, self.raw(x, t, cond), self.prediction, t.conversion)
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
