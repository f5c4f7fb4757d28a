"""Bespoke solvers trained for the bundled digits model (Shaul et al. 2024), bundled with the demo.

One file per NFE budget in :data:`BUNDLED` (base and steps chosen by measurement, see
``benchmarks/test_bench_bespoke.py -k digits``: an RK2 scale-time solver at NFE 10, the
non-stationary :class:`~adjointflow.BespokeNSSolver` started from UniPC at NFE 5 and 20), each carrying the
model fingerprint and a checksum, so it only
loads, intact, for the model it was trained for. Retrain all (or one, ``--nfe 10``) with

    python -m adjointflow.demo.bespoke_digits

on the demo's interval t = 0.999 -> 1e-3 with :func:`~adjointflow.fit_bespoke`'s default recipe against
dopri5 solutions of 128 class-conditional latents (labels 0-9), 64 held-out ones for early stopping.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .digits import DEFAULT_DIR

__all__ = ["BUNDLED", "BUNDLE_DIR", "T_START", "T_END", "bundled_path", "start_solver", "load_bundled_bespoke",
           "bundled_bespoke_solvers", "train_bundled_bespoke"]

#: NFE budget -> (base, steps) of the bundled solver: at NFE 5 the RK2 solver could spend only 4 and
#: lost to UniPC-3 (held-out 0.0362 vs 0.0346); the non-stationary one spends all 5. At NFE 20 RK2 x 10
#: tied UniPC-2 on the quadratic grid (0.0031 vs 0.0032 held out, 0.3% behind on the demo's latents)
BUNDLED = {5: ("ns", 5), 10: ("rk2", 5), 20: ("ns", 20)}
T_START, T_END = 0.999, 1e-3
#: training set-up of the bundle: latents, ground-truth tolerance, L-BFGS iterations, patience (in
#: held-out evaluations, every 10 iterations)
N_TRAIN, N_VAL, GT_TOL, ITERATIONS, PATIENCE = 128, 64, 1e-6, 60, 3
#: NFE -> (UniPC settings, grid kind) a non-stationary bundled solver starts from: the best generic
#: solver at that NFE on the demo table; see BespokeNSSolver.from_solver
NS_START = {5: (dict(order=3, variant="bh2"), "uniform"), 20: (dict(order=2, variant="bh2"), "quadratic")}
#: where the bundled files live (next to the digits weights)
BUNDLE_DIR = DEFAULT_DIR


def _solver_class(base: str):
    from ..solvers import BespokeNSSolver, BespokeSolver

    return BespokeNSSolver if base == "ns" else BespokeSolver


def _spec(nfe: int) -> tuple[str, int]:
    if nfe not in BUNDLED:
        raise ValueError(f"no bundled bespoke solver for NFE {nfe}; bundled: {sorted(BUNDLED)}")
    return BUNDLED[nfe]


def bundled_path(nfe: int, directory=None) -> Path:
    """Where the bundled solver for ``nfe`` lives (in ``directory``, default :data:`BUNDLE_DIR`)."""
    return Path(BUNDLE_DIR if directory is None else directory) / f"digits_bespoke_{_spec(nfe)[0]}_nfe{nfe}.pt"


def _latents(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.arange(n) % 10


def bundled_ground_truth(den, n_train: int = N_TRAIN, n_val: int = N_VAL, tol: float = GT_TOL, seed: int = 0):
    """dopri5 solutions (rtol = atol = ``tol``) of the training and held-out latents of the bundle:
    fixed seeds, labels 0-9 in turn; shared by every NFE."""
    from ..solvers.bespoke_train import ground_truth

    return tuple(ground_truth(den, x, T_START, T_END, cond=y, rtol=tol, atol=tol, points=2)
                 for x, y in (_latents(n_train, seed + 100), _latents(n_val, seed + 200)))


def _start_label(nfe: int) -> str:
    kw, kind = NS_START[nfe]
    return "UniPC(" + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + f"), {kind} grid"


def start_solver(den, nfe: int, warm: bool = False):
    """The untrained solver the bundle's recipe starts from at ``nfe``: a fresh scale-time solver (the
    identity), or for base ``"ns"`` the non-stationary form of UniPC (:data:`NS_START`) on ``den``'s
    schedule and the demo's interval; with ``warm`` (an ``init`` follows) the identity in both cases."""
    from ..solvers import UniPC

    base, steps = _spec(nfe)
    if base == "ns" and not warm:
        kw, kind = NS_START[nfe]
        return _solver_class(base).from_solver(UniPC(**kw), steps, den.schedule, T_START, T_END, kind)
    return _solver_class(base)(steps, base=base)


