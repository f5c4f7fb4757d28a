"""Command line: ``python -m adjointflow {demo, train-digits, guide, bench}``.

Expected failures (a bad argument, a missing, damaged or crafted weights file, an output that exists,
training that diverges, a file-system error, Ctrl-C) end the program with a one-line ``error: ...``
message on stderr and a non-zero exit status, never a traceback; ``--debug`` (before or after the
subcommand) shows the traceback as well.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback
from pathlib import Path

__all__ = ["main", "build_parser", "CLIError"]

# Set before anything imports torch / diffusers / matplotlib (docs/design.md §9): on the 2-core machines
# two torch threads can run ~30x slower than one.
for _k, _v in (("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"), ("HF_HUB_OFFLINE", "1"), ("MPLBACKEND", "Agg")):
    os.environ.setdefault(_k, _v)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _learning_rate(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a positive finite number <= 1 (an Adam step size), got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m adjointflow`` argument parser (subcommands ``demo``, ``train-digits``, ``guide``, ``bench``)."""
    from .demo.digits import DEFAULT_DIR

    ap = argparse.ArgumentParser(
        prog="python -m adjointflow",
        description="adjointflow: differentiable ODE/SDE solvers for diffusion and flow-matching models.",
    )
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="command", metavar="{demo,train-digits,guide,bench}")
    sub.required = True
    # --debug after the subcommand too; SUPPRESS keeps the subparser from resetting a --debug given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")

    d = sub.add_parser(
        "demo", parents=[common],
        help="sample with every solver and solve inverse problems on the bundled digits model",
        description="Load the bundled digits flow model; (a) sample with every solver at NFE 5/10/20 and "
        "compare with a dopri5 reference, (b) inpainting and 2x super-resolution with every guidance "
        "method. Writes solvers.png, inverse_problems.png and results.md into --out.",
    )
    from .demo.run import QUICK

    d.add_argument("--quick", action="store_true", help=f"a shorter run (1-2 minutes): {QUICK.describe()}")
    d.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default: %(default)s)")
    d.add_argument(
        "--weights", default=None, metavar="PATH",
        help="digits model (.safetensors file or directory; default: the committed model)",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    t = sub.add_parser(
        "train-digits", parents=[common],
        help="train the digits flow-matching model (about 10 minutes on one CPU core)",
        description="Train the small flow-matching model on scikit-learn's 8x8 digits and write "
        "digits_flow.safetensors (weights and metadata in one file, replaced atomically).",
    )
    t.add_argument("--out", default=str(DEFAULT_DIR), metavar="DIR", help="output directory (default: %(default)s)")
    t.add_argument("--steps", type=_positive_int, default=7000)
    t.add_argument("--batch", type=_positive_int, default=64)
    t.add_argument("--lr", type=_learning_rate, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=_positive_int, default=100)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--force", action="store_true",
                   help="replace an existing digits_flow.safetensors in --out (the default --out holds the bundled "
                   "model the demo uses)")

    from .batch.cli import add_guide_parser

    add_guide_parser(sub, common)
    b = sub.add_parser(
        "bench",
        help="run the benchmark suites (pytest benchmarks --benchmark-only)",
        description="Run `pytest benchmarks --benchmark-only` with this Python; any further arguments "
        "(e.g. -k euler) go to pytest.",
    )
    return ap


def _cmd_demo(args) -> int:
    weights = args.weights
    if weights is not None:
        p = Path(weights)
        if not p.exists():
            raise CLIError(f"weights not found: {weights} (pass a .safetensors file or a directory holding one)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out} exists and is not a directory")
    from .demo.run import run_demo

    run_demo(out_dir=out, quick=args.quick, weights=weights, progress=not args.no_progress)
    return 0


def _cmd_train(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out} exists and is not a directory")
    from .demo.digits import WEIGHTS_NAME, train_digits

    # train_digits refuses an existing output before training unless overwrite=True, and writes nothing else
    _, meta = train_digits(
        out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
        log_every=args.log_every, progress=not args.no_progress, overwrite=args.force,
    )
    print(
        f"wrote {out / WEIGHTS_NAME} ({meta['n_params']} parameters): final loss {meta['final_loss']:.4f}, "
        f"held-out loss {meta['test_loss_ema']:.4f}, {meta['seconds']:.0f} s",
        flush=True,
    )
    return 0


def _cmd_bench(args) -> int:
    root = Path(__file__).resolve().parent.parent
    bench = root / "benchmarks"
    if not bench.is_dir():
        raise CLIError(f"no benchmarks directory at {bench} (run from a source checkout)")
    extra = list(args.pytest_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    cmd = [sys.executable, "-m", "pytest", str(bench), "--benchmark-only", "-p", "no:cacheprovider",
           "-o", "testpaths=benchmarks", *extra]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=root)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m adjointflow``; returns the exit status."""
    parser = build_parser()
    # argparse exits with status 2 and a usage line on bad arguments; only `bench` takes extra ones
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.pytest_args = extra
    import torch

    torch.set_num_threads(1)
    from .batch.cli import run_guide

    handlers = {"demo": _cmd_demo, "train-digits": _cmd_train, "guide": run_guide, "bench": _cmd_bench}
    try:
        return handlers[args.command](args)
    except (CLIError, OSError, ValueError, ImportError, ArithmeticError) as exc:
        # OSError: missing/unreadable/existing files, disk full; ArithmeticError: diverging training
        # (FloatingPointError, adjointflow's NonFiniteError). Anything else is a bug: its traceback stays.
        if args.debug:
            traceback.print_exc()
        msg = " ".join(str(exc).split()) or type(exc).__name__
        hint = "" if args.debug else " (--debug shows the traceback)"
        print(f"{parser.prog} {args.command}: error: {msg}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130
