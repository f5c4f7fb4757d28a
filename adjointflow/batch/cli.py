"""``python -m adjointflow guide``: the command line of :func:`adjointflow.batch.guide`.

Strings become objects here: ``--task inpaint|sr|blur`` an operator of :mod:`adjointflow.guidance`
(``module:callable`` a user's ``y -> objective``), ``--method`` a guidance class of
:mod:`adjointflow.guidance` (or ``module:Class``) built with the ``--set key=value`` settings
(Python literals), ``--model digits`` the bundled model (or ``module:factory`` returning a ``Denoiser``
or ``(Denoiser, sample_shape)``).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import math
from pathlib import Path

__all__ = ["add_guide_parser", "run_guide", "load_attr"]

BUILTIN_TASKS = ("inpaint", "sr", "blur")


def load_attr(spec: str, what: str):
    """The object named by ``"package.module:attribute"`` (``ValueError`` naming ``what`` otherwise)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"{what} {spec!r}: expected 'module:attribute'")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ImportError(f"{what} {spec!r}: cannot import {mod_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {obj.__name__ if hasattr(obj, '__name__') else obj} has no {part!r}")
        obj = getattr(obj, part)
    return obj


def _setting(s: str) -> tuple[str, object]:
    key, sep, raw = s.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a Python literal VALUE, got {s!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word: a string setting such as optimizer=adam
    return key, value


def _shape(s: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in s.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected one sample's shape as positive ints, e.g. 3,64,64; got {s!r}")
    return dims


def _positive(kind):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}")
        return v

    return parse


def add_guide_parser(sub, common) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "guide", parents=[common],
        help="solve an inverse problem for every item of a folder or .npz (resumable; shards over torchrun ranks)",
        description="Run one guidance method on every measurement (or image, measured with noise --sigma) of INPUTS "
        "and write OUT/items/<id>.pt, OUT/results.csv and OUT/summary.md. A rerun skips finished items. Under "
        "`torchrun --nproc-per-node P -m adjointflow guide ...` the items are shared among the P processes.",
    )
    g.add_argument("inputs", help=".npz with 'y' (measurements) and/or 'x' (ground truth), or a folder of .npy/.png")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder")
    g.add_argument("--given", choices=("measurements", "images"), default="measurements",
                   help="what the files of an input folder hold (default: %(default)s)")
    g.add_argument("--task", required=True, metavar="{inpaint,sr,blur,MODULE:CALLABLE}",
                   help="the measurement: inpaint (--mask), sr (--factor), blur (--blur-sigma, --blur-size), or a "
                   "callable y -> objective")
    g.add_argument("--mask", metavar="FILE", help="inpainting mask, .npy or .png (non-zero = observed)")
    g.add_argument("--factor", type=_positive(int), default=2, help="super-resolution factor (default: %(default)s)")
    g.add_argument("--blur-sigma", type=_positive(float), default=1.0, help="blur std in pixels (default: %(default)s)")
    g.add_argument("--blur-size", type=_positive(int), default=None, help="blur taps (odd; default: 2 ceil(3 sigma) + 1)")
    g.add_argument("--sigma", type=_positive(float), default=0.05, help="measurement noise std (default: %(default)s)")
    g.add_argument("--method", required=True, metavar="NAME",
                   help="a guidance method of adjointflow.guidance (DFlow, FlowChef, DPS, ...) or module:Class")
    g.add_argument("--set", dest="settings", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the method (repeatable), e.g. --set iterations=10")
    g.add_argument("--model", default="digits", metavar="{digits,MODULE:FACTORY}",
                   help="the bundled digits model (default) or a factory returning a Denoiser or (Denoiser, shape)")
    g.add_argument("--shape", type=_shape, default=None, metavar="C,H,W", help="one sample's shape (user models)")
    g.add_argument("--model-id", default=None, help="a unique name for a model that cannot be fingerprinted by value")
    g.add_argument("--seed", type=int, default=0, help="base seed; with an item's name it seeds that item")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: GPU LOCAL_RANK and NCCL under torchrun (default: %(default)s, gloo)")
    g.add_argument("--timeout", type=_positive(float), default=1800.0,
                   help="seconds a process waits for the others at a barrier (default: %(default)s)")
    g.add_argument("--force", action="store_true", help="delete results of a different configuration in --out")
    g.add_argument("--no-progress", action="store_true")
    return g


def _mask(path: str):
    import numpy as np
    import torch

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--mask {path} does not exist")
    if p.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(p) as im:
            a = np.asarray(im.convert("L"), dtype=np.float64)
    else:
        a = np.load(p, allow_pickle=False)
    return torch.from_numpy((np.asarray(a) != 0).astype(np.float64))


def _task(args):
    from ..guidance import Downsample, GaussianBlur, Inpaint

    if args.task == "inpaint":
        if args.mask is None:
            raise ValueError("--task inpaint needs --mask FILE (.npy or .png, non-zero = observed)")
        return Inpaint(_mask(args.mask))
    if args.task == "sr":
        return Downsample(args.factor)
    if args.task == "blur":
        size = args.blur_size if args.blur_size is not None else 2 * math.ceil(3 * args.blur_sigma) + 1
        return GaussianBlur(sigma=args.blur_sigma, size=size)
    if ":" not in args.task:
        raise ValueError(f"--task {args.task!r}: expected one of {BUILTIN_TASKS} or module:callable")
    fn = load_attr(args.task, "--task")
    if not callable(fn):
        raise ValueError(f"--task {args.task!r} is not callable")
    return fn


def _method(args):
    import adjointflow.guidance as G

    if ":" in args.method:
        cls = load_attr(args.method, "--method")
    else:
        names = sorted(n for n in G.__all__ if inspect.isclass(getattr(G, n)) and hasattr(getattr(G, n), "run"))
        if args.method not in names:
            raise ValueError(f"--method {args.method!r}: expected one of {names} or module:Class")
        cls = getattr(G, args.method)
    settings = dict(args.settings)
    try:
        return cls(**settings)
    except TypeError as exc:
        raise ValueError(f"--method {args.method} with settings {settings}: {exc}") from None


def _model(args):
    if args.model == "digits":
        return None, args.shape
    factory = load_attr(args.model, "--model")
    made = factory()
    if isinstance(made, tuple) and len(made) == 2:
        den, shape = made
        return den, tuple(shape) if args.shape is None else args.shape
    return made, args.shape


def run_guide(args) -> int:
    """Run the ``guide`` command; exit status 0 if every item finished, 1 if any failed."""
    from .runner import guide

    task, method = _task(args), _method(args)
    model, shape = _model(args)
    describe = {"inputs": args.inputs, "task": args.task, "method": args.method,
                "settings": " ".join(f"{k}={v!r}" for k, v in args.settings), "model": args.model}
    outcome = guide(args.inputs, args.out, task=task, method=method, model=model, sample_shape=shape,
                    sigma=args.sigma, given=args.given, seed=args.seed, device=args.device, force=args.force,
                    progress=not args.no_progress, timeout_s=args.timeout, model_id=args.model_id, describe=describe)
    failed = outcome.failed
    if outcome.rank == 0:
        import sys

        print(f"{len(outcome.rows) - len(failed)} of {len(outcome.rows)} item(s) finished; "
              f"{Path(args.out) / 'summary.md'}", flush=True)
        if failed:
            print(f"{len(failed)} item(s) failed; first: {failed[0].id}: {failed[0].error}", file=sys.stderr)
    return 1 if failed else 0
