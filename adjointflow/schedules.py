"""Noise schedules of Gaussian probability paths ``x_t = alpha(t) x_0 + sigma(t) eps``.

Convention (docs/design.md §2): ``t`` in ``[0, 1]``, ``t = 0`` is data, ``t = 1`` the prior. All
coefficients are computed in float64; ``lambda(t) = log(alpha/sigma)`` is the half log-SNR, the
variable of exponential integrators (Lu et al. 2022, DPM-Solver).

A schedule is defined by ``log_alpha``, ``log_sigma`` and their time derivatives; everything else
(``alpha``, ``sigma``, ``log_snr``, the SDE coefficients ``f`` and ``g^2``) is derived here once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "NoiseSchedule",
    "VariancePreserving",
    "VPLinear",
    "VPCosine",
    "VPDiscrete",
    "VE",
    "EDM",
    "LinearFlow",
    "as_time",
]


def as_time(t) -> Tensor:
    """Return ``t`` as a float64 tensor (times and coefficients are float64 throughout)."""
    if isinstance(t, Tensor):
        return t.to(torch.float64)
    return torch.as_tensor(t, dtype=torch.float64)


def _log_sigma_vp(log_alpha: Tensor) -> Tensor:
    # sigma^2 = 1 - alpha^2; expm1 keeps precision when alpha is close to 1 (t near 0).
    return 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def _clamp_log_alpha(la: Tensor) -> Tensor:
    # a difference of logs can round to +1e-17 at t = 0; alpha <= 1 on a VP path
    return torch.clamp(la, max=0.0)


def _log_alpha_vp_from_lambda(lam: Tensor) -> Tensor:
    # alpha^2 = 1 / (1 + exp(-2 lambda)) for a variance-preserving path.
    return -0.5 * torch.nn.functional.softplus(-2.0 * lam)


def _finite(owner: str, name: str, value) -> float:
    """``value`` as a float, or a ``ValueError``/``TypeError`` naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)) or (
            isinstance(value, Tensor) and (value.numel() != 1 or not value.dtype.is_floating_point)):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{owner}: {name} must be finite, got {v}")
    return v


def _check_sigma_range(owner: str, sigma_min, sigma_max) -> None:
    lo, hi = _finite(owner, "sigma_min", sigma_min), _finite(owner, "sigma_max", sigma_max)
    if lo <= 0:
        raise ValueError(f"{owner}: sigma_min must be > 0, got {lo}")
    if hi <= lo:
        raise ValueError(f"{owner}: sigma_max must be > sigma_min (the path runs from sigma_min at t=0 to "
                         f"sigma_max at t=1), got sigma_min={lo}, sigma_max={hi}")


@dataclass(frozen=True)
class NoiseSchedule:
    """Abstract Gaussian path ``x_t = alpha(t) x_0 + sigma(t) eps`` on ``t in [0, 1]``.

    Subclasses implement ``log_alpha``, ``log_sigma``, ``dlog_alpha_dt``, ``dlog_sigma_dt`` and,
    where a closed form exists, ``t_from_log_snr`` (the default inverts ``log_snr`` by bisection,
    which is valid because ``lambda`` is strictly decreasing in ``t`` on every Gaussian path that
    moves from data to noise).

    Attributes ``t_start`` / ``t_end`` are the default ends of a sampling grid and
    ``default_grid`` the grid kind that suits the schedule (see :func:`adjointflow.grids.timesteps`).
    """

    t_start: ClassVar[float] = 1.0
    t_end: ClassVar[float] = 1e-3
    default_grid: ClassVar[str] = "logsnr"
    variance_preserving: ClassVar[bool] = False

    # --- primitives -----------------------------------------------------------------------
    def log_alpha(self, t) -> Tensor:
        """``log alpha(t)`` (float64)."""
        raise NotImplementedError

    def log_sigma(self, t) -> Tensor:
        """``log sigma(t)`` (float64)."""
        raise NotImplementedError

    def dlog_alpha_dt(self, t) -> Tensor:
        """``d log alpha / dt``."""
        raise NotImplementedError

    def dlog_sigma_dt(self, t) -> Tensor:
        """``d log sigma / dt``."""
        raise NotImplementedError

    # --- derived --------------------------------------------------------------------------
    def alpha(self, t) -> Tensor:
        """Signal scale ``alpha(t)``."""
        return torch.exp(self.log_alpha(t))

    def sigma(self, t) -> Tensor:
        """Noise scale ``sigma(t)``."""
        return torch.exp(self.log_sigma(t))

    def log_snr(self, t) -> Tensor:
        """Half log-SNR ``lambda(t) = log alpha(t) - log sigma(t)`` (decreasing in t)."""
        return self.log_alpha(t) - self.log_sigma(t)

    def dalpha_dt(self, t) -> Tensor:
        """``d alpha / dt``."""
        return self.alpha(t) * self.dlog_alpha_dt(t)

    def dsigma_dt(self, t) -> Tensor:
        """``d sigma / dt``."""
        return self.sigma(t) * self.dlog_sigma_dt(t)

    def dlog_snr_dt(self, t) -> Tensor:
        """``d lambda / dt`` (negative)."""
        return self.dlog_alpha_dt(t) - self.dlog_sigma_dt(t)

    def f(self, t) -> Tensor:
        """Drift coefficient of the forward SDE ``dx = f(t) x dt + g(t) dW``: ``f = d log alpha / dt``."""
        return self.dlog_alpha_dt(t)

    def g2(self, t) -> Tensor:
        """Squared diffusion ``g^2 = d sigma^2/dt - 2 f sigma^2 = -2 sigma^2 d lambda/dt``."""
        return -2.0 * self.sigma(t) ** 2 * self.dlog_snr_dt(t)

    def t_from_log_snr(self, lam) -> Tensor:
        """Inverse of :meth:`log_snr` (bisection fallback, 100 halvings = float64 exact)."""
        lam = as_time(lam)
        lo = torch.zeros_like(lam)
        hi = torch.ones_like(lam)
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam  # lambda decreasing: the root lies to the right
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def sigma_tilde(self, t) -> Tensor:
        """VE/EDM noise level ``sigma/alpha = exp(-lambda)`` (k-diffusion's sigma)."""
        return torch.exp(-self.log_snr(t))


# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VariancePreserving(NoiseSchedule):
    """Base of VP paths, ``alpha^2 + sigma^2 = 1``: subclasses define ``log_alpha`` and its derivative;
    ``sigma = sqrt(1 - alpha^2)`` and ``d log sigma/dt = -(alpha^2/sigma^2) d log alpha/dt`` follow."""

    variance_preserving: ClassVar[bool] = True

    def log_sigma(self, t):
        return _log_sigma_vp(self.log_alpha(t))

    def dsigma_dt(self, t):
        # d sigma/dt = -alpha alpha'/sigma: 0 where alpha = 0 (t = 1 of VPCosine), +inf where sigma = 0 (t = 0);
        # sigma * dlog_sigma would give 1 * (0 * inf) = NaN at the first and 0 * inf at the second
        return -self.alpha(t) * self.dalpha_dt(t) / self.sigma(t)

    def dlog_sigma_dt(self, t):
        return -self.alpha(t) * self.dalpha_dt(t) / self.sigma(t) ** 2

    def g2(self, t):
        # g^2 = d sigma^2/dt - 2 f sigma^2 = -2 f on a VP path (finite at sigma = 0, where the general form is 0 * inf)
        return -2.0 * self.f(t)


@dataclass(frozen=True)
class VPLinear(VariancePreserving):
    """VP-SDE with linear beta (Song et al. 2021; DDPM's continuous limit).

    ``log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2``, ``sigma = sqrt(1 - alpha^2)``.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self):
        # beta(t) = beta_min + t (beta_max - beta_min) must stay >= 0 (alpha decreasing), increasing as named
        lo, hi = _finite("VPLinear", "beta_min", self.beta_min), _finite("VPLinear", "beta_max", self.beta_max)
        if lo < 0:
            raise ValueError(f"VPLinear: beta_min must be >= 0, got {lo}")
        if hi <= 0 or hi < lo:
            raise ValueError(f"VPLinear: beta_max must be > 0 and >= beta_min, got beta_min={lo}, beta_max={hi}")

    def log_alpha(self, t):
        t = as_time(t)
        return -0.25 * (self.beta_max - self.beta_min) * t**2 - 0.5 * self.beta_min * t

    def dlog_alpha_dt(self, t):
        t = as_time(t)
        return -0.5 * (self.beta_max - self.beta_min) * t - 0.5 * self.beta_min

    def t_from_log_snr(self, lam):
        c = -_log_alpha_vp_from_lambda(as_time(lam))  # = (b1-b0) t^2/4 + b0 t/2 >= 0
        b0, b1 = self.beta_min, self.beta_max
        # root of (b1-b0)/4 t^2 + b0/2 t - c = 0 in the cancellation-free form
        return 2.0 * c / (0.5 * b0 + torch.sqrt(0.25 * b0**2 + (b1 - b0) * c))


@dataclass(frozen=True)
class VPCosine(VariancePreserving):
    """Cosine VP schedule (Nichol & Dhariwal 2021): ``alpha = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s))``.

    Evaluated as ``sin(pi/2 (1-t)/(1+s))`` so that ``alpha(1) = 0`` exactly (``cos(pi/2)`` rounds to
    6e-17, which would give a finite ``lambda(1) = -37`` and catastrophic ``alpha_t/alpha_s`` ratios).
    ``lambda(1) = -inf``, so grids start at ``t_start = 0.9946`` by default, as in DPM-Solver's
    reference implementation.
    """

    s: float = 0.008
    t_start: ClassVar[float] = 0.9946

    def __post_init__(self):
        # s < 0 would give alpha > 1 near t = 0
        if _finite("VPCosine", "s", self.s) < 0:
            raise ValueError(f"VPCosine: s must be >= 0, got {self.s}")

    def _phi(self, t):
        # complementary angle: cos(pi/2 (t+s)/(1+s)) = sin(pi/2 (1-t)/(1+s)), exactly 0 at t = 1
        return 0.5 * math.pi * (1.0 - as_time(t)) / (1.0 + self.s)

    def log_alpha(self, t):
        return _clamp_log_alpha(
            torch.log(torch.sin(self._phi(t))) - math.log(math.cos(0.5 * math.pi * self.s / (1 + self.s)))
        )

    def dlog_alpha_dt(self, t):
        return -0.5 * math.pi / (1.0 + self.s) / torch.tan(self._phi(t))

    def dalpha_dt(self, t):
        # closed form, finite at t = 1 where alpha * dlog_alpha would be 0 * inf
        c0 = math.cos(0.5 * math.pi * self.s / (1 + self.s))
        return -0.5 * math.pi / (1.0 + self.s) * torch.cos(self._phi(t)) / c0

    def t_from_log_snr(self, lam):
        la = _log_alpha_vp_from_lambda(as_time(lam))
        c0 = math.cos(0.5 * math.pi * self.s / (1 + self.s))
        phi = torch.arcsin(torch.exp(la) * c0)
        return torch.clamp(1.0 - phi * 2.0 * (1.0 + self.s) / math.pi, 0.0, 1.0)


@dataclass(frozen=True, eq=False)
class VPDiscrete(VariancePreserving):
    """A discrete DDPM table ``alphas_cumprod[k]``, k = 0..N-1 (diffusers), made continuous.

    Timestep ``k`` sits at ``t = (k + 1)/N`` and ``t = 0`` is added with ``alpha = 1`` (clean data);
    ``log alpha`` is interpolated piecewise-linearly in ``t`` in between (as DPM-Solver does for
    discrete-time models). The model's own timestep is ``k(t) = N t - 1`` (:meth:`timestep`).
    """

    alphas_cumprod: Tensor = field(default=None, repr=False)

    def __post_init__(self):
        ac = self.alphas_cumprod
        if ac is None:
            raise TypeError("VPDiscrete needs alphas_cumprod (a 1-D table of cumulative alpha products)")
        ac = torch.as_tensor(ac).detach().to(torch.float64).cpu()
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(ac.shape)}")
        bad = ~((ac > 0) & (ac < 1))  # also catches NaN
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            raise ValueError(f"VPDiscrete: alphas_cumprod must lie strictly inside (0, 1), "
                             f"got alphas_cumprod[{k}] = {float(ac[k])}")
        la = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(ac)])
        # on the log scale too: equal neighbouring log-alphas would divide by zero in t_from_log_snr
        flat = ~(la[2:] < la[1:-1])  # flat[j]: alphas_cumprod[j + 1] does not decrease
        if bool(flat.any()):
            k = int(flat.nonzero()[0]) + 1
            raise ValueError(f"VPDiscrete: alphas_cumprod must be strictly decreasing, got "
                             f"alphas_cumprod[{k - 1}] = {float(ac[k - 1])} <= alphas_cumprod[{k}] = {float(ac[k])}")
        n = ac.numel()
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "_t", torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64))
        object.__setattr__(self, "_la", la)

    def __repr__(self):
        return f"VPDiscrete(<{self.num_train_timesteps} alphas_cumprod>)"

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def timestep(self, t) -> Tensor:
        """The model's (continuous) training timestep for our ``t``: ``k = N t - 1``."""
        return as_time(t) * self.num_train_timesteps - 1.0

    def _segment(self, t):
        n = self.num_train_timesteps
        t = as_time(t)
        idx = torch.clamp(torch.floor(t * n).long(), 0, n - 1)
        return t, idx

    def log_alpha(self, t):
        t, i = self._segment(t)
        t0, la0, la1 = self._t.to(t.device)[i], self._la.to(t.device)[i], self._la.to(t.device)[i + 1]
        return la0 + (la1 - la0) * (t - t0) * self.num_train_timesteps

    def dlog_alpha_dt(self, t):
        t, i = self._segment(t)
        la = self._la.to(t.device)
        return (la[i + 1] - la[i]) * self.num_train_timesteps

    def t_from_log_snr(self, lam):
        la = _log_alpha_vp_from_lambda(as_time(lam))
        table = self._la.to(la.device)
        # table is decreasing; search on its negation (increasing)
        i = torch.clamp(torch.searchsorted(-table, -la.contiguous()) - 1, 0, self.num_train_timesteps - 1)
        la0, la1 = table[i], table[i + 1]
        return (i.to(torch.float64) + (la - la0) / (la1 - la0)) / self.num_train_timesteps


