"""Batch inverse problems: one guidance run per input item, resumable, sharded over ``torchrun`` ranks.

For item ``k`` with measurement ``y_k`` (given, or simulated from a ground-truth image ``x_k`` as
``y_k = A(x_k) + sigma n_k``) the runner minimises the task's objective -- ``MeasurementLoss(A, y_k,
sigma)`` for an operator ``A``, or what a user callable returns for ``y_k`` -- with one guidance method
(:mod:`adjointflow.guidance`) from a start latent ``x_init ~ N(0, I)``, and saves the estimate.

Every random draw of item ``k`` (``x_init``, the simulated noise ``n_k``, torch's global generator during
the run) is seeded from ``sha256(seed, id_k)``, and items run one at a time, so an item's result depends
only on the configuration and its identity: not on the number of processes, on which rank ran it, or
on which items ran before it (bit for bit on one kind of device).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..distributed.context import DEFAULT_TIMEOUT_S, DistContext, process_group
from ..fingerprint import model_fingerprint, value_digest
from ..guidance.objectives import MeasurementLoss, Operator
from ..models import Denoiser
from .items import ItemData, ItemSource, open_inputs
from .report import ItemRow, RunTotals, results_csv, summary_md
from .store import ResultStore

__all__ = ["guide", "GuideOutcome", "item_seed"]

DIGITS_SHAPE = (1, 16, 16)


@dataclass(frozen=True)
class GuideOutcome:
    """What :func:`guide` did: on rank 0 every item's row (finished and failed), on the other ranks this
    run's rows; this run's totals; ``ok``: no item failed."""

    rows: list
    totals: RunTotals
    rank: int = 0

    @property
    def failed(self) -> list:
        return [r for r in self.rows if r.status != "ok"]

    @property
    def ok(self) -> bool:
        return not self.failed


def item_seed(seed: int, item_id: str) -> int:
    """The 63-bit seed of item ``item_id``: the first 8 bytes of ``sha256(f"{seed}/{item_id}")``."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{item_id}".encode()).digest()[:8], "big") >> 1


def _model_dtype(den: Denoiser) -> torch.dtype:
    net = den.net
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _describe(obj) -> str:
    """A short readable form: a dataclass by its non-default fields, a tensor by its shape (the config hash
    covers the values)."""
    if isinstance(obj, Tensor):
        return f"tensor{list(obj.shape)}"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        parts = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if default is dataclasses.MISSING or isinstance(v, Tensor) or not _equal(v, default):
                parts.append(f"{f.name}={_describe(v)}")
        return f"{type(obj).__name__}({', '.join(parts)})"
    return getattr(obj, "__qualname__", None) or repr(obj)


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _quiet(method):
    """The method without its own progress bar (the runner has one); same numbers."""
    if dataclasses.is_dataclass(method) and any(f.name == "progress" for f in dataclasses.fields(method)):
        return dataclasses.replace(method, progress=False)
    return method


def _check_args(task, method, sigma, seed, sample_shape):
    if not (isinstance(task, Operator) or (callable(task) and not isinstance(task, type))):
        raise TypeError(f"task must be a measurement Operator instance (Inpaint, Downsample, GaussianBlur, ...) or a "
                        f"callable y -> objective, got {task!r}")
    if not callable(getattr(method, "run", None)) or isinstance(method, type):
        raise TypeError(f"method must be a guidance method instance with run(denoiser, objective, x_init), got {method!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma (the measurement noise std) must be a positive number, got {sigma!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not (isinstance(sample_shape, tuple) and sample_shape
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sample_shape)):
        raise ValueError(f"sample_shape must be a tuple of positive ints (one sample's shape), got {sample_shape!r}")


def _measurement_shape(task, sample_shape, dtype) -> tuple[int, ...] | None:
    """The operator's output shape for one sample (``None`` for a user objective); a mask or operator that
    does not fit the model's samples is a ``ValueError`` here, before any work."""
    if not isinstance(task, Operator):
        return None
    try:
        with torch.no_grad():
            return tuple(task(torch.zeros((1, *sample_shape), dtype=dtype)).shape[1:])
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"the task's operator {task!r} does not fit the model's samples of shape {sample_shape}: "
                         f"{exc}") from None


def _shape_problems(source: ItemSource, ids: list[str], sample_shape, meas_shape, user_task) -> tuple[list, dict]:
    """(problems that stop the run, {id: error} for items that cannot be read)."""
    problems, unreadable = [], {}
    if source.given == "images" and user_task:
        problems.append("a user objective needs measurements ('y' in the .npz, or given='measurements'): it cannot "
                        "simulate them from images")
    truth_shape = getattr(source, "truth_shape", lambda: None)()
    if truth_shape is not None and truth_shape != tuple(sample_shape):
        problems.append(f"ground-truth images 'x' have shape {truth_shape}, the model's samples {tuple(sample_shape)}")
    want, what = (tuple(sample_shape), "the model's samples") if source.given == "images" else (meas_shape, "the task's measurements")
    for item_id in ids:
        try:
            shape = source.shape(item_id)
        except (OSError, ValueError) as exc:
            unreadable[item_id] = f"unreadable: {' '.join(str(exc).split())}"
            continue
        if want is not None and shape != want:
            problems.append(f"item {item_id!r} has shape {shape}, {what} have shape {want}")
            if len(problems) > 5:
                break
    return problems, unreadable


