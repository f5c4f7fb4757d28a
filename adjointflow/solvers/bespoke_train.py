"""Training a :class:`~adjointflow.solvers.bespoke.BespokeSolver` for one model (Shaul et al. 2024).

Ground truth: the model's PF-ODE solved once per noise sample by ``torchdiffeq``'s dopri5 at a tight
tolerance, stored on a dense uniform grid together with the drift there, and read at any time by
cubic Hermite interpolation (:class:`GroundTruth`) -- so the learned times can move without
re-solving. Losses (per-sample RMS errors ``||v|| = sqrt(mean v^2)``, averaged over the batch):

* ``"bound"`` (the paper's): ``L = sum_i M_{i+1} || x_aux(t_{i+1}) - step_i(x_aux(t_i)) ||`` with
  ``M_{i+1} = prod_{j > i} L_j`` the Lipschitz bounds of the later steps (``Lip(u)`` replaced by
  ``lipschitz``, 1 in the paper). It bounds the final error when ``lipschitz >= Lip(u)``; all steps
  start on the true path, so they are independent and the graph is ``n`` steps wide, not deep.
* ``"rmse"``: the final error ``|| x_n - x(t_end) ||`` of the full sequential solve.

``x_aux(t) = x(sg t) + u(x(sg t), sg t) (t - sg t)`` (``sg`` = stop-gradient) is the straight-through
estimate: its value is the ground truth and its derivative in ``t`` is the true ``dx/dt = u``, so the
learned times get exact gradients without differentiating the ODE solver.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from ..fingerprint import describe_error, digest, model_fingerprint, save_atomic
from .bespoke import BespokeSolver

__all__ = ["GroundTruth", "ground_truth", "fit_bespoke", "BespokeHistory", "bespoke_loss", "accumulate_loss_gradient", "rmse"]

LOSSES = ("bound", "rmse")
OPTIMIZERS = ("lbfgs", "adam")
_GT_FORMAT = "adjointflow.GroundTruth/2"


def rmse(a: Tensor, b: Tensor) -> float:
    """RMSE as in Shaul et al.: each sample's root-mean-square error over its elements, averaged
    over the samples (``mean_b sqrt(mean_d (a - b)^2)``)."""
    return float(_sample_rms((a - b).detach().double()).mean())


def _sample_rms(v: Tensor) -> Tensor:
    return v.flatten(1).pow(2).mean(1).sqrt()


def _index_cond(cond, idx):
    if cond is None:
        return None
    if isinstance(cond, Mapping):
        return {k: v[idx] for k, v in cond.items()}
    return cond[idx]


@dataclass(frozen=True)
class GroundTruth:
    """Exact (to ``rtol``/``atol``) PF-ODE trajectories of ``N`` samples on a dense uniform grid.

    ``times`` (``M``,) runs from ``t_start`` to ``t_end``; ``x`` and ``u`` have shape ``(M, N, *dims)``
    (states and drifts). :meth:`at` interpolates with cubic Hermite polynomials, whose error is
    ``O(dt^4)`` on a smooth path.
    """

    times: Tensor
    x: Tensor
    u: Tensor
    cond: object = None
    nfe: int = 0
    seconds: float = 0.0
    fingerprint: str | None = None  # of the model that produced it (checked by fit_bespoke)

    @property
    def t_start(self) -> float:
        return float(self.times[0])

    @property
    def t_end(self) -> float:
        return float(self.times[-1])

    @property
    def x_start(self) -> Tensor:
        return self.x[0]

    @property
    def x_end(self) -> Tensor:
        return self.x[-1]

    def __len__(self) -> int:
        return self.x.shape[1]

    def at(self, t, idx: Tensor | None = None) -> Tensor:
        """Interpolated ``x(t)`` (no gradient) for the samples ``idx`` (all if ``None``)."""
        t = float(t)
        m = len(self.times) - 1
        t0, t1 = self.t_start, self.t_end
        f = (t - t0) / (t1 - t0) * m
        if not -1e-9 <= f <= m + 1e-9:
            raise ValueError(f"t={t} is outside the ground-truth interval [{t0}, {t1}]")
        k = min(max(int(math.floor(f)), 0), m - 1)
        th = min(max(f - k, 0.0), 1.0)
        pick = (lambda v: v) if idx is None else (lambda v: v[idx])
        h = float(self.times[k + 1] - self.times[k])
        h00, h10 = 2 * th**3 - 3 * th**2 + 1, th**3 - 2 * th**2 + th
        h01, h11 = -2 * th**3 + 3 * th**2, th**3 - th**2
        return (h00 * pick(self.x[k]) + (h10 * h) * pick(self.u[k])
                + h01 * pick(self.x[k + 1]) + (h11 * h) * pick(self.u[k + 1]))


def _gt_key(fp, x, cond, t_start, t_end, rtol, atol, points) -> str:
    h = hashlib.sha256(f"{fp}|{t_start!r}|{t_end!r}|{rtol!r}|{atol!r}|{points}|{x.dtype}|{tuple(x.shape)}".encode())
    for v in [x] + ([] if cond is None else list(cond.values()) if isinstance(cond, Mapping) else [cond]):
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ground_truth(denoiser, x: Tensor, t_start: float, t_end: float, *, cond=None, rtol: float = 1e-10,
                 atol: float = 1e-10, points: int = 257, cache=None, model_id: str | None = None) -> GroundTruth:
    """Solve the PF-ODE ``dx/dt = u(x, t)`` from ``x`` at ``t_start`` to ``t_end`` with dopri5
    (``torchdiffeq.odeint``; no step passes ``t_end``) and keep ``x`` and ``u`` at ``points`` uniformly
    spaced times. Tolerances are absolute/relative in ``x``'s dtype: use float64 for tight ones.

    ``cache`` (a file path) stores the result with a SHA-256 of its contents and reuses it when model
    fingerprint (see :func:`~adjointflow.fingerprint.model_fingerprint`; ``model_id`` for networks it
    cannot hash), samples, interval, tolerances and ``points`` all match; a cache for other inputs is
    recomputed and replaced, a damaged or altered one raises ``ValueError`` naming the file. The
    ``"rmse"`` loss reads only the two ends (``points=2`` suffices); the ``"bound"`` loss reads ``x(t)``
    at the learned times by interpolation, whose error is ``O((1/points)^4)``.
    """
    from torchdiffeq import odeint

    from ..models import Denoiser

    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be an adjointflow.Denoiser, got {type(denoiser).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1 or x.shape[0] == 0:
        raise TypeError("x must be a floating-point tensor of shape (batch, *dims)")
    if not (0.0 <= t_start <= 1.0 and 0.0 <= t_end <= 1.0) or t_start == t_end:
        raise ValueError(f"need two different times in [0, 1], got t_start={t_start}, t_end={t_end}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an int >= 2, got {points!r}")
    x = x.detach()
    fp = model_fingerprint(denoiser, model_id)
    key = None
    if cache is not None:
        key = _gt_key(fp, x, cond, t_start, t_end, rtol, atol, points)
        blob = _read_gt_cache(cache)
        if blob is not None and blob["key"] == key:
            return GroundTruth(blob["times"], blob["x"].to(x.device), blob["u"].to(x.device), cond,
                               blob["nfe"], blob["seconds"], fp)
    times = t_start + (t_end - t_start) * torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    times[0], times[-1] = t_start, t_end
    nfe = 0

    def f(t, y):
        nonlocal nfe
        nfe += 1
        return denoiser(y, t.to(torch.float64), cond).velocity

    start = time.perf_counter()
    with torch.no_grad():
        # step_t: land a step exactly on t_end, so no stage evaluates the model beyond it (past t = 0)
        xs = odeint(f, x, times.to(x.device), method="dopri5", rtol=rtol, atol=atol,
                    options={"step_t": times[-1:].to(x.device)})
        us = torch.stack([denoiser(xs[k], times[k], cond).velocity for k in range(points)])
    if not bool(torch.isfinite(xs).all()) or not bool(torch.isfinite(us).all()):
        raise ValueError("the ground-truth solve produced NaN/Inf; move t_end away from a singular end of the schedule")
    gt = GroundTruth(times, xs, us, cond, nfe + points, time.perf_counter() - start, fp)
    if cache is not None:
        meta = {"format": _GT_FORMAT, "key": key, "nfe": gt.nfe, "seconds": gt.seconds}
        tensors = {"times": times, "x": xs.cpu(), "u": us.cpu()}
        save_atomic({**meta, **tensors, "sha256": digest(meta, tensors)}, cache)
    return gt


def _read_gt_cache(path) -> dict | None:
    """A verified ground-truth cache, or ``None`` if there is no file; ``ValueError`` naming the file
    if it is not a cache, is incomplete or fails its checksum (never silently overwritten)."""
    if not os.path.exists(os.fspath(path)):
        return None
    try:
        blob = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"ground-truth cache {path} is unreadable ({describe_error(exc)}); delete it to recompute") from exc
    if not isinstance(blob, dict) or blob.get("format") != _GT_FORMAT:
        raise ValueError(f"{path} is not a ground-truth cache of this version; delete it or choose another cache path")
    kinds = {"key": str, "nfe": int, "seconds": float, "times": Tensor, "x": Tensor, "u": Tensor, "sha256": str}
    for k, kind in kinds.items():
        if not isinstance(blob.get(k), kind):
            raise ValueError(f"ground-truth cache {path} is incomplete: {k!r} is missing or not a {kind.__name__}")
    meta = {k: blob[k] for k in ("format", "key", "nfe", "seconds")}
    if digest(meta, {k: blob[k] for k in ("times", "x", "u")}) != blob["sha256"]:
        raise ValueError(f"ground-truth cache {path} fails its checksum: it was altered or damaged after it was "
                         f"written; delete it to recompute")
    return blob


def _aux(gt: GroundTruth, t: Tensor, idx, model) -> Tensor:
    """Straight-through ``x_aux(t) = x(sg t) + u(x(sg t), sg t) (t - sg t)``."""
    t_sg = t.detach()
    x = gt.at(t_sg, idx)
    if not t.requires_grad:
        return x
    with torch.no_grad():
        u = model(x, t_sg).velocity
    return x + u * (t - t_sg).to(x.dtype)


def bespoke_loss(solver: BespokeSolver, denoiser, gt: GroundTruth, idx: Tensor | None = None, *,
                 loss: str = "bound", lipschitz: float = 1.0) -> Tensor:
    """The training loss of ``solver`` on the ground-truth samples ``idx`` (see the module docstring)."""
    from ..driver import ModelCall

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    model = ModelCall(denoiser, _index_cond(gt.cond, idx) if idx is not None else gt.cond)
    c = solver.coefficients(gt.t_start, gt.t_end)
    n = solver.n_steps
    if loss == "rmse":
        x = solver.rollout(model, gt.x_start if idx is None else gt.x_start[idx], c)
        target = gt.x_end if idx is None else gt.x_end[idx]
        return _sample_rms(x - target).mean()
    xa = [_aux(gt, c["t"][j], idx, model) for j in range(n + 1)]
    d = torch.stack([_sample_rms(xa[i + 1] - solver.advance(model, xa[i], i, c)).mean() for i in range(n)])
    lip = solver.lipschitz(c, lipschitz).to(d.dtype)
    # M_{i+1} = prod_{j > i} L_j: reversed cumulative product, shifted by one
    m = torch.cat([torch.flip(torch.cumprod(torch.flip(lip[1:], [0]), 0), [0]), lip.new_ones(1)])
    return (m * d).sum()


@dataclass
class BespokeHistory:
    """What :func:`fit_bespoke` did: the training loss at every loss evaluation, train/held-out RMSE,
    wall seconds and loss evaluations at each held-out evaluation, the best held-out iteration (whose
    parameters were kept), why it stopped (``"iterations"``, ``"converged"`` or ``"patience"``) and timings."""

    loss: list = field(default_factory=list)
    eval_iteration: list = field(default_factory=list)
    eval_seconds: list = field(default_factory=list)
    eval_loss_evaluations: list = field(default_factory=list)
    train_rmse: list = field(default_factory=list)
    val_rmse: list = field(default_factory=list)
    best_iteration: int = -1
    best_val_rmse: float = math.inf
    stopped: str = ""
    seconds: float = 0.0
    gt_seconds: float = 0.0
    gt_nfe: int = 0


def _evaluate(solver, denoiser, gt: GroundTruth, idx=None) -> float:
    from ..driver import solve

    with torch.no_grad():
        x = gt.x_start if idx is None else gt.x_start[idx]
        cond = gt.cond if idx is None else _index_cond(gt.cond, idx)
        out = solve(denoiser, x, solver.timesteps(gt.t_start, gt.t_end), solver, cond=cond).x
    return rmse(out, gt.x_end if idx is None else gt.x_end[idx])


def accumulate_loss_gradient(solver: BespokeSolver, denoiser, gt: GroundTruth, idx: Tensor, *, loss: str,
                             lipschitz: float, chunk: int) -> float:
    """The loss over the samples ``idx`` (their mean), its gradient *added* to the parameters' ``.grad``;
    computed ``chunk`` samples at a time so that memory does not grow with ``len(idx)``. Both losses are
    means over samples, so the chunks' losses weighted by their share sum to the loss of the whole.
    (One iteration's gradient: a data-parallel run all-reduces ``.grad`` after this call.)"""
    total, n = 0.0, len(idx)
    for a in range(0, n, chunk):
        part = idx[a : a + chunk]
        value = bespoke_loss(solver, denoiser, gt, part, loss=loss, lipschitz=lipschitz) * (len(part) / n)
        value.backward()
        total += float(value.detach())
    return total


def fit_bespoke(
    denoiser,
    solver: BespokeSolver,
    train,
    val,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    cond_train=None,
    cond_val=None,
    loss: str = "rmse",
    lipschitz: float = 1.0,
    optimizer: str = "lbfgs",
    iterations: int = 200,
    batch_size: int = 256,
    lr: float | None = None,
    lr_final: float | None = None,
    eval_every: int = 20,
    eval_train: int = 1024,
    patience: int | None = None,
    keep_best: bool = True,
    init: BespokeSolver | None = None,
    seed: int = 0,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    gt_points: int | None = None,
    gt_cache: tuple | None = None,
    progress: bool = True,
    model_id: str | None = None,
    data_parallel=None,
) -> BespokeHistory:
    """Train ``solver`` in place for ``denoiser`` (the training problem of Shaul et al. 2024).

    ``train`` / ``val``: start samples at ``t_start`` (tensors ``(N, *dims)``, e.g. prior noise) or
    precomputed :class:`GroundTruth` (reused as is); the two sets must not share a sample. ``t_start`` /
    ``t_end`` default to the schedule's.

    The default recipe was chosen by measurement (``benchmarks/results/bespoke.md``): ``loss="rmse"``
    (final error of the full solve; the paper's ``"bound"`` reached 1.5-5x larger held-out errors) and
    ``optimizer="lbfgs"``: each iteration is one L-BFGS step (strong-Wolfe line search, ~1.2 loss
    evaluations) on the loss over the *whole* training set, accumulated ``batch_size`` samples at a
    time -- the solver has only ``4n - 1`` or ``8n - 1`` parameters, so curvature matters and
    minibatch noise does not help: at equal time it reached 2-4x lower held-out errors than Adam.
    ``optimizer="adam"`` takes minibatches of ``batch_size`` with a cosine decay from ``lr`` (default
    1e-2) to ``lr_final`` (default 5e-4); for L-BFGS ``lr`` (default 1) scales its step.

    Every ``eval_every`` iterations the held-out RMSE of a full solve is recorded (and the train RMSE
    on the first ``eval_train`` training samples); with ``keep_best`` the parameters with the lowest
    held-out RMSE are restored at the end. Training stops after ``iterations``, when L-BFGS converges,
    or after ``patience`` evaluations without a better held-out RMSE.

    ``init``: a solver trained for the same model, interval and base at another step count, whose
    transform (resampled, see :meth:`BespokeSolver.load_transform`) is the starting point (warm start;
    it can start above the identity's error and still converge sooner and lower, see the benchmark). ``gt_points`` defaults to 257 for the bound loss and 2 for ``"rmse"`` (which reads only the
    ends); ``gt_cache = (train_path, val_path)`` caches the ground truth on disk. ``model_id`` names
    the model where its network cannot be fingerprinted by value (see
    :func:`~adjointflow.fingerprint.model_fingerprint`); give the same to ``save`` and ``load``.
    ``data_parallel``: this process's share of the samples under ``torchrun``, set by
    :func:`adjointflow.distributed.bespoke.fit_bespoke_distributed` (losses, gradients and RMSEs become
    means over every rank's samples).
    Returns a :class:`BespokeHistory`; the solver ends up tied to the interval and model fingerprint.
    """
    from ..models import Denoiser

    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be an adjointflow.Denoiser, got {type(denoiser).__name__}")
    if not isinstance(solver, BespokeSolver):
        raise TypeError(f"solver must be a BespokeSolver, got {type(solver).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "bound" and solver.base == "ns":
        raise ValueError("loss='bound' needs a one-step (scale-time) BespokeSolver: its steps are independent given "
                         "the ground truth; a BespokeNSSolver step reads every earlier evaluation, train it with "
                         "loss='rmse'")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    for name, v in (("iterations", iterations), ("batch_size", batch_size), ("eval_every", eval_every),
                    ("patience", 1 if patience is None else patience)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if optimizer == "lbfgs" and lr_final is not None:
        raise ValueError("lr_final (a decay schedule) applies to optimizer='adam' only; L-BFGS chooses its steps by "
                         "line search")
    lr = (1.0 if optimizer == "lbfgs" else 1e-2) if lr is None else lr
    lr_final = (lr if optimizer == "lbfgs" else min(lr, 5e-4)) if lr_final is None else lr_final
    for name, v in (("lr", lr), ("lr_final", lr_final)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    if not lipschitz >= 0:
        raise ValueError(f"lipschitz must be non-negative, got {lipschitz!r}")
    sch = denoiser.schedule
    t_start = sch.t_start if t_start is None else float(t_start)
    t_end = sch.t_end if t_end is None else float(t_end)
    if solver.trained and not _same_interval(solver, t_start, t_end):
        raise ValueError(
            f"the solver was trained on [{float(solver.interval[0])}, {float(solver.interval[1])}], not "
            f"[{t_start}, {t_end}]; start from a fresh BespokeSolver"
        )
    fp = model_fingerprint(denoiser, model_id)
    if solver.model_fingerprint is not None and solver.model_fingerprint != fp:
        raise ValueError("the solver was trained for a different model; start from a fresh BespokeSolver")
    if init is not None:
        _check_init(init, solver, fp, t_start, t_end)

    points = (257 if loss == "bound" else 2) if gt_points is None else gt_points
    caches = gt_cache if gt_cache is not None else (None, None)
    gts = []
    for name, data, cond, cache in (("train", train, cond_train, caches[0]), ("val", val, cond_val, caches[1])):
        if isinstance(data, GroundTruth):
            if data.fingerprint is not None and data.fingerprint != fp:
                raise ValueError(f"the {name} ground truth was computed with a different model than the one being fitted")
            if abs(data.t_start - t_start) > 1e-12 or abs(data.t_end - t_end) > 1e-12:
                raise ValueError(f"the {name} ground truth spans [{data.t_start}, {data.t_end}], not [{t_start}, {t_end}]")
            if loss == "bound" and len(data.times) < 17:
                raise ValueError(f"the bound loss reads the {name} ground truth between its ends, but it keeps only "
                                 f"{len(data.times)} times; compute it with points >= 17 (e.g. the default 257)")
            gts.append(data)
        elif isinstance(data, Tensor):
            gts.append(ground_truth(denoiser, data, t_start, t_end, cond=cond, rtol=rtol, atol=atol,
                                    points=points, cache=cache, model_id=model_id))
        else:
            raise TypeError(f"{name} must be a tensor of start samples or a GroundTruth, got {type(data).__name__}")
    gt_tr, gt_val = gts
    _check_disjoint(gt_tr.x_start, gt_val.x_start)

    history = BespokeHistory(gt_seconds=gt_tr.seconds + gt_val.seconds, gt_nfe=gt_tr.nfe + gt_val.nfe)
    with torch.no_grad():
        solver.interval.copy_(torch.tensor([t_start, t_end], dtype=torch.float64))
    solver.model_fingerprint = fp
    if init is not None:
        solver.load_transform(init)
    n_tr = len(gt_tr)
    every = torch.arange(n_tr)
    dp = data_parallel
    n_all = n_tr if dp is None else dp.n_train  # training samples of all ranks
    train_eval_idx = torch.arange(min(eval_train, n_all))
    train_eval_idx = train_eval_idx if dp is None else dp.local(train_eval_idx)
    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, desc=f"bespoke {solver.base} n={solver.n_steps} ({optimizer})", leave=False)

    def loss_and_grad(idx):
        value = accumulate_loss_gradient(solver, denoiser, gt_tr, idx, loss=loss, lipschitz=lipschitz, chunk=batch_size)
        if dp is not None:
            value = dp.mean(value, len(idx), solver.parameters())
        if not math.isfinite(value):
            raise FloatingPointError(f"the bespoke loss became {value} after {len(history.loss)} evaluations; lower lr")
        history.loss.append(value)
        return value

    best = None
    start = time.perf_counter()

    def rmse_of(gt, idx=None) -> float:
        count = len(gt) if idx is None else len(idx)
        v = _evaluate(solver, denoiser, gt, idx) if count else 0.0
        return v if dp is None else dp.mean(v, count)

    def evaluate(it) -> bool:
        """Record held-out/train RMSE; True if patience ran out."""
        nonlocal best
        v = rmse_of(gt_val)
        history.eval_iteration.append(it)
        history.val_rmse.append(v)
        history.train_rmse.append(rmse_of(gt_tr, train_eval_idx))
        history.eval_seconds.append(time.perf_counter() - start)
        history.eval_loss_evaluations.append(len(history.loss))
        if v < history.best_val_rmse:
            history.best_val_rmse, history.best_iteration = v, it
            best = {k: p.detach().clone() for k, p in solver.state_dict().items()}
        if bar is not None:
            bar.set_postfix(loss=f"{history.loss[-1]:.3g}" if history.loss else "-", val_rmse=f"{v:.3g}")
        stale = len(history.val_rmse) - 1 - history.val_rmse.index(min(history.val_rmse))
        return patience is not None and stale >= patience

    params = list(solver.parameters())
    try:
        stop = evaluate(0)
        it = 0
        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS(params, lr=lr, max_iter=eval_every, max_eval=4 * eval_every, history_size=50,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-13)

            def closure():
                opt.zero_grad()
                return torch.tensor(loss_and_grad(every), dtype=torch.float64)

            while not stop and it < iterations:
                opt.param_groups[0]["max_iter"] = min(eval_every, iterations - it)
                done_before = opt.state[params[0]].get("n_iter", 0) if opt.state else 0
                evals_before = len(history.loss)
                opt.step(closure)
                done = opt.state[params[0]]["n_iter"] - done_before
                it += done
                if bar is not None:
                    bar.update(done)
                stop = evaluate(it)
                group = opt.param_groups[0]
                if done < group["max_iter"] and len(history.loss) - evals_before < group["max_eval"]:
                    history.stopped = "converged"  # L-BFGS met its tolerances: no further progress
                    break
        else:
            opt = torch.optim.Adam(params, lr=lr)
            while not stop and it < iterations:
                it += 1
                for g in opt.param_groups:  # cosine decay from lr to lr_final
                    g["lr"] = lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * (it - 1) / iterations))
                opt.zero_grad()
                idx = torch.randperm(n_all, generator=gen)[: min(batch_size, n_all)]
                loss_and_grad(idx if dp is None else dp.local(idx))
                opt.step()
                if bar is not None:
                    bar.update(1)
                if it % eval_every == 0 or it == iterations:
                    stop = evaluate(it)
        history.stopped = history.stopped or ("patience" if stop else "iterations")
    finally:  # also on an error or Ctrl-C: the solver keeps the best parameters seen so far
        if bar is not None:
            bar.close()
        if keep_best and best is not None:
            solver.load_state_dict(best)
        history.seconds = time.perf_counter() - start
    return history


def _same_interval(solver: BespokeSolver, t_start: float, t_end: float) -> bool:
    return abs(float(solver.interval[0]) - t_start) <= 1e-12 and abs(float(solver.interval[1]) - t_end) <= 1e-12


def _check_init(init, solver: BespokeSolver, fp: str, t_start: float, t_end: float) -> None:
    if not isinstance(init, BespokeSolver):
        raise TypeError(f"init must be a trained BespokeSolver, got {type(init).__name__}")
    if init.base != solver.base:
        raise ValueError(f"init has base={init.base!r} but the solver being trained has base={solver.base!r}; "
                         f"warm-start from a solver with the same base")
    if not init.trained or init.model_fingerprint is None:
        raise ValueError("init is untrained (the identity transform is the default start): pass a trained solver")
    if init.model_fingerprint != fp:
        raise ValueError("init was trained for a different model than the one being fitted (model fingerprint); "
                         "a bespoke transform is specific to its model")
    if not _same_interval(init, t_start, t_end):
        raise ValueError(f"init was trained on [{float(init.interval[0])}, {float(init.interval[1])}], not on "
                         f"[{t_start}, {t_end}]")


def _check_disjoint(a: Tensor, b: Tensor) -> None:
    """Refuse a held-out set that shares a sample (an identical row) with the training set."""
    rows = lambda x: {bytes(r) for r in x.detach().cpu().contiguous().flatten(1).view(torch.uint8).numpy()}
    common = rows(a) & rows(b)
    if common:
        raise ValueError(f"the held-out set shares {len(common)} sample(s) with the training set; draw it independently")
