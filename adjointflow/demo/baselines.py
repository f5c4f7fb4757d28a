"""Classical, model-free answers to the demo's inverse problems: what guidance has to beat.

* Inpainting: the harmonic fill -- the missing pixels solve Laplace's equation ``Delta x = 0`` with the
  observed pixels as boundary values (the smoothest interpolant; Bertalmio et al. 2000's starting point).
* Super-resolution: bicubic upsampling of the low-resolution measurement (Keys 1981, ``a = -0.75`` as in
  ``torch.nn.functional.interpolate``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["harmonic_fill", "bicubic_upsample", "classical_estimate"]


def harmonic_fill(y: Tensor, mask: Tensor, tol: float = 1e-7, max_sweeps: int = 20000) -> Tensor:
    """Fill the pixels where ``mask == 0`` of images ``y`` ``(batch, C, H, W)`` with the discrete harmonic
    interpolant of the observed ones (5-point Laplacian, reflecting borders): each missing pixel is the
    mean of its four neighbours. Solved by Jacobi sweeps in float64 until the update is below ``tol``;
    observed pixels are kept as measured. ``mask`` broadcasts to one image ``(C, H, W)``."""
    if y.ndim != 4:
        raise ValueError(f"y must have shape (batch, C, H, W), got {tuple(y.shape)}")
    m = torch.broadcast_to(mask.to(torch.float64), y.shape[1:]).bool()
    obs = y.double()
    x = torch.where(m, obs, obs[:, m].mean() if bool(m.any()) else torch.zeros((), dtype=torch.float64))
    for _ in range(max_sweeps):
        p = F.pad(x, (1, 1, 1, 1), mode="replicate")
        avg = 0.25 * (p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:])
        new = torch.where(m, obs, avg)
        done = float((new - x).abs().max()) < tol
        x = new
        if done:
            break
    return x.to(y.dtype)


def bicubic_upsample(y: Tensor, factor: int) -> Tensor:
    """Bicubic upsampling of ``(batch, C, h, w)`` by ``factor`` (pixel centres aligned as in average
    pooling: ``align_corners=False``)."""
    return F.interpolate(y, scale_factor=factor, mode="bicubic", align_corners=False)


def classical_estimate(operator, y: Tensor) -> tuple[str, Tensor] | None:
    """``(label, estimate)`` of the classical baseline for the demo's operators (``Inpaint``:
    harmonic fill; ``Downsample``: bicubic), or ``None`` for other operators."""
    from ..guidance import Downsample, Inpaint

    if isinstance(operator, Inpaint):
        return "classical: harmonic fill", harmonic_fill(y, operator.mask)
    if isinstance(operator, Downsample) and operator.dims == 2:
        return "classical: bicubic", bicubic_upsample(y, operator.factor)
    return None
