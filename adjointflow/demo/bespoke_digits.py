"""A bespoke solver trained for the bundled digits model (Shaul et al. 2023), bundled with the demo.

``python -m adjointflow.demo.bespoke_digits`` retrains it (about 1-2 minutes on one CPU core): an RK2
scale-time solver with 5 steps (10 NFE) on the demo's interval t = 0.999 -> 1e-3, trained with the
final-RMSE loss against dopri5 solutions of class-conditional latents (labels 0-9), a held-out set
kept for early stopping. The file carries the model fingerprint, so it only loads for the model it
was trained for.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .digits import DEFAULT_DIR

__all__ = ["BUNDLED_BESPOKE", "BESPOKE_STEPS", "train_bundled_bespoke", "load_bundled_bespoke"]

BUNDLED_BESPOKE = DEFAULT_DIR / "digits_bespoke_rk2_nfe10.pt"
BESPOKE_STEPS = 5  # RK2: 10 NFE
T_START, T_END = 0.999, 1e-3


def _latents(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.arange(n) % 10


def train_bundled_bespoke(den, path=BUNDLED_BESPOKE, iterations: int = 150, n_train: int = 256, n_val: int = 64,
                          seed: int = 0, progress: bool = True):
    """Train the demo's bespoke RK2 solver for ``den`` and save it to ``path``. Returns ``(solver, history)``."""
    from ..solvers import BespokeSolver, fit_bespoke

    solver = BespokeSolver(BESPOKE_STEPS, base="rk2")
    (xt, yt), (xv, yv) = _latents(n_train, seed + 100), _latents(n_val, seed + 200)
    hist = fit_bespoke(den, solver, xt, xv, t_start=T_START, t_end=T_END, cond_train=yt, cond_val=yv,
                       loss="rmse", iterations=iterations, batch_size=32, lr=1e-2, lr_final=5e-4,
                       eval_every=25, seed=seed, rtol=1e-5, atol=1e-5, progress=progress)
    solver.save(path, denoiser=den)
    return solver, hist


def load_bundled_bespoke(den, path=BUNDLED_BESPOKE):
    """The bundled bespoke solver for ``den`` (``FileNotFoundError`` if absent, ``ValueError`` if it was
    trained for another model)."""
    from ..solvers import BespokeSolver

    if not Path(path).is_file():
        raise FileNotFoundError(f"no bundled bespoke solver at {path}; train one with "
                                "`python -m adjointflow.demo.bespoke_digits`")
    return BespokeSolver.load(path, denoiser=den, n_steps=BESPOKE_STEPS, base="rk2")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(BUNDLED_BESPOKE))
    ap.add_argument("--iterations", type=int, default=150)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from .run import load_denoiser

    den = load_denoiser()[0]
    _, hist = train_bundled_bespoke(den, args.out, iterations=args.iterations)
    print(f"wrote {args.out}: held-out RMSE {hist.val_rmse[0]:.4f} (identity = midpoint) -> {hist.best_val_rmse:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