def train_bundled_bespoke(den, nfe: int, path=None, gt=None, init=None, iterations: int = ITERATIONS,
                          progress: bool = True):
    """Train the bundled bespoke solver for ``nfe`` for ``den`` with :func:`~adjointflow.fit_bespoke`'s
    default recipe (final-RMSE loss, full-batch L-BFGS, best held-out iterate kept; ``init`` warm-starts
    from a trained solver of the same base; a non-stationary (``"ns"``) solver starts from UniPC
    (:data:`NS_START`) unless ``init`` is given) and save it to ``path`` (default: the bundled file).
    ``gt``: the ``(train, val)`` ground truth, default :func:`bundled_ground_truth`. Returns ``(solver, history)``."""
    from ..solvers import fit_bespoke

    base, steps = _spec(nfe)
    solver = start_solver(den, nfe, warm=init is not None)
    gt_train, gt_val = bundled_ground_truth(den) if gt is None else gt
    hist = fit_bespoke(den, solver, gt_train, gt_val, t_start=T_START, t_end=T_END, iterations=iterations,
                       eval_every=10, patience=PATIENCE, init=init, progress=progress)
    info = {"command": f"python -m adjointflow.demo.bespoke_digits --nfe {nfe}", "seconds": round(hist.seconds, 1),
            "load_average": round(os.getloadavg()[0], 2), "iterations": hist.eval_iteration[-1],
            "best_iteration": hist.best_iteration, "stopped": hist.stopped, "loss_evaluations": len(hist.loss),
            "val_rmse_start": hist.val_rmse[0], "val_rmse_best": hist.best_val_rmse, "n_train": len(gt_train),
            "n_val": len(gt_val), "warm_start_from": None if init is None else init.n_steps * init.nfe_per_step,
            "start": _start_label(nfe) if base == "ns" and init is None else None}
    solver.save(bundled_path(nfe) if path is None else path, denoiser=den, info=info)
    return solver, hist


def load_bundled_bespoke(den, nfe: int = 10, path=None):
    """The bundled bespoke solver for ``nfe`` NFE, checked against ``den``: ``FileNotFoundError`` if the
    file is absent, ``ValueError`` (naming the file) if it is damaged or was trained for another model."""
    base, steps = _spec(nfe)
    path = bundled_path(nfe) if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no bundled bespoke solver at {path}; train one with "
                                f"`python -m adjointflow.demo.bespoke_digits --nfe {nfe}`")
    return _solver_class(base).load(path, denoiser=den, n_steps=steps, base=base)


def bundled_bespoke_solvers(den, nfes, directory=None) -> tuple[dict, list[str]]:
    """The bundled solvers for those of ``nfes`` that have one, as ``{nfe: solver}``, and a one-line
    note for each that could not be loaded (missing, damaged, or for another model): the caller skips
    that solver and goes on."""
    solvers, notes = {}, []
    for nfe in nfes:
        if nfe not in BUNDLED:
            continue
        try:
            solvers[nfe] = load_bundled_bespoke(den, nfe, bundled_path(nfe, directory))
        except (FileNotFoundError, ValueError) as exc:
            notes.append(f"BespokeSolver at NFE {nfe}: skipped ({' '.join(str(exc).split())})")
    return solvers, notes


def _warm_start_source(den, nfe: int, directory=None):
    """The bundled solver with the next larger NFE, if it has the same base and loads (else ``None``)."""
    larger = [n for n in sorted(BUNDLED) if n > nfe and BUNDLED[n][0] == BUNDLED[nfe][0]]
    if not larger:
        return None
    try:
        return load_bundled_bespoke(den, larger[0], bundled_path(larger[0], directory))
    except (FileNotFoundError, ValueError):
        return None


def main(argv=None) -> int:
    import time

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nfe", type=int, choices=sorted(BUNDLED), action="append",
                    help="NFE budget to retrain (repeatable; default: all, from the largest down, each warm-started "
                         "from the bundled solver with the next larger NFE when it has the same base)")
    ap.add_argument("--out-dir", default=None, help="default: the package's bundle")
    ap.add_argument("--iterations", type=int, default=ITERATIONS)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from .run import load_denoiser

        den = load_denoiser()[0]
        start = time.perf_counter()
        print(f"computing the ground truth of {N_TRAIN} + {N_VAL} latents (dopri5 at {GT_TOL:g}) ...", flush=True)
        gt = bundled_ground_truth(den)
        print(f"ground truth done in {time.perf_counter() - start:.0f} s (load average {os.getloadavg()[0]:.1f})")
        for nfe in sorted(args.nfe or BUNDLED, reverse=True):
            out = bundled_path(nfe, args.out_dir)
            init = _warm_start_source(den, nfe, args.out_dir)
            solver, hist = train_bundled_bespoke(den, nfe, out, gt=gt, init=init, iterations=args.iterations)
            print(f"wrote {out}: NFE {nfe} ({solver.base}, {solver.n_steps} steps{', warm start' if init else ''}), "
                  f"held-out RMSE {hist.val_rmse[0]:.4f} -> {hist.best_val_rmse:.4f} at iteration "
                  f"{hist.best_iteration}, {hist.seconds:.0f} s (load average {os.getloadavg()[0]:.1f})")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