def guide(inputs, out, *, task, method, model: Denoiser | None = None, sample_shape: tuple | None = None,
          sigma: float = 0.05, given: str = "measurements", seed: int = 0, device: str = "cpu",
          force: bool = False, progress: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S,
          model_id: str | None = None, describe: dict | None = None) -> GuideOutcome:
    """Solve the inverse problem of every item of ``inputs`` (a ``.npz`` file or a folder, see
    :mod:`adjointflow.batch.items`) with ``method`` and write the results into ``out``
    (:mod:`adjointflow.batch.store`). Under ``torchrun`` the items are shared among the ranks.

    * ``task``: an :class:`~adjointflow.guidance.Operator` ``A`` (objective ``MeasurementLoss(A, y, sigma)``)
      or a callable ``y -> objective`` (``y`` of shape ``(1, *measurement)``; objective ``x0 -> (batch,)``).
    * ``method``: a guidance method instance, e.g. ``DFlow()`` (run once per item, batch 1).
    * ``model``: a :class:`~adjointflow.Denoiser` (default: the bundled digits model) and
      ``sample_shape``, one sample's shape (default ``(1, 16, 16)`` for the digits model; required otherwise).
    * ``sigma``: the measurement noise std (also used to simulate measurements from images).
    * ``seed``: with an item's identity it seeds everything random about that item (:func:`item_seed`).
    * ``force``: an ``out`` holding another configuration's results is refused unless ``force`` (which
      deletes them). ``timeout_s``: how long a rank waits for the others at a barrier.
    * ``describe``: extra JSON-able fields for ``config.json`` and the summary (the CLI's arguments).

    Items already finished in ``out`` are skipped (by name: each result records the SHA-256 of the input
    it was computed from, but an input replaced under the same name is not re-run; use ``force``).
    Unreadable items get an error row (the return value's ``failed``); a shape that does not fit the
    model stops the run (``ValueError``) before any item runs.
    """
    with process_group(device, timeout_s) as ctx:
        return _guide(ctx, inputs, out, task, method, model, sample_shape, sigma, given, seed, force, progress,
                      model_id, describe or {})


def _guide(ctx: DistContext, inputs, out, task, method, model, sample_shape, sigma, given, seed, force, progress,
           model_id, describe):
    start = time.perf_counter()
    if model is None:
        from .. import pretrained

        model = pretrained.digits()
        sample_shape = DIGITS_SHAPE if sample_shape is None else sample_shape
    elif not isinstance(model, Denoiser):
        raise TypeError(f"model must be an adjointflow.Denoiser, got {type(model).__name__}")
    if sample_shape is None:
        raise ValueError("sample_shape (one sample's shape, e.g. (3, 64, 64)) is required with a model other than "
                         "the bundled digits model")
    sample_shape = tuple(sample_shape)
    _check_args(task, method, sigma, seed, sample_shape)
    source = open_inputs(inputs, given)
    dtype = _model_dtype(model)
    meas_shape = _measurement_shape(task, sample_shape, dtype)
    method = _quiet(method)
    config = {"inputs": str(source.path.resolve()), "task": _describe(task),
              "task_sha256": value_digest(task, "the task"), "method": _describe(method),
              "method_sha256": value_digest(method, "the method"),
              "model_fingerprint": model_fingerprint(model, model_id), "sample_shape": list(sample_shape),
              "sigma": float(sigma), "given": source.given, "seed": seed, "device_type": ctx.device.type,
              "dtype": str(dtype), **{f"arg.{k}": v for k, v in describe.items()}}
    config_sha = hashlib.sha256(repr(sorted((k, v) for k, v in config.items() if not k.startswith("arg.")))
                                .encode()).hexdigest()
    store = ResultStore(out)

    # rank 0 prepares the folder and lists the finished items before any rank writes
    state: Any = None
    if ctx.rank == 0:
        try:
            store.prepare(config, config_sha, force)
            state = ("ok", store.finished())
        except (OSError, ValueError) as exc:
            state = ("error", type(exc).__name__, str(exc))
    state = ctx.broadcast(state)
    if state[0] == "error":
        raise (FileExistsError if state[1] == "FileExistsError" else ValueError)(state[2])
    finished = set(state[1])
    pending = [i for i in source.ids if i not in finished]
    mine = ctx.shard(pending)

    # shapes of this rank's items, then everyone learns every rank's problems: all stop, or none
    problems, unreadable = _shape_problems(source, mine, sample_shape, meas_shape, not isinstance(task, Operator))
    all_problems = [p for ps in ctx.all_gather(problems) for p in ps]
    if all_problems:
        raise ValueError("inputs do not fit the model/task (nothing was run): " + "; ".join(dict.fromkeys(all_problems)))

    model = model.to(ctx.device)
    rows = _run_items(ctx, source, store, mine, unreadable, task, method, model, sample_shape, sigma, seed,
                      dtype, config_sha, progress)
    ctx.barrier()
    gathered = [r for rs in ctx.all_gather(rows) for r in rs]
    totals = RunTotals(ctx.world_size, len(pending), len(finished), time.perf_counter() - start,
                       {"method": _describe(method), "task": _describe(task), "sigma": sigma, "seed": seed,
                        "config sha256": config_sha[:16], **describe})
    all_rows = _final_rows(store, source, gathered) if ctx.rank == 0 else gathered
    if ctx.rank == 0:
        store.write_text("results.csv", results_csv(all_rows))
        store.write_text("summary.md", summary_md(all_rows, totals))
    ctx.barrier()  # the summary exists when any rank returns
    return GuideOutcome(all_rows, totals, ctx.rank)


