"""Data-parallel bespoke training: :func:`~adjointflow.fit_bespoke` with its samples shared among the
``torchrun`` ranks (Shaul et al. 2024's training problem, unchanged).

Every bespoke loss and RMSE is a mean over samples, ``L = (1/N) sum_k l_k``. Rank ``r`` holds a block
``S_r`` of the samples (its ground truth is solved there, never gathered) and computes
``L_r = (1/|S_r|) sum_{k in S_r} l_k`` and ``grad L_r``; the all-reduce of ``|S_r| L_r`` and
``|S_r| grad L_r`` divided by ``sum_r |S_r| = N`` gives every rank the full-set ``L`` and ``grad L``
(the all-reduce of gradients that ``DistributedDataParallel`` does, for a solver of a few dozen
parameters: one collective per loss evaluation). The ranks therefore take identical optimiser steps
(L-BFGS line searches, Adam minibatches drawn from one global permutation) and make identical
keep-best/patience decisions: the result equals one process's up to the summation order.

Ground truth is solved in fixed chunks of ``gt_chunk`` samples (dopri5 steps depend on the batch it
integrates), each chunk on one rank, so it is the same bits whatever the world size.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .context import DEFAULT_TIMEOUT_S, DistContext, process_group

__all__ = ["SampleShard", "fit_bespoke_distributed"]


class SampleShard:
    """This rank's block ``[lo, hi)`` of the ``n_train`` training samples; averages over all ranks.

    Given to :func:`~adjointflow.fit_bespoke` as ``data_parallel``: :meth:`local` maps global sample
    indices to this rank's, :meth:`mean` turns a mean over this rank's samples (and the gradient in
    the parameters' ``.grad``) into the mean over every rank's.
    """

    def __init__(self, ctx: DistContext, lo: int, hi: int, n_train: int):
        self.ctx, self.lo, self.hi, self.n_train = ctx, lo, hi, n_train

    def local(self, idx: Tensor) -> Tensor:
        """The entries of ``idx`` (global indices, order kept) this rank holds, as local indices."""
        mine = (idx >= self.lo) & (idx < self.hi)
        return idx[mine] - self.lo

    def mean(self, value: float, count: int, params=None) -> float:
        """``sum_r count_r value_r / sum_r count_r``; with ``params``, their ``.grad`` (a mean over the same
        ``count`` samples, ``None`` = 0) becomes the same weighted mean over the ranks."""
        params = list(params or [])
        parts = [torch.tensor([count * float(value), float(count)], dtype=torch.float64)]
        for p in params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            parts.append(g.detach().reshape(-1).to(torch.float64) * count)
        buf = torch.cat(parts).to(self.ctx.device)
        self.ctx.all_reduce_sum(buf)
        buf = buf.cpu()
        total = float(buf[1])
        if total <= 0:
            raise ValueError("no rank holds a sample of this set")
        at = 2
        for p in params:
            n = p.numel()
            p.grad = (buf[at : at + n] / total).reshape(p.shape).to(p.dtype).to(p.device)
            at += n
        return float(buf[0]) / total


def _blocks(n: int, chunk: int, world: int) -> list[tuple[int, int]]:
    """Contiguous sample blocks, one per rank, made of whole chunks and balanced to one chunk."""
    chunks = -(-n // chunk)
    if chunks < world:
        raise ValueError(f"{n} samples in chunks of {chunk} make {chunks} chunk(s), fewer than the {world} ranks: "
                         f"lower gt_chunk or use fewer processes")
    bounds = [min(n, (chunks * r // world) * chunk) for r in range(world + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _cond_slice(cond, lo, hi):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[lo:hi] for k, v in cond.items()}
    return cond[lo:hi]


def _sharded_ground_truth(denoiser, x: Tensor, cond, lo: int, hi: int, chunk: int, t_start, t_end, rtol, atol, points,
                          model_id):
    """Ground truth of samples ``[lo, hi)``, solved ``chunk`` samples at a time from global position ``lo``."""
    from ..solvers.bespoke_train import GroundTruth, ground_truth

    parts = [ground_truth(denoiser, x[a : min(a + chunk, hi)], t_start, t_end, cond=_cond_slice(cond, a, min(a + chunk, hi)),
                          rtol=rtol, atol=atol, points=points, model_id=model_id) for a in range(lo, hi, chunk)]
    return GroundTruth(parts[0].times, torch.cat([p.x for p in parts], 1), torch.cat([p.u for p in parts], 1),
                       _cond_slice(cond, lo, hi), sum(p.nfe for p in parts), sum(p.seconds for p in parts),
                       parts[0].fingerprint)


def fit_bespoke_distributed(denoiser, solver, train: Tensor, val: Tensor, *, cond_train=None, cond_val=None,
                            t_start: float | None = None, t_end: float | None = None, loss: str = "rmse",
                            rtol: float = 1e-10, atol: float = 1e-10, gt_points: int | None = None,
                            gt_chunk: int = 16, save: str | os.PathLike | None = None, model_id: str | None = None,
                            device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S, progress: bool = True,
                            **fit_kwargs):
    """:func:`~adjointflow.fit_bespoke` under ``torchrun`` (a single process without it): the same
    arguments, with ``train`` / ``val`` the *full* sets of start samples on every rank (same seed), of
    which each rank solves and trains on its own block (see the module docstring). With the same
    samples and seed, the trained parameters equal a single process's up to summation order.

    ``gt_chunk``: samples per ground-truth solve (needs at least one chunk per rank). ``save``: rank 0
    writes the trained solver there atomically (:meth:`BespokeSolver.save`), the others wait for it.
    ``device="cuda"``: each rank uses GPU ``LOCAL_RANK`` and NCCL; move the denoiser there first.
    Returns the :class:`~adjointflow.solvers.bespoke_train.BespokeHistory`: losses and RMSEs are the same
    on every rank, ``gt_nfe`` / ``gt_seconds`` this rank's own.
    """
    from ..fingerprint import model_fingerprint
    from ..solvers.bespoke_train import _check_disjoint, fit_bespoke

    if "gt_cache" in fit_kwargs:
        raise ValueError("gt_cache is not supported by fit_bespoke_distributed (each rank solves its own block)")
    for name, data in (("train", train), ("val", val)):
        if not isinstance(data, Tensor) or not data.is_floating_point() or data.ndim < 1:
            raise TypeError(f"{name} must be a floating-point tensor of start samples (the full set, on every rank)")
    if isinstance(gt_chunk, bool) or not isinstance(gt_chunk, int) or gt_chunk < 1:
        raise ValueError(f"gt_chunk must be a positive int, got {gt_chunk!r}")
    _check_disjoint(train, val)
    sch = denoiser.schedule
    t_start = sch.t_start if t_start is None else float(t_start)
    t_end = sch.t_end if t_end is None else float(t_end)
    points = (257 if loss == "bound" else 2) if gt_points is None else gt_points
    with process_group(device, timeout_s) as ctx:
        dev = ctx.device
        (lo, hi), (vlo, vhi) = (_blocks(len(train), gt_chunk, ctx.world_size)[ctx.rank],
                                _blocks(len(val), gt_chunk, ctx.world_size)[ctx.rank])
        gt_tr = _sharded_ground_truth(denoiser, train.to(dev), cond_train, lo, hi, gt_chunk, t_start, t_end, rtol,
                                      atol, points, model_id)
        gt_val = _sharded_ground_truth(denoiser, val.to(dev), cond_val, vlo, vhi, gt_chunk, t_start, t_end, rtol,
                                       atol, points, model_id)
        shard = SampleShard(ctx, lo, hi, len(train))
        history = fit_bespoke(denoiser, solver, gt_tr, gt_val, t_start=t_start, t_end=t_end, loss=loss,
                              model_id=model_id, progress=progress and ctx.rank == 0, data_parallel=shard,
                              **fit_kwargs)
        if save is not None:
            if ctx.rank == 0:
                solver.save(save, fingerprint=model_fingerprint(denoiser, model_id))
            ctx.barrier()
    return history
