"""The digits model's bespoke solver trained on ``torch.distributed``: the bundle's recipe
(:mod:`adjointflow.demo.bespoke_digits`) through :func:`~adjointflow.distributed.bespoke.fit_bespoke_distributed`.

    torchrun --standalone --nproc-per-node 2 -m adjointflow.distributed.bespoke_digits --nfe 10 --out solver.pt

Each rank solves the ground truth of its block of the latents; rank 0 writes ``--out`` atomically (an
existing file only with ``--force``). Load it with ``BespokeSolver.load(path, denoiser=pretrained.digits())``
(``BespokeNSSolver.load`` for ``--nfe 5`` and ``--nfe 20``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["main"]


def main(argv=None) -> int:
    from ..demo import bespoke_digits as B

    ap = argparse.ArgumentParser(prog="python -m adjointflow.distributed.bespoke_digits",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--nfe", type=int, choices=sorted(B.BUNDLED), default=10)
    ap.add_argument("--out", required=True, help="where rank 0 writes the trained solver")
    ap.add_argument("--n-train", type=int, default=B.N_TRAIN)
    ap.add_argument("--n-val", type=int, default=B.N_VAL)
    ap.add_argument("--iterations", type=int, default=B.ITERATIONS)
    ap.add_argument("--gt-tol", type=float, default=B.GT_TOL, help="dopri5 rtol = atol of the ground truth "
                    "(default: the bundle's %(default)g)")
    ap.add_argument("--gt-chunk", type=int, default=16, help="latents per ground-truth solve (default: %(default)s)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"{ap.prog}: error: {out} exists (pass --force to replace it)", file=sys.stderr)
        return 1
    for name in ("n_train", "n_val", "iterations", "gt_chunk"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer")
    if not 0 < args.gt_tol < 1:
        ap.error(f"--gt-tol must be in (0, 1), got {args.gt_tol}")
    from .. import pretrained
    from .bespoke import fit_bespoke_distributed

    torch.set_num_threads(1)
    den = pretrained.digits()
    if args.device == "cuda":
        den = den.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    base, steps = B.BUNDLED[args.nfe]
    solver = B.start_solver(den, args.nfe)
    (x_tr, y_tr), (x_val, y_val) = B._latents(args.n_train, 100), B._latents(args.n_val, 200)
    start = time.perf_counter()
    hist = fit_bespoke_distributed(den, solver, x_tr, x_val, cond_train=y_tr, cond_val=y_val, t_start=B.T_START,
                                   t_end=B.T_END, rtol=args.gt_tol, atol=args.gt_tol, gt_chunk=args.gt_chunk,
                                   iterations=args.iterations, eval_every=10, patience=B.PATIENCE, save=out,
                                   device=args.device, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out}: NFE {args.nfe} ({base}, {steps} steps), held-out RMSE {hist.val_rmse[0]:.4f} -> "
              f"{hist.best_val_rmse:.4f} at iteration {hist.best_iteration}, {time.perf_counter() - start:.0f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
