"""Bespoke solvers trained for the bundled digits model (Shaul et al. 2024), bundled with the demo.

One file per NFE budget in :data:`BUNDLED` (base and steps chosen by measurement, see
``benchmarks/results/bespoke.md``), each carrying the model fingerprint and a checksum, so it only
loads, intact, for the model it was trained for. Retrain one (or all) with

    python -m adjointflow.demo.bespoke_digits --nfe 10

on the demo's interval t = 0.999 -> 1e-3, with the final-RMSE loss against dopri5 solutions of
class-conditional latents (labels 0-9), a held-out set kept for early stopping.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .digits import DEFAULT_DIR

__all__ = ["BUNDLED", "BUNDLE_DIR", "T_START", "T_END", "bundled_path", "load_bundled_bespoke", "bundled_bespoke_solvers",
           "train_bundled_bespoke"]

#: NFE budget -> (base, steps) of the bundled solver
BUNDLED = {10: ("rk2", 5)}
T_START, T_END = 0.999, 1e-3
#: where the bundled files live (next to the digits weights)
BUNDLE_DIR = DEFAULT_DIR


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


def train_bundled_bespoke(den, nfe: int, path=None, iterations: int = 150, n_train: int = 256, n_val: int = 64,
                          seed: int = 0, progress: bool = True):
    """Train the bundled bespoke solver for ``nfe`` for ``den`` and save it to ``path`` (default: the
    bundled file). Returns ``(solver, history)``."""
    from ..solvers import BespokeSolver, fit_bespoke

    base, steps = _spec(nfe)
    solver = BespokeSolver(steps, base=base)
    (xt, yt), (xv, yv) = _latents(n_train, seed + 100), _latents(n_val, seed + 200)
    hist = fit_bespoke(den, solver, xt, xv, t_start=T_START, t_end=T_END, cond_train=yt, cond_val=yv,
                       loss="rmse", iterations=iterations, batch_size=32, lr=1e-2, lr_final=5e-4,
                       eval_every=25, seed=seed, rtol=1e-5, atol=1e-5, progress=progress)
    solver.save(bundled_path(nfe) if path is None else path, denoiser=den)
    return solver, hist


def load_bundled_bespoke(den, nfe: int = 10, path=None):
    """The bundled bespoke solver for ``nfe`` NFE, checked against ``den``: ``FileNotFoundError`` if the
    file is absent, ``ValueError`` (naming the file) if it is damaged or was trained for another model."""
    from ..solvers import BespokeSolver

    base, steps = _spec(nfe)
    path = bundled_path(nfe) if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no bundled bespoke solver at {path}; train one with "
                                f"`python -m adjointflow.demo.bespoke_digits --nfe {nfe}`")
    return BespokeSolver.load(path, denoiser=den, n_steps=steps, base=base)


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nfe", type=int, choices=sorted(BUNDLED), action="append",
                    help="NFE budget to retrain (repeatable; default: all)")
    ap.add_argument("--out-dir", default=None, help="default: the package's bundle")
    ap.add_argument("--iterations", type=int, default=150)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from .run import load_denoiser

    den = load_denoiser()[0]
    for nfe in args.nfe or sorted(BUNDLED):
        out = bundled_path(nfe, args.out_dir)
        _, hist = train_bundled_bespoke(den, nfe, out, iterations=args.iterations)
        print(f"wrote {out}: held-out RMSE {hist.val_rmse[0]:.4f} (untrained) -> {hist.best_val_rmse:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