@dataclass(frozen=True)
class VE(NoiseSchedule):
    """Variance-exploding path (Song et al. 2021): ``alpha = 1``, ``sigma = sigma_min (sigma_max/sigma_min)^t``.

    ``sigma(0) = sigma_min > 0``: the grid's default end is ``t = 0`` (the data end of the path).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_end: ClassVar[float] = 0.0

    def __post_init__(self):
        _check_sigma_range("VE", self.sigma_min, self.sigma_max)

    def log_alpha(self, t):
        return torch.zeros_like(as_time(t))

    def dlog_alpha_dt(self, t):
        return torch.zeros_like(as_time(t))

    def log_sigma(self, t):
        return math.log(self.sigma_min) + as_time(t) * math.log(self.sigma_max / self.sigma_min)

    def dlog_sigma_dt(self, t):
        return torch.full_like(as_time(t), math.log(self.sigma_max / self.sigma_min))

    def t_from_log_snr(self, lam):
        return (-as_time(lam) - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)


@dataclass(frozen=True)
class EDM(NoiseSchedule):
    """EDM (Karras et al. 2022): ``alpha = 1``, ``sigma(t) = (s_min^(1/rho) + t (s_max^(1/rho) - s_min^(1/rho)))^rho``.

    A uniform grid in ``t`` is exactly the Karras rho-schedule (EDM eq. 5) from ``sigma_max`` to ``sigma_min``.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    t_end: ClassVar[float] = 0.0

    def __post_init__(self):
        _check_sigma_range("EDM", self.sigma_min, self.sigma_max)
        if _finite("EDM", "rho", self.rho) <= 0:
            raise ValueError(f"EDM: rho must be > 0, got {self.rho}")

    def _base(self, t):
        a, b = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return a + as_time(t) * (b - a), b - a

    def log_alpha(self, t):
        return torch.zeros_like(as_time(t))

    def dlog_alpha_dt(self, t):
        return torch.zeros_like(as_time(t))

    def log_sigma(self, t):
        u, _ = self._base(t)
        return self.rho * torch.log(u)

    def dlog_sigma_dt(self, t):
        u, d = self._base(t)
        return self.rho * d / u

    def t_from_log_snr(self, lam):
        a, b = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (torch.exp(-as_time(lam) / self.rho) - a) / (b - a)


@dataclass(frozen=True)
class LinearFlow(NoiseSchedule):
    """Rectified flow / conditional-OT flow matching: ``alpha = 1 - t``, ``sigma = t``.

    ``lambda = log((1 - t)/t)``, inverse ``t = 1/(1 + e^lambda)``. ``lambda(1) = -inf``, so the default
    grid is uniform in ``t`` (flow models are usually sampled that way); log-SNR grids need ``t_start < 1``.
    """

    default_grid: ClassVar[str] = "uniform"

    def log_alpha(self, t):
        return torch.log1p(-as_time(t))

    def dlog_alpha_dt(self, t):
        return -1.0 / (1.0 - as_time(t))

    def log_sigma(self, t):
        return torch.log(as_time(t))

    def dlog_sigma_dt(self, t):
        return 1.0 / as_time(t)

    def alpha(self, t):
        return 1.0 - as_time(t)

    def sigma(self, t):
        return as_time(t)

    def dalpha_dt(self, t):
        return torch.full_like(as_time(t), -1.0)

    def dsigma_dt(self, t):
        return torch.ones_like(as_time(t))

    def t_from_log_snr(self, lam):
        return torch.sigmoid(-as_time(lam))
