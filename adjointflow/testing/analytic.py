"""Closed-form truth for testing solvers, gradients and guidance.

For Gaussian data ``x_0 ~ N(mu, diag(s^2))`` every marginal of a Gaussian path is Gaussian,
``x_t ~ N(alpha mu, diag(alpha^2 s^2 + sigma^2))``, the ideal denoiser is affine,

    E[x_0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu),

and the probability-flow ODE map from ``t`` to ``t'`` is the affine map

    x' = alpha' mu + sqrt(alpha'^2 s^2 + sigma'^2) / sqrt(alpha^2 s^2 + sigma^2) (x - alpha mu),

so solutions, orders and gradients w.r.t. the start state, ``mu`` and ``s`` are exact.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..models import PREDICTIONS, Coefficients, Denoiser, from_pair
from ..schedules import NoiseSchedule, as_time

__all__ = ["GaussianData", "GaussianMixture", "linear_gaussian_posterior"]


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a time of shape () or (batch,) to broadcast against x of shape (batch, *dims)."""
    t = as_time(t).to(x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


class _ExactNet(nn.Module):
    """The ideal network of an analytic data distribution, in a chosen prediction type."""

    def __init__(self, data, schedule: NoiseSchedule, prediction: str):
        super().__init__()
        self.data, self.schedule, self.prediction = data, schedule, prediction

    def forward(self, x, t, cond=None):
        tt = _bcast(t, x)
        x0, eps = self.data.posterior_means(self.schedule, x, tt, cond)
        return from_pair(x0, eps, self.prediction, Coefficients.at(self.schedule, tt, x))


class GaussianData(nn.Module):
    """Data ``x_0 ~ N(mean, diag(std^2))`` with exact denoisers, PF-ODE maps and their gradients.

    ``mean`` and ``std`` are ``nn.Parameter`` s (shape = one sample's shape, or broadcastable to it),
    so parameter gradients through a solve are exact as well. An optional conditioning tensor
    ``cond`` of shape ``(batch, *dims)`` *shifts* the mean: the effective mean is ``mean + cond``.
    """

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean)
        std = torch.as_tensor(std, dtype=mean.dtype if mean.is_floating_point() else torch.float64)
        mean = mean.to(std.dtype)
        if bool((std <= 0).any()):
            raise ValueError("std must be positive")
        self.mean = nn.Parameter(mean.clone())
        self.std = nn.Parameter(std.clone())

    def _mu(self, x, cond):
        mu = self.mean.to(x.dtype)
        return mu if cond is None else mu + cond

    # --- the ideal denoiser ----------------------------------------------------------------
    def posterior_mean_x0(self, schedule, x, t, cond=None) -> Tensor:
        """Tweedie's ``E[x_0 | x_t = x]``."""
        return self.posterior_means(schedule, x, t, cond)[0]

    def posterior_means(self, schedule, x, t, cond=None):
        """``(E[x_0|x_t], E[eps|x_t])``; ``E[eps|x_t] = sigma (x_t - alpha mu)/(alpha^2 s^2 + sigma^2)`` in closed
        form, so it stays finite where ``sigma = 0``."""
        t = _bcast(t, x)
        a, s = schedule.alpha(t).to(x.dtype), schedule.sigma(t).to(x.dtype)
        mu, v = self._mu(x, cond), self.std.to(x.dtype) ** 2
        r = (x - a * mu) / (a * a * v + s * s)
        return mu + a * v * r, s * r

    def denoiser(self, schedule: NoiseSchedule, prediction: str = "eps", **kwargs) -> Denoiser:
        """An exact :class:`~adjointflow.Denoiser` for ``schedule`` in any prediction type."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")
        return Denoiser(_ExactNet(self, schedule, prediction), schedule, prediction, **kwargs)

    # --- exact solutions -------------------------------------------------------------------
    def marginal(self, schedule, t, cond=None, like: Tensor | None = None):
        """Mean and standard deviation of ``x_t``."""
        like = self.mean if like is None else like
        t = as_time(t)
        a, s = schedule.alpha(t).to(like.dtype), schedule.sigma(t).to(like.dtype)
        return a * self._mu(like, cond), torch.sqrt(a * a * self.std.to(like.dtype) ** 2 + s * s)

    def _ratio(self, schedule, t, t_next, x):
        t, tn = as_time(t), as_time(t_next)
        a0, s0 = schedule.alpha(t).to(x.dtype), schedule.sigma(t).to(x.dtype)
        a1, s1 = schedule.alpha(tn).to(x.dtype), schedule.sigma(tn).to(x.dtype)
        v = self.std.to(x.dtype) ** 2
        return a0, a1, torch.sqrt(a1 * a1 * v + s1 * s1) / torch.sqrt(a0 * a0 * v + s0 * s0), (a0, s0, a1, s1)

    def flow_map(self, schedule, x: Tensor, t, t_next, cond=None) -> Tensor:
        """Exact PF-ODE solution at ``t_next`` started from ``x`` at ``t`` (either direction)."""
        a0, a1, r, _ = self._ratio(schedule, t, t_next, x)
        mu = self._mu(x, cond)
        return a1 * mu + r * (x - a0 * mu)

    def flow_map_grads(self, schedule, x: Tensor, t, t_next, grad_out: Tensor, cond=None) -> dict:
        """Exact vector-Jacobian products of :meth:`flow_map` with ``grad_out``.

        Returns ``{"x": ..., "mean": ..., "std": ..., "cond": ...}``: ``d/dx = r``,
        ``d/dmu = alpha' - r alpha``, ``d/ds = r s (alpha'^2/(alpha'^2 s^2+sigma'^2) - alpha^2/(alpha^2 s^2+sigma^2)) (x - alpha mu)``;
        parameter gradients are summed over the batch, ``cond``'s is per sample.
        """
        a0, a1, r, (_, s0, _, s1) = self._ratio(schedule, t, t_next, x)
        mu, s = self._mu(x, cond), self.std.to(x.dtype)
        v = s * s
        dmu = (a1 - r * a0) * grad_out
        dr_ds = r * s * (a1 * a1 / (a1 * a1 * v + s1 * s1) - a0 * a0 / (a0 * a0 * v + s0 * s0))
        dstd = dr_ds * (x - a0 * mu) * grad_out
        sum_batch = lambda g, p: g.sum(0).reshape(p.shape) if g.shape[1:] == p.shape else g.sum_to_size(p.shape)
        return {
            "x": r * grad_out,
            "mean": sum_batch(dmu, self.mean),
            "std": sum_batch(dstd, self.std),
            "cond": dmu if cond is not None else None,
        }

    def sample(self, n: int, generator: torch.Generator | None = None, cond=None) -> Tensor:
        """Draw ``n`` data samples."""
        z = torch.randn((n, *self.mean.shape), generator=generator, dtype=self.mean.dtype)
        with torch.no_grad():
            return self._mu(z, cond) + self.std * z

    def prior_sample(self, schedule, t, n: int, generator: torch.Generator | None = None, cond=None) -> Tensor:
        """Draw ``n`` samples of the exact marginal ``x_t``."""
        z = torch.randn((n, *self.mean.shape), generator=generator, dtype=self.mean.dtype)
        with torch.no_grad():
            m, sd = self.marginal(schedule, t, cond, like=z)
            return m + sd * z

    def posterior(self, A: Tensor, y: Tensor, sigma_y: float, cond=None):
        """Exact posterior of ``x_0`` (flattened) given ``y = A x_0 + n``, ``n ~ N(0, sigma_y^2 I)``.

        Returns ``(mean, cov)`` with ``mean = m + S A^T (A S A^T + sigma_y^2 I)^{-1} (y - A m)``.
        """
        if cond is not None and cond.shape != self.mean.shape:
            raise ValueError(f"posterior takes one sample's cond of shape {tuple(self.mean.shape)}, "
                             f"got {tuple(cond.shape)}; call it per sample")
        m = self._mu(self.mean, cond).detach().reshape(-1).to(A.dtype)
        cov = torch.diag((self.std.detach() ** 2).expand(self.mean.shape).reshape(-1).to(A.dtype))
        return linear_gaussian_posterior(m, cov, A, y, sigma_y)


def linear_gaussian_posterior(mean: Tensor, cov: Tensor, A: Tensor, y: Tensor, sigma_y: float):
    """Posterior ``N(m', S')`` of ``x ~ N(mean, cov)`` given ``y = A x + N(0, sigma_y^2 I)``:
    ``K = S A^T (A S A^T + sigma_y^2 I)^{-1}``, ``m' = m + K (y - A m)``, ``S' = S - K A S``."""
    S = cov
    G = A @ S @ A.T + sigma_y**2 * torch.eye(A.shape[0], dtype=A.dtype)
    K = torch.linalg.solve(G, A @ S).T
    return mean + K @ (y - A @ mean), S - K @ A @ S


class GaussianMixture(nn.Module):
    """Mixture ``sum_k w_k N(m_k, diag(s_k^2))`` on vectors ``(batch, d)`` with exact denoisers.

    ``E[x_0|x_t] = sum_k r_k(x_t) [m_k + alpha s_k^2/(alpha^2 s_k^2 + sigma^2) (x_t - alpha m_k)]`` with
    responsibilities ``r_k`` proportional to ``w_k N(x_t; alpha m_k, alpha^2 s_k^2 + sigma^2)``.
    """

    def __init__(self, weights, means, stds):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError("means must have shape (K, d)")
        w = torch.as_tensor(weights, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(means.shape[0], -1) if torch.as_tensor(stds).ndim == 2 \
            else torch.as_tensor(stds, dtype=torch.float64).reshape(-1, 1).expand_as(means)
        if w.shape != (means.shape[0],) or bool((w <= 0).any()):
            raise ValueError("weights must be K positive numbers")
        self.register_buffer("log_w", torch.log(w / w.sum()))
        self.register_buffer("means", means.clone())
        self.register_buffer("stds", stds.clone())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def posterior_mean_x0(self, schedule, x, t, cond=None):
        t = _bcast(t, x)
        a, s = schedule.alpha(t).to(x.dtype), schedule.sigma(t).to(x.dtype)
        a, s = a.reshape(-1, 1, 1), s.reshape(-1, 1, 1)  # (B or 1, 1, 1)
        m, v = self.means.to(x.dtype)[None], self.stds.to(x.dtype)[None] ** 2  # (1, K, d)
        var = a * a * v + s * s
        xx = x[:, None, :]
        logp = self.log_w.to(x.dtype)[None] - 0.5 * (((xx - a * m) ** 2) / var + torch.log(2 * math.pi * var)).sum(-1)
        r = torch.softmax(logp, dim=1)[..., None]  # (B, K, 1)
        comp = m + a * v / var * (xx - a * m)
        return (r * comp).sum(1)

    def posterior_means(self, schedule, x, t, cond=None):
        """``(E[x_0|x_t], E[eps|x_t])`` with ``eps = (x - alpha x0)/sigma``."""
        x0 = self.posterior_mean_x0(schedule, x, t, cond)
        tt = _bcast(t, x)
        return x0, (x - schedule.alpha(tt).to(x.dtype) * x0) / schedule.sigma(tt).to(x.dtype)

    def denoiser(self, schedule: NoiseSchedule, prediction: str = "eps", **kwargs) -> Denoiser:
        return Denoiser(_ExactNet(self, schedule, prediction), schedule, prediction, **kwargs)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k] * z

    def prior_sample(self, schedule, t, n: int, generator: torch.Generator | None = None) -> Tensor:
        x0 = self.sample(n, generator)
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        t = as_time(t)
        return schedule.alpha(t) * x0 + schedule.sigma(t) * z
