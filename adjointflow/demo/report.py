"""Demo output: PSNR, the peak-memory meter hook, the two figures and the markdown/console tables."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["psnr", "memory_meter", "strip", "plot_solvers", "plot_inverse", "markdown_table", "console_table"]


def psnr(x: Tensor, ref: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in ``[-1, 1]`` (peak-to-peak 2), averaged over the batch:
    ``10 log10(2^2 / MSE)`` per image. The estimate is clamped to ``[-1, 1]`` first, as when saving it."""
    mse = (x.double().clamp(-1, 1) - ref.double()).flatten(1).pow(2).mean(1).clamp_min(1e-20)
    return float((10.0 * torch.log10(4.0 / mse)).mean())


def memory_meter():
    """The library's peak-memory meter class (:class:`adjointflow.adjoint.memory.PeakMemory`: live tensor
    storage bytes, ``with PeakMemory() as m: ...; m.peak``), or ``None`` where it is not available."""
    try:
        from ..adjoint.memory import PeakMemory
    except ImportError:
        return None
    return PeakMemory


@contextlib.contextmanager
def measure_peak(meter):
    """``with measure_peak(meter) as box:`` -> ``box["peak"]`` in bytes after the block (None without a meter)."""
    box = {"peak": None}
    if meter is None:
        yield box
        return
    with meter() as m:
        yield box
    box["peak"] = int(m.peak)


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    if n < 1024**2:
        return f"{n / 1024:.0f} KiB"
    return f"{n / 1024**2:.1f} MiB"


def strip(x: Tensor, n: int | None = None, pad: int = 1) -> "np.ndarray":  # noqa: F821
    """Tile ``(B, 1, H, W)`` images in ``[-1, 1]`` side by side (white gaps) as a 2-D numpy array."""
    import numpy as np

    x = x.detach().float().clamp(-1, 1)[: n or x.shape[0], 0].cpu().numpy()
    b, h, w = x.shape
    out = np.ones((h, b * (w + pad) - pad), dtype=np.float32)
    for i in range(b):
        out[:, i * (w + pad): i * (w + pad) + w] = x[i]
    return out


def _figure(rows: int, cols: int, cell_w: float, cell_h: float):
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell_w + 1.8, rows * cell_h + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    return plt, fig, axes


def plot_solvers(path: Path, runs, ref_x: Tensor, ref_label: str, grid: str, map_nfe: int, n_show: int) -> None:
    """Left: RMSE against the reference vs the NFE actually used, per ODE solver (log-log; the trained
    bespoke solvers as single points). Right: the reference samples, then each solver's error map
    ``|x - x_ref|`` at ``map_nfe`` (one colour scale for all)."""
    import numpy as np

    ode = [r for r in runs if not r.stochastic and r.grid in (grid, "learned")]
    names = list(dict.fromkeys(r.name for r in ode))
    at = {r.name: r for r in ode if r.nfe_target == map_nfe}
    rows = [n for n in names if n in at]
    plt = _pyplot()
    fig = plt.figure(figsize=(6.5 + 0.42 * n_show, max(4.0, 0.55 * (len(rows) + 1) + 1.0)))
    outer = fig.add_gridspec(1, 2, width_ratios=[6.0, 0.42 * n_show], wspace=0.35)
    ax = fig.add_subplot(outer[0])
    markers = "osD^v<>phX*"
    for k, name in enumerate(names):
        pts = sorted((r.nfe, r.rmse) for r in ode if r.name == name)
        xs, ys = zip(*pts)
        style = "--" if any(r.grid == "learned" for r in ode if r.name == name) else "-"
        ax.plot(xs, ys, style, marker=markers[k % len(markers)], ms=5, lw=1.2, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xticks(sorted({r.nfe_target for r in ode}))  # the budgets (a solver may use one more)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE")
    ax.set_ylabel(f"RMSE vs {ref_label}")
    ax.set_title(f"error vs NFE, {grid} grid (ODE solvers)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    right = outer[1].subgridspec(len(rows) + 1, 1, hspace=0.25)
    kw = dict(cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    vmax = max((float((at[n].x - ref_x).abs().max()) for n in rows), default=1.0)
    a0 = fig.add_subplot(right[0])
    a0.imshow(strip(ref_x, n_show), **kw)
    a0.set_title(f"reference samples; error maps |x - ref| at NFE {map_nfe} (0 to {vmax:.2f})", fontsize=8)
    axes = [a0]
    for i, name in enumerate(rows, start=1):
        a = fig.add_subplot(right[i])
        err = (at[name].x - ref_x).abs()[:n_show, 0].detach().float().cpu().numpy()
        tiles = np.concatenate([np.pad(e, ((0, 0), (0, 1)), constant_values=np.nan) for e in err], axis=1)[:, :-1]
        a.imshow(tiles, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        a.set_ylabel(f"{name}\nRMSE {at[name].rmse:.3f}", rotation=0, ha="right", va="center", fontsize=7)
        axes.append(a)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_inverse(path: Path, tasks: dict, n_show: int) -> None:
    """``tasks[name] = {"truth": x, "degraded": (x, psnr), "classical": (label, x, psnr) or None,
    "methods": [(name, x, psnr), ...]}``; one column per task, rows: truth, degraded input, the
    classical baseline, then each method (marked where it does not beat the classical baseline)."""
    names = list(tasks)
    methods = list(dict.fromkeys(m[0] for t in tasks.values() for m in t["methods"]))
    rows = ["ground truth", "degraded input (A^+ y)", "classical baseline"] + methods
    plt, fig, axes = _figure(len(rows), len(names), cell_w=0.42 * n_show, cell_h=0.62)
    kw = dict(cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    for j, task in enumerate(names):
        t = tasks[task]
        axes[0, j].set_title(task, fontsize=10)
        axes[0, j].imshow(strip(t["truth"], n_show), **kw)
        axes[1, j].imshow(strip(t["degraded"][0], n_show), **kw)
        axes[1, j].set_xlabel(f"PSNR {t['degraded'][1]:.1f} dB", fontsize=7, labelpad=1)
        classical = t.get("classical")
        if classical is not None:
            axes[2, j].imshow(strip(classical[1], n_show), **kw)
            axes[2, j].set_xlabel(f"{classical[0].removeprefix('classical: ')}: PSNR {classical[2]:.1f} dB",
                                  fontsize=7, labelpad=1)
        got = {m[0]: m for m in t["methods"]}
        for i, m in enumerate(methods, start=3):
            if m in got:
                axes[i, j].imshow(strip(got[m][1], n_show), **kw)
                below = classical is not None and got[m][2] < classical[2]
                axes[i, j].set_xlabel(f"PSNR {got[m][2]:.1f} dB" + ("  (below classical)" if below else ""),
                                      fontsize=7, labelpad=1, color="firebrick" if below else "black")
    for i, r in enumerate(rows):
        axes[i, 0].set_ylabel(r, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Inverse problems on held-out digits\n(PSNR vs ground truth, mean over the batch)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def console_table(header: list[str], rows: list[list]) -> str:
    """A fixed-width plain-text table for the terminal."""
    cells = [header] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
