"""What every guidance method shares: the result type, input validation, objective evaluation,
and exact counting of network evaluations (NFE) and vector-Jacobian products (VJPs) through the network.

Every method is a frozen dataclass constructible without arguments, with
``run(denoiser, objective, x_init, cond=None) -> GuidanceResult``.

Objectives are callables ``objective(x0) -> (batch,)`` (lower is better). An objective whose
attribute ``time_dependent`` is true is called as ``objective(x0_hat, t)`` by the per-step methods
(DPS, FlowChef); e.g. an exact Gaussian likelihood ``p(y | x_t)`` whose variance depends on ``t``.

Watching and stopping a run (every method): ``callback(step: GuidanceStep) -> bool | None`` is
called once per iteration (a sampling step, or an objective evaluation of a latent optimiser) with
the loss per sample and the current clean estimate; returning a true value stops the run, which
then returns its result so far (``stop_reason="callback"``). Ctrl-C (``KeyboardInterrupt``) does the
same with ``interrupted=True``: latent optimisers return the best recorded estimate per sample,
samplers the latest clean estimate. :class:`RunMonitor` implements this once for all methods.

Host synchronisation: a sampler's loop reads nothing on the host. Losses stay on the device until the
run ends; NaN/Inf checks keep witnesses (:class:`~adjointflow.guidance.witnesses.Witnesses`) checked once
at the end (the error still names the first bad step and its time); times and schedule values are host
floats planned once. A ``callback`` costs two host reads per step (the pending checks run before it sees the
step, then it gets the loss on the host), and a displayed progress bar reads the loss for its postfix at most
every :data:`POSTFIX_INTERVAL_S` seconds (a delayed bar not yet shown reads nothing). So a NaN/Inf no longer
stops a run at its step: the run goes on (spending its remaining evaluations on NaN) and raises at its end,
naming the first bad step and time; a callback (even ``callback=lambda step: None``) stops it at that step.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..driver import _check_cond, check_sample
from ..errors import NonFiniteError
from ..grids import timesteps, validate_grid
from ..models import Denoiser
from .witnesses import Witnesses

__all__ = ["GuidanceResult", "GuidanceStep", "RunMonitor", "STOP_REASONS", "Counter", "CountedDenoiser",
           "evaluate_objective", "check_run_inputs", "sampling_grid", "resolve_noise", "progress_bar", "Timer",
           "check_callback", "check_progress", "check_discrepancy", "discrepancy_target", "step_scale"]

#: why a run ended: it ran its budget, L-BFGS converged, every sample fit the data to the noise
#: level (discrepancy principle), the callback asked to stop, or Ctrl-C
STOP_REASONS = ("completed", "converged", "discrepancy", "callback", "interrupted")
#: ``progress=None`` shows a bar only once a run has lasted this many seconds
PROGRESS_DELAY_S = 3.0
#: a displayed bar shows the latest loss, read on the host at most this often (a read is a device sync)
POSTFIX_INTERVAL_S = 1.0


@dataclass
class GuidanceResult:
    """Outcome of a guidance run.

    * ``x``: the final clean sample ``(batch, *dims)`` (detached).
    * ``latent``: the start latent at ``grid[0]`` that produced ``x`` (optimised by DFlow and
      AdjointGuidance; the given ``x_init`` for DPS and FlowChef).
    * ``losses``: float64 ``(records, batch)`` objective history (per step for DPS/FlowChef at the
      clean estimate, per objective evaluation/iteration for DFlow/AdjointGuidance); the last row is
      always the objective at the returned ``x``.
    * ``nfe``: network evaluations in total (forward, including recomputation by checkpointing).
    * ``vjps``: vector-Jacobian products through the network (backward passes through a network call).
    * ``seconds``: wall time of the run.
    * ``cond``: the (optimised) conditioning, where a method optimises it (else the given one).
    * ``stop_reason``: one of :data:`STOP_REASONS`; ``interrupted``: the run was stopped by Ctrl-C
      and ``x`` is the result so far (see the module docstring).
    """

    x: Tensor
    latent: Tensor
    losses: Tensor
    nfe: int
    vjps: int
    seconds: float
    cond: Any = None
    stop_reason: str = "completed"

    @property
    def interrupted(self) -> bool:
        return self.stop_reason == "interrupted"


@dataclass(frozen=True)
class GuidanceStep:
    """What a guidance ``callback`` sees after each iteration (all tensors detached).

    * ``method``: the class name (``"DPS"``, ``"DFlow"``, ...).
    * ``iteration``: 0-based; a sampling step (DPS, FlowChef, ...) or an objective evaluation
      (DFlow's L-BFGS evaluations, AdjointGuidance's iterations).
    * ``total``: the planned number of iterations (an upper bound for early-stopping methods).
    * ``loss``: ``(batch,)`` float64 objective at ``x0``.
    * ``x0``: the current clean estimate, shaped like ``x_init``.
    * ``t``: the sampling time of the step for per-step methods, ``None`` for latent optimisers.
    """

    method: str
    iteration: int
    total: int
    loss: Tensor
    x0: Tensor
    t: float | None = None


def check_callback(callback) -> None:
    if callback is not None and (isinstance(callback, type) or not callable(callback)):
        raise TypeError(f"callback must be None or a callable taking a GuidanceStep, got {callback!r}")


def check_progress(progress) -> None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be None (a bar after {PROGRESS_DELAY_S:g} s), True or False, got {progress!r}")


class RunMonitor:
    """The per-run loop bookkeeping every guidance method shares: loss records, the progress bar,
    the user's ``callback``, the best (or latest) estimate per sample, and Ctrl-C.

    Use as a context manager around the iterations; it swallows ``KeyboardInterrupt`` once at least
    one iteration was recorded (``interrupted`` is then true) and re-raises it otherwise::

        with RunMonitor("DPS", total, callback=cb, progress=p) as mon:
            for i in range(total):
                ...
                if mon.record(i, loss, x0_hat, t=t):
                    break
        if mon.interrupted or mon.stopped: x, latent, loss = mon.estimate(x_init)

    ``keep_best=True`` (latent optimisers) keeps, per sample, the record with the lowest loss (or the
    one passed to :meth:`accept`, e.g. by the discrepancy principle); ``False`` (samplers) the latest.

    Records stay on the loss's device. ``finite`` collects the run's deferred NaN/Inf checks: checked when
    the block ends (also after Ctrl-C, and before another exception propagates, as an earlier NaN/Inf is
    its likely cause) and before each callback.
    """

    def __init__(self, method: str, total: int, *, callback=None, progress: bool | None = None,
                 keep_best: bool = False):
        self.method, self.total, self.callback, self.keep_best = method, int(total), callback, keep_best
        self.losses: list[Tensor] = []
        self.interrupted = False
        self.stopped = False  # by the callback
        self._x0 = self._latent = self._loss = None
        self._accepted: Tensor | None = None
        self._bar = progress_bar(progress, self.total, method)
        self._postfix_at = -float("inf")
        self.finite = Witnesses()

    def __enter__(self) -> "RunMonitor":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._bar.close()
        if exc_type is None or issubclass(exc_type, Exception):
            self.finite.check()  # a NaN/Inf at an earlier step is raised as it would have been there
            return False
        if issubclass(exc_type, KeyboardInterrupt):
            self.finite.check()  # a NaN/Inf already made is reported, as for any other way out
            if self._x0 is not None:
                self.interrupted = True
                return True  # the run returns what it has
        return False

    def record(self, iteration: int, loss: Tensor, x0: Tensor, *, t=None, latent: Tensor | None = None,
               score: Tensor | None = None) -> bool:
        """Record one iteration's ``loss`` ``(batch,)`` at the clean estimate ``x0`` (and the ``latent``
        that produced it; ``score``: what "best" minimises, default ``loss``); update the bar; call the
        callback (``t``: the step's time, a host float). Returns True if the callback asked to stop."""
        loss = loss.detach().to(torch.float64)
        x0 = x0.detach()
        self.losses.append(loss)
        self._keep(loss, loss if score is None else score.detach().to(torch.float64).to(loss.device), x0,
                   None if latent is None else latent.detach())
        self._postfix(loss)
        self._bar.update(1)
        if self.callback is not None:
            self.finite.check()  # the callback never sees a step that went bad
            step = GuidanceStep(self.method, int(iteration), self.total, loss.cpu(), x0,
                                None if t is None else float(t))
            if self.callback(step):
                self.stopped = True
        return self.stopped

    def _postfix(self, loss: Tensor) -> None:
        # the loss is read on the host only for a bar on screen, and at most every POSTFIX_INTERVAL_S
        bar = self._bar
        if isinstance(bar, _NoBar) or bar.disable:
            return
        now = time.time()  # tqdm's clock (start_t)
        if now < bar.start_t + bar.delay or now - self._postfix_at < POSTFIX_INTERVAL_S:
            return
        self._postfix_at = now
        # refresh=False: the bar redraws at its own pace
        bar.set_postfix(loss=float(loss.mean()), refresh=False)

    def _keep(self, loss, score, x0, latent) -> None:
        if self._x0 is None or not self.keep_best:
            self._loss, self._score, self._x0 = loss.clone(), score.clone(), x0.clone()
            self._latent = None if latent is None else latent.clone()
            return
        better = score < self._score
        if self._accepted is not None:
            better &= ~self._accepted
        # unconditional: where() with no better sample changes nothing, and asking first is a host sync
        self._loss = torch.where(better, loss, self._loss)
        self._score = torch.where(better, score, self._score)
        m = better.to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
        self._x0 = torch.where(m, x0, self._x0)
        if latent is not None and self._latent is not None:
            self._latent = torch.where(m.to(latent.device), latent, self._latent)

    def accept(self, mask: Tensor) -> None:
        """Freeze the samples in ``mask`` (``(batch,)`` bool) at their latest record: later records do
        not replace it. (Called right after the record that met the stopping rule; with
        ``keep_best`` that record is also the best so far, as every earlier one missed the rule.)"""
        mask = mask.detach().to(self._device(mask))
        self._accepted = mask.clone() if self._accepted is None else self._accepted | mask

    def meet(self, loss: Tensor, target: Tensor | None) -> bool:
        """Stopping rule per sample: :meth:`accept` the samples whose latest ``loss`` is at most
        ``target`` (``(batch,)``; ``None``: no rule). Returns True once every sample is accepted."""
        if target is None:
            return False
        batch = loss.shape[0]
        loss = loss.detach()
        met = (loss <= target.to(loss.device)) & ~self.accepted(batch).to(loss.device)
        if bool(met.any()):
            self.accept(met)
        return bool(self.accepted(batch).all())

    def accepted(self, batch: int) -> Tensor:
        """``(batch,)`` bool: the samples frozen by :meth:`accept` (on the records' device)."""
        if self._accepted is not None:
            return self._accepted
        return torch.zeros(batch, dtype=torch.bool, device=self._device(None))

    def _device(self, fallback):
        return self._loss.device if self._loss is not None else fallback.device if fallback is not None else None

    def estimate(self, fallback_latent: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x0, latent, loss)`` kept so far (best or latest per sample); ``fallback_latent`` where no
        latent was recorded (samplers: ``x_init``)."""
        latent = self._latent if self._latent is not None else fallback_latent.detach()
        return self._x0, latent, self._loss

    def sampler_end(self, x: Tensor, x_init: Tensor, objective: Callable, t_end) -> tuple[Tensor, Tensor]:
        """A sampler's ``(final sample, losses)``: after a stop or Ctrl-C the clean estimate of the last
        step reached (its loss already known), otherwise ``x`` with the objective evaluated on it."""
        losses = list(self.losses)
        if self.interrupted or self.stopped:
            x, _, last = self.estimate(x_init)
        else:
            x = x.detach()
            with torch.no_grad():
                last = evaluate_objective(objective, x, t_end, where="at the final sample")
        return x, stack_losses(losses + [last])

    @property
    def stop_reason(self) -> str:
        return "interrupted" if self.interrupted else "callback" if self.stopped else "completed"


# --- exact NFE / VJP counting -----------------------------------------------------------------
class Counter:
    """Mutable tally owned by one run: ``nfe`` network calls, ``vjps`` backward passes through them."""

    def __init__(self):
        self.nfe = 0
        self.vjps = 0


class _CountVJP(torch.autograd.Function):
    """Identity on the network output whose backward counts one VJP through the network."""

    @staticmethod
    def forward(raw, counter):
        return raw.view_as(raw)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.counter = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.vjps += 1
        return grad, None


class CountedDenoiser(Denoiser):
    """``denoiser`` with every network call and every backward pass through one counted in ``counter``.

    Shares the wrapped denoiser's network and parameters; outputs are identical.
    """

    def __init__(self, denoiser: Denoiser, counter: Counter):
        Denoiser.__init__(self, denoiser.net, denoiser.schedule, denoiser.prediction, denoiser.net_time,
                          denoiser.noise_at_zero)
        self.inner = denoiser
        self.counter = counter

    # NFE is counted before the call: checkpointing's recomputation may stop right after the
    # network returns (torch's early stop), and that evaluation still happened.
    def _count(self, raw: Tensor) -> Tensor:
        return _CountVJP.apply(raw, self.counter) if raw.requires_grad else raw

    def raw(self, x, t, cond=None):
        self.counter.nfe += 1
        return self._count(self.inner.raw(x, t, cond))

    def forward(self, x, t, cond=None):
        self.counter.nfe += 1
        pred = self.inner(x, t, cond)
        return dataclasses.replace(pred, raw=self._count(pred.raw))


# --- validation -------------------------------------------------------------------------------
def check_run_inputs(denoiser, objective, x_init, cond=None) -> None:
    """Type/shape checks shared by every ``run``; probes the objective once on ``x_init``'s shape."""
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be an adjointflow.Denoiser, got {type(denoiser).__name__}")
    if isinstance(objective, type) or not callable(objective):
        raise TypeError(f"objective must be a callable x0 -> (batch,) loss (an instance), got {objective!r}")
    check_sample(x_init, "x_init")
    if x_init.ndim < 2:
        raise ValueError(f"x_init must have shape (batch, *dims) with batch >= 1, got {tuple(x_init.shape)}")
    if not bool(torch.isfinite(x_init).all()):
        raise ValueError("x_init contains NaN/Inf")
    _check_cond(cond, x_init)
    if not getattr(objective, "time_dependent", False):
        # fail before a long run: the same checks every later evaluation gets
        with torch.no_grad():
            evaluate_objective(objective, x_init.detach(), where="on a probe of x_init's shape")


def evaluate_objective(objective: Callable, x0: Tensor, t=None, where: str = "", witnesses: Witnesses | None = None,
                       step: int | None = None, t_host: float | None = None) -> Tensor:
    """``objective(x0)`` (or ``objective(x0, t)`` if time dependent), checked: a tensor of shape
    ``(batch,)`` with finite entries (checked now, or, with ``witnesses``, when they are checked: the
    error then carries ``step`` and the time ``t_host``)."""
    out = objective(x0, t) if getattr(objective, "time_dependent", False) else objective(x0)
    sfx = f" {where}" if where else ""
    if not isinstance(out, Tensor):
        raise TypeError(f"the objective must return a tensor of shape (batch,) = ({x0.shape[0]},), "
                        f"got {type(out).__name__}{sfx}")
    if tuple(out.shape) != (x0.shape[0],):
        raise ValueError(f"the objective must return one loss per sample, shape ({x0.shape[0]},), "
                         f"got {tuple(out.shape)}{sfx}")
    if witnesses is not None:
        witnesses.add(out, f"the objective returned NaN/Inf{sfx}", step, t_host)
    elif not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"the objective returned NaN/Inf{sfx}")
    return out