def _input_digest(data: ItemData) -> str:
    """SHA-256 of an item's input arrays: recorded with its result (which input produced it)."""
    h = hashlib.sha256()
    for t in (data.y, data.truth):
        h.update(b"-" if t is None else t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _objective(task, y: Tensor, sigma: float):
    return MeasurementLoss(task, y, sigma) if isinstance(task, Operator) else task(y)


def _run_items(ctx, source, store, mine, unreadable, task, method, model, sample_shape, sigma, seed, dtype,
               config_sha, progress) -> list[ItemRow]:
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(total=len(mine), desc=f"guide rank {ctx.rank}/{ctx.world_size}", position=ctx.local_rank,
               disable=not progress, dynamic_ncols=True, leave=ctx.rank == 0)
    try:
        for item_id in mine:
            if item_id in unreadable:
                rows.append(ItemRow(item_id, "error", rank=ctx.rank, error=unreadable[item_id]))
            else:
                rows.append(_run_item(ctx, source, store, item_id, task, method, model, sample_shape, sigma,
                                      item_seed(seed, item_id), dtype, config_sha))
            bar.update(1)
    finally:
        bar.close()
    return rows


def _run_item(ctx, source, store, item_id, task, method, model, sample_shape, sigma, s, dtype,
              config_sha) -> ItemRow:
    """Run and save one item (seeded by ``s``); a failure is its error row, never an exception."""
    from ..demo.report import psnr

    dev = ctx.device
    try:
        data: ItemData = source.load(item_id)
    except (OSError, ValueError) as exc:
        return ItemRow(item_id, "error", rank=ctx.rank, error=f"unreadable: {exc}")
    try:
        truth = None if data.truth is None else data.truth.to(dev, dtype).unsqueeze(0)
        if data.y is None:  # simulate the measurement from the ground truth, noise seeded by the item
            with torch.no_grad():
                ax = task(truth)
            g = torch.Generator().manual_seed(s ^ 1)
            y = ax + sigma * torch.randn(ax.shape, generator=g, dtype=ax.dtype).to(dev)
        else:
            y = data.y.to(dev, dtype).unsqueeze(0)
        objective = _objective(task, y, sigma)
        g = torch.Generator().manual_seed(s)
        x_init = torch.randn((1, *sample_shape), generator=g, dtype=dtype).to(dev)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(s)
            res = method.run(model, objective, x_init)
    except Exception as exc:  # one item's failure must not lose the others' work
        return ItemRow(item_id, "error", rank=ctx.rank, error=f"{type(exc).__name__}: {exc}")
    loss = float(res.losses[-1].double().mean())
    value = psnr(res.x, truth) if truth is not None else math.nan
    store.save(item_id, {"config_sha256": config_sha, "input_sha256": _input_digest(data),
                         "x": res.x.detach().cpu(), "y": y.cpu(),
                         "latent": res.latent.detach().cpu(), "loss": loss, "psnr": value,
                         "nfe": int(res.nfe), "vjps": int(res.vjps), "seconds": float(res.seconds),
                         "stop_reason": str(res.stop_reason), "seed": s})
    return ItemRow(item_id, "ok", loss, value, int(res.nfe), int(res.vjps), float(res.seconds),
                   str(res.stop_reason), ctx.rank)


def _final_rows(store: ResultStore, source: ItemSource, ran: list[ItemRow]) -> list[ItemRow]:
    """One row per item of the inputs: this run's rows, finished items of earlier runs read from their files."""
    by_id = {r.id: r for r in ran}
    done = set(store.finished())
    rows = []
    for item_id in source.ids:
        if item_id in by_id:
            rows.append(by_id[item_id])
        elif item_id in done:
            try:
                b = store.load(item_id)
                rows.append(ItemRow(item_id, "ok", b["loss"], float(b.get("psnr", math.nan)), b["nfe"], b["vjps"],
                                    b["seconds"], b["stop_reason"]))
            except ValueError as exc:
                rows.append(ItemRow(item_id, "error", error=str(exc)))
        else:
            rows.append(ItemRow(item_id, "error", error="not run (no result file)"))
    return rows
