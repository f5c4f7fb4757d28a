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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell_w + 1.8, rows * cell_h + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    return plt, fig, axes


def plot_solvers(path: Path, runs, ref_x: Tensor, ref_label: str, nfes, n_show: int, grid: str = "") -> None:
    """Rows: the dopri5 reference then each solver; columns: NFE budgets; each cell a strip of samples."""
    names = list(dict.fromkeys(r.name for r in runs))
    plt, fig, axes = _figure(len(names) + 1, len(nfes), cell_w=0.42 * n_show, cell_h=0.62)
    kw = dict(cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    for j, nfe in enumerate(nfes):
        axes[0, j].imshow(strip(ref_x, n_show), **kw)
        axes[0, j].set_title(f"NFE {nfe}", fontsize=10)
    axes[0, 0].set_ylabel(ref_label, rotation=0, ha="right", va="center", fontsize=8)
    by = {(r.name, r.nfe_target): r for r in runs}
    for i, name in enumerate(names, start=1):
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        for j, nfe in enumerate(nfes):
            r = by.get((name, nfe))
            if r is None:
                learned = any(q.name == name and q.grid == "learned" for q in runs)
                axes[i, j].text(0.5, 0.5, "trained for another NFE" if learned else "failed", ha="center",
                                va="center", fontsize=8)
                continue
            axes[i, j].imshow(strip(r.x, n_show), **kw)
            axes[i, j].set_xlabel(f"RMSE {r.rmse:.3f}  ({r.nfe} NFE)", fontsize=7, labelpad=1)
    fig.suptitle(f"Samples from the same latents and labels (0-9), {grid} grid; RMSE vs the row's reference "
                 "(ODE: dopri5; SDE: the same SDE solver with many steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_inverse(path: Path, tasks: dict, n_show: int) -> None:
    """``tasks[name] = {"truth": x, "degraded": (x, psnr), "methods": [(name, x, psnr), ...]}``;
    one column per task, rows: truth, degraded input, then each method."""
    names = list(tasks)
    methods = list(dict.fromkeys(m[0] for t in tasks.values() for m in t["methods"]))
    rows = ["ground truth", "degraded input"] + methods
    plt, fig, axes = _figure(len(rows), len(names), cell_w=0.42 * n_show, cell_h=0.62)
    kw = dict(cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    for j, task in enumerate(names):
        t = tasks[task]
        axes[0, j].set_title(task, fontsize=10)
        axes[0, j].imshow(strip(t["truth"], n_show), **kw)
        axes[1, j].imshow(strip(t["degraded"][0], n_show), **kw)
        axes[1, j].set_xlabel(f"PSNR {t['degraded'][1]:.1f} dB", fontsize=7, labelpad=1)
        got = {m[0]: m for m in t["methods"]}
        for i, m in enumerate(methods, start=2):
            if m in got:
                axes[i, j].imshow(strip(got[m][1], n_show), **kw)
                axes[i, j].set_xlabel(f"PSNR {got[m][2]:.1f} dB", fontsize=7, labelpad=1)
    for i, r in enumerate(rows):
        axes[i, 0].set_ylabel(r, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Inverse problems on held-out digits (PSNR vs ground truth, mean over the batch)", fontsize=10)
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
