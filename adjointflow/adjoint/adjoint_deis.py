"""AdjointDEIS (Blasingame & Liu, NeurIPS 2024): exponential integrators for the continuous adjoint.

One step goes from the cleaner time ``t = grid[i+1]`` back to the noisier ``s = grid[i]``;
``h = lambda_s - lambda_t < 0``. ``nu = 1`` for the PF-ODE and ``nu = 2`` for the reverse diffusion SDE
(its adjoint is the same ODE with the noise term doubled, along the recorded Brownian path).

**Noise form** (the paper's, eq. 2.14/2.15). ``d(alpha a)/dlambda = nu alpha^2 e^{-lambda} J_eps^T a``; with
``V = alpha^2 J_eps^T a`` and ``V_in = alpha a^T d eps/d input`` frozen (order 1) or linear in lambda (2M):

    a_s   = (alpha_t/alpha_s) a_t + nu sigma_s/alpha_s^2 (e^h - 1) D,     D = V_t  or  (1 + 1/(2 rho)) V_t - V_r/(2 rho)
    in_s  = in_t + nu sigma_s/alpha_s (e^h - 1) D_in,                     rho = (lambda_t - lambda_r)/h

**Data form** (derived here the way DPM-Solver++ follows from DPM-Solver). With ``x0 = (x - sigma eps)/alpha``
the drift is ``(nu dlog sigma - (nu-1) dlog alpha) x + nu alpha lambda' x0``; the integrating factor of the adjoint is
``c = sigma e^{-(nu-1) lambda}`` (``sigma`` for the ODE, ``sigma^2/alpha`` for the SDE), and for ``b = c a``

    db/dlambda = -nu e^{nu lambda} W,   W = c^2 J_x0^T a,     d in/dlambda = -nu e^{nu lambda} W_in,   W_in = c a^T d x0/d input

so, freezing ``W`` (order 1) or taking it linear in lambda (2M, same ``D`` as above),

    a_s  = (c_t/c_s) a_t + k/c_s D,    in_s = in_t + k D_in,    k = e^{nu lambda_t} - e^{nu lambda_s} = -e^{nu lambda_t} expm1(nu h) > 0.

The data form's linear factor ``c_t/c_s < 1`` contracts towards the noise end, whereas the noise form's
``alpha_t/alpha_s`` grows like ``1/alpha_s`` and must be cancelled by the Jacobian term; frozen at the clean
end it is not, so the noise form blows up at small step counts (M <= 10 on a full VP grid). The data form
never blows up, but its frozen ``W`` (which carries ``c^2 = sigma^2``) varies fast in lambda on the clean side,
where the noise form's ``V`` is nearly constant. Each form is accurate where the other is not, so the default
``form="auto"`` uses the data form on the noisy side (``lambda_s < 0``) and the noise form on the clean side:
measured 10-1000x more accurate than either form alone on VP and flow paths, and the only one of the three
that converges for flows sampled from ``t = 1`` (``benchmarks/results/gradients.md``). A noise-form step
from ``alpha_s = 0`` (``t = 1`` of LinearFlow/VPCosine) is taken in the data form, which is finite there.

A step whose clean end has ``sigma_t = 0`` is the solvers' final denoising step ``x_t = alpha_t x0(x_s)``; it has no
finite ``lambda_t`` and is differentiated exactly: ``a_s = alpha_t J_x0(x_s)^T a_t``.
"""
from __future__ import annotations

import torch

from .equations import ADJOINT_FORMS, AdjointModel, AdjointState

__all__ = ["adjoint_deis_step", "exponential_adjoint_step"]


def _c(sigma, lam, nu: float):
    """Data-form integrating factor ``c = sigma e^{-(nu-1) lambda}``: ``sigma`` for the ODE (no ``0 * inf``
    at ``lambda = -inf``), ``sigma^2/alpha`` for the SDE."""
    return sigma if nu == 1.0 else sigma * torch.exp(-(nu - 1) * lam)


def _lin(coef, ts):
    return tuple(coef.to(dtype=v.dtype, device=v.device) * v for v in ts)


def step_form(form: str, schedule, grid, i: int) -> str:
    """The form actually used for the step from ``grid[i+1]`` back to ``grid[i]``.

    ``"auto"``: the data form where the noisy end has ``lambda_s < 0`` (``alpha < sigma``: there ``x0_hat`` is
    nearly constant in lambda and the noise form's factor ``alpha_t/alpha_s`` explodes), the noise form
    where ``lambda_s >= 0`` (there ``eps_hat`` is nearly constant and the data form's ``c = sigma`` varies
    by ``e^{-h}`` across a step). Otherwise ``form``, except that a noise-form step whose noisy end has
    ``alpha = 0`` (``t = 1`` of LinearFlow/VPCosine), where ``alpha_t/alpha_s`` is infinite, is taken in the
    data form (finite there)."""
    if form == "auto":
        return "x0" if float(schedule.log_snr(grid[i])) < 0.0 else "eps"
    if form == "eps" and float(schedule.alpha(grid[i])) == 0.0:
        return "x0"
    return form