def check_positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def check_nonneg_float(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0) or v == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def sampling_grid(denoiser: Denoiser, steps: int, grid) -> Tensor:
    """``grid`` if given (validated, must decrease), else ``timesteps(schedule, steps)``."""
    if grid is None:
        check_positive_int("steps", steps)
        return timesteps(denoiser.schedule, steps)
    g = validate_grid(grid)
    if not bool(g[1] < g[0]):
        raise ValueError("guidance samples from noise to data: the grid must be decreasing")
    return g


def resolve_noise(solver, noise, x: Tensor, grid: Tensor):
    """The noise a stochastic solver draws from (see :func:`adjointflow.driver.resolve_noise`)."""
    from ..driver import resolve_noise as _resolve

    return _resolve(solver, noise, x, grid, name="x_init")


def discrepancy_target(objective, x: Tensor, tau) -> Tensor | None:
    """Morozov's discrepancy principle: stop fitting a sample once its loss is at most
    ``tau * E[L(x_true)]``, the loss the measurement noise alone produces (for
    :class:`~adjointflow.guidance.MeasurementLoss`, ``m/2`` with ``m`` entries per measurement: its
    :meth:`noise_floor`). Returns the ``(batch,)`` float64 target, or ``None`` (no rule) when ``tau``
    is ``None`` or the objective does not know its noise level."""
    floor = getattr(objective, "noise_floor", None)
    if tau is None or floor is None:
        return None
    with torch.no_grad():
        return float(tau) * floor(x.detach()).detach().to(torch.float64).cpu()


def step_scale(objective) -> float:
    """The objective's ``step_scale`` (e.g. ``sigma_y^2`` for a Gaussian
    :class:`~adjointflow.guidance.MeasurementLoss`, whose loss scales as ``1/sigma_y^2``), else 1.
    SGD steps ``lr * step_scale * grad L`` make ``lr`` independent of the noise level."""
    return float(getattr(objective, "step_scale", 1.0))


def check_discrepancy(tau) -> None:
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0 < tau < float("inf"))):
        raise ValueError(f"discrepancy must be None or a positive number (the factor tau), got {tau!r}")


def progress_bar(enabled: bool | None, total: int, desc: str):
    """A tqdm bar (``enabled=None``: shown only once the run has lasted :data:`PROGRESS_DELAY_S`),
    or a no-op stand-in when ``enabled`` is false."""
    if enabled is False:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, delay=PROGRESS_DELAY_S if enabled is None else 0.0)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def stack_losses(records: list[Tensor]) -> Tensor:
    """The ``(records, batch)`` float64 history on the host: one device-to-host copy for the whole run."""
    device = records[-1].device
    return torch.stack([r.detach().to(device=device, dtype=torch.float64) for r in records]).cpu()