def _frozen(form: str, kind: str, sch, tau, a, vx, vin, nu: float):
    """The quantity AdjointDEIS freezes, in ``form``, from a VJP ``(vx, vin)`` of ``kind`` at time ``tau``
    with cotangent ``a``: noise form ``(alpha^2 J_eps^T a, alpha a^T d eps/d in)``, data form
    ``(c^2 J_x0^T a, c a^T d x0/d in)``. Converts between kinds with ``eps = (x - alpha x0)/sigma``."""
    alpha, sigma, lam = sch.alpha(tau), sch.sigma(tau), sch.log_snr(tau)
    dt = a.dtype
    if form == "eps":
        if kind == "x0":  # J_eps = (I - alpha J_x0)/sigma
            vx = (a - alpha.to(dt) * vx) / sigma.to(dt)
            vin = _lin(-alpha / sigma, vin)
        return (alpha**2).to(dt) * vx, _lin(alpha, vin)
    if kind == "eps":  # J_x0 = (I - sigma J_eps)/alpha
        vx = (a - sigma.to(dt) * vx) / alpha.to(dt)
        vin = _lin(-sigma / alpha, vin)
    c = _c(sigma, lam, nu)
    return (c**2).to(dt) * vx, _lin(c, vin)


def adjoint_deis_step(model: AdjointModel, adj: AdjointState, grid, i: int, *, form: str = "auto",
                      order: int = 1, sde: bool = False) -> AdjointState:
    """AdjointDEIS-1 (``order=1``) or AdjointDEIS-2M (``order=2``) from ``grid[i+1]`` back to ``grid[i]``
    in the data (``form="x0"``) or noise (``form="eps"``) parameterisation, or switching between them at
    ``lambda = 0`` (``form="auto"``, see :func:`step_form`); ``sde=True`` for the diffusion SDE.

    The 2M history is ``(a_r, raw VJP at r)`` in the kind of the previous step (see :func:`step_form`),
    converted when the kinds differ.
    """
    if form not in ADJOINT_FORMS:
        raise ValueError(f"unknown AdjointDEIS form {form!r}; choose one of {ADJOINT_FORMS}")
    if order not in (1, 2):
        raise ValueError(f"AdjointDEIS has orders 1 and 2 (2M), got {order!r}")
    sch = model.schedule
    s, t = grid[i], grid[i + 1]
    a = adj.a
    if float(sch.sigma(t)) == 0.0:
        alpha_t = sch.alpha(t)
        vx, vin = model.vjp(model.x(i), s, a, "x0")
        return AdjointState(alpha_t.to(a.dtype) * vx, tuple(p + q for p, q in zip(adj.inputs, _lin(alpha_t, vin))))

    nu = 2.0 if sde else 1.0
    kind = step_form(form, sch, grid, i)
    lam_t, lam_s = sch.log_snr(t), sch.log_snr(s)
    h = lam_s - lam_t
    alpha_t, sigma_t, alpha_s, sigma_s = sch.alpha(t), sch.sigma(t), sch.alpha(s), sch.sigma(s)
    vx, vin = model.vjp(model.x(i + 1), t, a, kind)
    Vx, Vin = _frozen(kind, kind, sch, t, a, vx, vin, nu)
    if kind == "eps":
        lin = alpha_t / alpha_s
        cin = nu * sigma_s / alpha_s * torch.expm1(h)
        cx = cin / alpha_s
    else:
        c_t, c_s = _c(sigma_t, lam_t, nu), _c(sigma_s, lam_s, nu)
        cin = -torch.exp(nu * lam_t) * torch.expm1(nu * h)
        lin, cx = c_t / c_s, cin / c_s
    Dx, Din = Vx, Vin
    if order == 2 and adj.history and bool(torch.isfinite(h)):  # a step from a singular end is first order
        r = grid[i + 2]
        n_in = len(vin)
        a_r, vx_r, vin_r = adj.history[0], adj.history[1], adj.history[2:2 + n_in]
        Vx_r, Vin_r = _frozen(kind, step_form(form, sch, grid, i + 1), sch, r, a_r, vx_r, vin_r, nu)
        rho = (lam_t - sch.log_snr(r)) / h
        w0, w1 = 1.0 + 0.5 / rho, 0.5 / rho
        Dx = w0.to(a.dtype) * Vx - w1.to(a.dtype) * Vx_r
        Din = tuple(p - q for p, q in zip(_lin(w0, Vin), _lin(w1, Vin_r)))
    a_s = lin.to(a.dtype) * a + cx.to(a.dtype) * Dx
    inputs = tuple(p + q for p, q in zip(adj.inputs, _lin(cin, Din)))
    return AdjointState(a_s, inputs, (a, vx, *vin) if order == 2 else ())


def exponential_adjoint_step(solver, model: AdjointModel, adj: AdjointState, grid, i: int) -> AdjointState:
    """``adjoint_step`` of the exponential-integrator family (DDIM, DPM-Solver++, DEIS, SDE-DPM-Solver++).

    Uses AdjointDEIS in ``model.form`` (default noise form), of order ``model.order`` or, when that is
    ``None``, 1 for first-order solvers and 2 (2M) otherwise; ``solver.stochastic`` selects the SDE adjoint.
    """
    order = model.order if model.order is not None else (1 if solver.order == 1 else 2)
    return adjoint_deis_step(model, adj, grid, i, form=model.form, order=order, sde=bool(solver.stochastic))
