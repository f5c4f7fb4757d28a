"""Objectives for guidance: measurement operators, measurement losses, and plain callables.

An *objective* is anything callable as ``objective(x0) -> (batch,)`` loss (lower is better), where
``x0`` has the state's shape ``(batch, *dims)``; a reward ``r`` is used as the loss ``-r``.

Operators map one clean sample to a measurement, ``y = A(x0) + n``. Linear operators provide the
transpose ``A^T`` (the adjoint for the Euclidean inner product, exact) and a pseudo-inverse ``A^+``
(used e.g. for D-Flow's blend initialisation). :class:`MeasurementLoss` turns an operator and a
measurement into the negative log-likelihood of the noise model.

Operators with ``has_svd`` (:class:`Inpaint`, :class:`Downsample`, :class:`GaussianBlur`,
:class:`MatrixOperator`) also expose their singular value decomposition ``A = U diag(s) V^T`` in closed
form, without dense matrices (the SVD-based methods DDRM, PiGDM and DiffPIR work in that basis).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "Operator",
    "Inpaint",
    "Downsample",
    "GaussianBlur",
    "FourierMagnitude",
    "MatrixOperator",
    "MeasurementLoss",
]


def _check_x(x, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (batch, *dims) with at least one sample dimension, got {tuple(x.shape)}")


def _once(owner, key, make):
    """``make()`` the first time ``owner`` asks for ``key``, the cached value after: a constant cast to one dtype
    and device once, since building or copying it at every call would be a host-to-device copy per step, which
    synchronises on a GPU."""
    cache = owner.__dict__.setdefault("_consts", {})
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
    return value


class Operator:
    """A measurement operator ``A`` acting on batches ``(batch, *dims)``.

    ``A(x)`` returns ``(batch, *out_dims)``. Linear operators implement :meth:`transpose` (``A^T y``)
    and :meth:`pinv` (``A^+ y``); nonlinear ones raise ``NotImplementedError`` there.
    """

    linear: ClassVar[bool] = True

    def __call__(self, x: Tensor) -> Tensor:
        _check_x(x)
        self._check_input(x)
        return self._forward(x)

    def transpose(self, y: Tensor) -> Tensor:
        """``A^T y`` (adjoint of ``A`` under the Euclidean inner product)."""
        raise NotImplementedError(f"{type(self).__name__} is nonlinear: it has no transpose")

    def pinv(self, y: Tensor) -> Tensor:
        """Moore--Penrose pseudo-inverse ``A^+ y``."""
        raise NotImplementedError(f"{type(self).__name__} is nonlinear: it has no pseudo-inverse")

    # --- singular value decomposition A = U diag(s) V^T (operators with has_svd) ----------------
    # Spectral coefficients ``c`` of a batch ``x`` live in a fixed "spectral layout" (batch, *spec)
    # with as many entries per sample as ``x``: ``c = V^T x``, ``x = V c`` (V orthogonal). ``s`` holds the
    # singular values in the same layout (0 for directions ``A`` does not see), and ``U^T y`` is laid
    # out likewise, meaningful where ``s > 0``; so ``U^T A x = s * V^T x`` entrywise.
    has_svd: ClassVar[bool] = False

    def singular_values(self, x: Tensor) -> Tensor:
        """``s`` in the spectral layout of samples shaped like ``x`` (shape ``spec``, ``x``'s dtype)."""
        raise NotImplementedError(_no_svd(self))

    def svd_vt(self, x: Tensor) -> Tensor:
        """``V^T x``: image batch ``(batch, *dims)`` -> spectral coefficients ``(batch, *spec)``."""
        raise NotImplementedError(_no_svd(self))

    def svd_v(self, c: Tensor) -> Tensor:
        """``V c``: spectral coefficients -> image batch (the inverse of :meth:`svd_vt`)."""
        raise NotImplementedError(_no_svd(self))

    def svd_ut(self, y: Tensor) -> Tensor:
        """``U^T y``: measurements ``(batch, *out)`` -> spectral layout (zero where no singular value lives)."""
        raise NotImplementedError(_no_svd(self))

    def svd_u(self, c: Tensor) -> Tensor:
        """``U c``: the spectral entries that carry a singular value -> measurements ``(batch, *out)``."""
        raise NotImplementedError(_no_svd(self))

    def _const(self, key, make) -> Tensor:
        """A constant of this operator (mask, transfer function, SVD factors...) on one dtype and device, made
        on first use (:func:`_once`). Operators are immutable (they keep their own copies), so it never goes
        stale."""
        return _once(self, key, make)

    # subclasses
    def _check_input(self, x: Tensor) -> None:
        pass

    def _forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def svd_operator_names() -> tuple[str, ...]:
    """Names of the operator classes with a closed-form SVD (for error messages)."""
    return tuple(c.__name__ for c in (Inpaint, Downsample, GaussianBlur, MatrixOperator))


def _no_svd(op) -> str:
    return (f"{type(op).__name__} has no singular value decomposition; operators with one: "
            f"{', '.join(svd_operator_names())}")


def _spatial(x: Tensor, dims: int, who: str) -> tuple[int, ...]:
    if x.ndim < 1 + dims:
        raise ValueError(f"{who} acts on the last {dims} dimension(s) of (batch, ..., *spatial); got shape {tuple(x.shape)}")
    return tuple(x.shape[-dims:])


def _check_dims(dims) -> None:
    if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
        raise ValueError(f"dims (number of trailing spatial dimensions) must be a positive int, got {dims!r}")


# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Inpaint(Operator):
    """Inpainting: ``A(x) = m * x`` with a binary ``mask`` (1 = observed).

    ``mask`` has one sample's shape or a shape that broadcasts to it from the right (e.g. ``(H, W)``
    for ``(C, H, W)`` images). ``A`` is an orthogonal projection, so ``A^T = A^+ = A``. The
    measurement keeps the image's shape (zeros where unobserved).
    """

    mask: Tensor = None

    def __post_init__(self):
        m = self.mask
        if m is None:
            raise TypeError("Inpaint needs a mask tensor (1 = observed, 0 = missing)")
        if not isinstance(m, Tensor):
            m = torch.as_tensor(m)
        if m.ndim == 0:
            raise ValueError("mask must have at least one dimension (one sample's shape)")
        mf = m.detach().to(torch.float64, copy=True)  # its own copy: constants made from it are cached
        if not bool(((mf == 0) | (mf == 1)).all()):
            raise ValueError("mask must be binary (0 = missing, 1 = observed)")
        object.__setattr__(self, "mask", mf)

    def _check_input(self, x):
        sample = tuple(x.shape[1:])
        try:
            fits = self.mask.ndim <= len(sample) and torch.broadcast_shapes(self.mask.shape, sample) == sample
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"mask of shape {tuple(self.mask.shape)} does not fit samples of shape {sample}; "
                "give the mask one sample's shape (or trailing dimensions of it)"
            )

    def _m(self, x):
        return self._const(("mask", x.dtype, x.device), lambda: self.mask.to(dtype=x.dtype, device=x.device))

    def _forward(self, x):
        return self._m(x) * x

    def transpose(self, y):
        _check_x(y, "y")
        self._check_input(y)
        return self._m(y) * y

    pinv = transpose

    # A = diag(m): U = V = I, s = m (broadcast to one sample's shape)
    has_svd: ClassVar[bool] = True

    def singular_values(self, x):
        self._check_input(x)
        return self._m(x).expand(x.shape[1:])

    def svd_vt(self, x):
        return x

    svd_v = svd_vt

    def svd_ut(self, y):
        return self.transpose(y)

    svd_u = svd_ut


# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Downsample(Operator):
    """Super-resolution: average pooling by ``factor`` over the last ``dims`` dimensions.

    ``A(x)_k = f^{-dims} sum_{j in block k} x_j``. ``A A^T = f^{-dims} I``, so ``A^T y`` spreads each
    value evenly over its block and ``A^+ y = f^dims A^T y`` is nearest-neighbour upsampling.
    """

    factor: int = 2
    dims: int = 2

    def __post_init__(self):
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(f"factor must be a positive int, got {self.factor!r}")
        _check_dims(self.dims)

    def _check_input(self, x):
        sp = _spatial(x, self.dims, "Downsample")
        if any(s % self.factor for s in sp):
            raise ValueError(f"Downsample(factor={self.factor}) needs spatial sizes divisible by {self.factor}, got {sp}")

    def _forward(self, x):
        f, d = self.factor, self.dims
        lead = x.shape[:-d]
        shape = list(lead)
        for s in x.shape[-d:]:
            shape += [s // f, f]
        xb = x.reshape(shape)
        return xb.mean(dim=tuple(len(lead) + 2 * k + 1 for k in range(d)))

    def transpose(self, y):
        _check_x(y, "y")
        _spatial(y, self.dims, "Downsample.transpose")
        out = y
        for k in range(self.dims):
            out = out.repeat_interleave(self.factor, dim=y.ndim - self.dims + k)
        return out / self.factor**self.dims

    def pinv(self, y):
        return self.transpose(y) * self.factor**self.dims

    # Per block of n = f^d pixels, A is the row 1^T / n = f^{-d/2} h^T with h = 1 / sqrt(n): s = f^{-d/2},
    # U = 1, and V^T = H, the Householder reflection that maps e_1 to h (symmetric, orthogonal, first
    # row h^T). Spectral layout: (batch, *lead, *coarse, n), the block mean direction at index 0.
    has_svd: ClassVar[bool] = True

    def _householder(self, like: Tensor) -> Tensor:
        return self._const(("H", like.dtype, like.device), lambda: self._make_householder(like))

    def _make_householder(self, like: Tensor) -> Tensor:
        n = self.factor**self.dims
        h = torch.full((n,), n**-0.5, dtype=torch.float64)
        w = h.clone()
        w[0] -= 1.0
        H = torch.eye(n, dtype=torch.float64)
        if n > 1:  # w.w = 2 - 2/sqrt(n): zero only for n = 1, where H = I
            H = H - 2.0 * torch.outer(w, w) / (w @ w)
        return H.to(dtype=like.dtype, device=like.device)

    def _blocks(self, x: Tensor) -> Tensor:
        """(batch, *lead, *spatial) -> (batch, *lead, *coarse, n): each block's pixels, row-major."""
        f, d = self.factor, self.dims
        lead = x.ndim - d
        shape = list(x.shape[:lead])
        for s in x.shape[lead:]:
            shape += [s // f, f]
        xb = x.reshape(shape)
        coarse = [lead + 2 * k for k in range(d)]
        fine = [lead + 2 * k + 1 for k in range(d)]
        xb = xb.permute(*range(lead), *coarse, *fine)
        return xb.reshape(*xb.shape[: lead + d], f**d)

    def _unblocks(self, c: Tensor) -> Tensor:
        f, d = self.factor, self.dims
        lead = c.ndim - 1 - d
        coarse = c.shape[lead:lead + d]
        xb = c.reshape(*c.shape[:lead], *coarse, *([f] * d))
        order = list(range(lead))
        for k in range(d):
            order += [lead + k, lead + d + k]
        xb = xb.permute(*order)
        return xb.reshape(*c.shape[:lead], *(s * f for s in coarse))

    def singular_values(self, x):
        _check_x(x)
        self._check_input(x)
        s = torch.zeros(self._blocks(x[:1]).shape[1:], dtype=x.dtype, device=x.device)
        s[..., 0] = self.factor ** (-self.dims / 2)
        return s

    def svd_vt(self, x):
        _check_x(x)
        self._check_input(x)
        return self._blocks(x) @ self._householder(x).T

    def svd_v(self, c):
        _check_x(c, "c")
        return self._unblocks(c @ self._householder(c))

    def svd_ut(self, y):
        _check_x(y, "y")
        _spatial(y, self.dims, "Downsample.svd_ut")
        out = y.new_zeros(*y.shape, self.factor**self.dims)
        out[..., 0] = y
        return out

    def svd_u(self, c):
        _check_x(c, "c")
        return c[..., 0]


# ------------------------------------------------------------------------------------------
def _gauss_1d(sigma: float, size: int, n: int, dtype, device) -> Tensor:
    r = size // 2
    k = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (k / sigma) ** 2)
    g = g / g.sum()
    full = torch.zeros(n, dtype=torch.float64)
    full.index_add_(0, k.long() % n, g)  # centred at index 0: circular convolution without a shift
    return torch.fft.fft(full).real.to(dtype=dtype, device=device)


@dataclass(frozen=True)
class GaussianBlur(Operator):
    """Gaussian deblurring: circular convolution with a normalised ``size``-tap Gaussian of std ``sigma``
    (in pixels) over the last ``dims`` dimensions, computed exactly with the FFT.

    ``A = F^{-1} diag(K) F`` with ``K`` the (real: the kernel is symmetric) transfer function, so
    ``A^T = A`` and ``A^+ = F^{-1} diag(K^+) F`` with ``K^+ = 1/K`` where ``|K| > rcond max|K|``
    and 0 elsewhere (the truncated pseudo-inverse, as ``numpy.linalg.pinv(rcond)``). Circular
    boundaries keep ``A^T`` and ``A^+`` exact (DPS's code uses reflect padding instead).
    """

    sigma: float = 3.0
    size: int = 61
    dims: int = 2
    rcond: float = 1e-3

    def __post_init__(self):
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a positive number of pixels, got {self.sigma!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1 or self.size % 2 == 0:
            raise ValueError(f"size must be a positive odd int, got {self.size!r}")
        _check_dims(self.dims)
        if not (0 <= self.rcond < 1):
            raise ValueError(f"rcond must be in [0, 1), got {self.rcond!r}")

    def _check_input(self, x):
        sp = _spatial(x, self.dims, "GaussianBlur")
        if any(s < self.size for s in sp):
            raise ValueError(f"GaussianBlur(size={self.size}) needs spatial sizes >= {self.size}, got {sp}")

    def transfer(self, spatial: tuple[int, ...], dtype=torch.float64, device=None) -> Tensor:
        """The transfer function ``K`` on the FFT grid of ``spatial`` (real, separable)."""
        spatial = tuple(spatial)
        return self._const(("K", spatial, dtype, torch.device(device) if device is not None else None),
                           lambda: self._make_transfer(spatial, dtype, device))

    def _make_transfer(self, spatial, dtype, device) -> Tensor:
        K = None
        for k, n in enumerate(spatial):
            g = _gauss_1d(float(self.sigma), self.size, n, dtype, device)
            g = g.reshape([-1 if j == k else 1 for j in range(len(spatial))])
            K = g if K is None else K * g
        return K

    def _apply(self, x, K):
        d = tuple(range(x.ndim - self.dims, x.ndim))
        return torch.fft.ifftn(torch.fft.fftn(x, dim=d) * K, dim=d).real

    def _forward(self, x):
        return self._apply(x, self.transfer(tuple(x.shape[-self.dims:]), x.dtype, x.device))

    def transpose(self, y):
        _check_x(y, "y")
        return self(y)

    def pinv(self, y):
        _check_x(y, "y")
        self._check_input(y)
        K = self.transfer(tuple(y.shape[-self.dims:]), y.dtype, y.device)
        keep = K.abs() > self.rcond * K.abs().max()
        Kp = torch.where(keep, 1.0 / torch.where(keep, K, torch.ones_like(K)), torch.zeros_like(K))
        return self._apply(y, Kp)

    # The kernel is even on the circle, so the orthonormal discrete Hartley transform H (real, symmetric,
    # H^2 = I; separable over the spatial dimensions) diagonalises A: A = H diag(K) H. Real SVD:
    # V = H, s = |K|, U = H diag(sign K). The spectral layout is the image's.
    has_svd: ClassVar[bool] = True

    def hartley(self, x: Tensor) -> Tensor:
        """Orthonormal separable discrete Hartley transform over the last ``dims`` dimensions
        (``Re F - Im F`` per dimension, ``F`` the unitary DFT); its own inverse."""
        for k in range(x.ndim - self.dims, x.ndim):
            f = torch.fft.fft(x, dim=k, norm="ortho")
            x = f.real - f.imag
        return x

    def _sign(self, like: Tensor) -> Tensor:
        K = self.transfer(tuple(like.shape[-self.dims:]), like.dtype, like.device)
        return torch.where(K < 0, -torch.ones_like(K), torch.ones_like(K))

    def singular_values(self, x):
        _check_x(x)
        self._check_input(x)
        K = self.transfer(tuple(x.shape[-self.dims:]), x.dtype, x.device).abs()
        return K.expand(x.shape[1:])

    def svd_vt(self, x):
        _check_x(x)
        self._check_input(x)
        return self.hartley(x)

    svd_v = svd_vt

    def svd_ut(self, y):
        _check_x(y, "y")
        self._check_input(y)
        return self._sign(y) * self.hartley(y)

    def svd_u(self, c):
        _check_x(c, "c")
        self._check_input(c)
        return self.hartley(self._sign(c) * c)


# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FourierMagnitude(Operator):
    """Phase retrieval: ``A(x) = |F(P x)|``, the magnitude of the orthonormal DFT of ``x`` zero-padded
    to ``ceil(oversample * n)`` per spatial dimension (Fienup 1982; DPS's nonlinear task, which uses
    oversampling 2). Nonlinear: no transpose or pseudo-inverse. The orthonormal DFT keeps
    ``||A(x)|| = ||x||`` (Parseval). At ``F(P x) = 0`` the gradient of ``|.|`` is taken as 0.
    """

    oversample: float = 2.0
    dims: int = 2
    linear: ClassVar[bool] = False

    def __post_init__(self):
        if not (isinstance(self.oversample, (int, float)) and math.isfinite(self.oversample) and self.oversample >= 1):
            raise ValueError(f"oversample must be a number >= 1, got {self.oversample!r}")
        _check_dims(self.dims)

    def _check_input(self, x):
        _spatial(x, self.dims, "FourierMagnitude")

    def _forward(self, x):
        d = tuple(range(x.ndim - self.dims, x.ndim))
        s = [math.ceil(self.oversample * n) for n in x.shape[-self.dims:]]
        return torch.fft.fftn(x, s=s, dim=d, norm="ortho").abs()


# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MatrixOperator(Operator):
    """A dense linear operator ``A(x) = M vec(x)`` for samples of shape ``input_shape``
    (default ``(n,)`` with ``n = M.shape[1]``); the measurement has shape ``(batch, m)``.
    ``A^T y = M^T y`` reshaped to ``input_shape``; ``A^+ = pinv(M)`` (SVD)."""

    matrix: Tensor = None
    input_shape: tuple | None = None
    _pinv: Tensor = field(default=None, init=False, repr=False)
    _svd: tuple = field(default=None, init=False, repr=False)

    def __post_init__(self):
        M = self.matrix
        if M is None:
            raise TypeError("MatrixOperator needs a 2-D matrix")
        M = torch.as_tensor(M).detach().clone()  # its own copy: the casts of it are cached
        if M.ndim != 2 or not M.is_floating_point():
            raise ValueError(f"matrix must be a 2-D floating tensor, got shape {tuple(M.shape)}, dtype {M.dtype}")
        shape = (M.shape[1],) if self.input_shape is None else tuple(int(s) for s in self.input_shape)
        if math.prod(shape) != M.shape[1]:
            raise ValueError(f"input_shape {shape} has {math.prod(shape)} entries but the matrix has {M.shape[1]} columns")
        object.__setattr__(self, "matrix", M)
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "_pinv", torch.linalg.pinv(M.to(torch.float64)))
        U, S, Vh = torch.linalg.svd(M.to(torch.float64), full_matrices=True)
        object.__setattr__(self, "_svd", (U, S, Vh))

    def _check_input(self, x):
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"MatrixOperator expects samples of shape {self.input_shape}, got {tuple(x.shape[1:])}")

    def _matrix(self, like):
        return self._const(("M", like.dtype, like.device), lambda: self.matrix.to(dtype=like.dtype, device=like.device))

    def _forward(self, x):
        return x.reshape(x.shape[0], -1) @ self._matrix(x).T

    def _check_y(self, y):
        _check_x(y, "y")
        if tuple(y.shape[1:]) != (self.matrix.shape[0],):
            raise ValueError(f"MatrixOperator measurements have shape (batch, {self.matrix.shape[0]}), got {tuple(y.shape)}")

    def transpose(self, y):
        self._check_y(y)
        return (y @ self._matrix(y)).reshape(y.shape[0], *self.input_shape)

    def pinv(self, y):
        self._check_y(y)
        pinv = self._const(("pinv", y.dtype, y.device), lambda: self._pinv.to(dtype=y.dtype, device=y.device))
        return (y @ pinv.T).reshape(y.shape[0], *self.input_shape)

    # the dense SVD M = U diag(S) V^T; spectral layout (n,), singular values first, zero-padded
    has_svd: ClassVar[bool] = True

    def _factors(self, like):
        return self._const(("svd", like.dtype, like.device),
                           lambda: tuple(a.to(dtype=like.dtype, device=like.device) for a in self._svd))

    def singular_values(self, x):
        _check_x(x)
        self._check_input(x)
        S = self._factors(x)[1]
        return torch.cat([S, S.new_zeros(self.matrix.shape[1] - S.numel())])

    def svd_vt(self, x):
        _check_x(x)
        self._check_input(x)
        return x.reshape(x.shape[0], -1) @ self._factors(x)[2].T

    def svd_v(self, c):
        _check_x(c, "c")
        return (c @ self._factors(c)[2]).reshape(c.shape[0], *self.input_shape)

    def svd_ut(self, y):
        self._check_y(y)
        U, S, _ = self._factors(y)
        c = (y @ U)[:, :S.numel()]
        return torch.cat([c, c.new_zeros(c.shape[0], self.matrix.shape[1] - S.numel())], dim=1)

    def svd_u(self, c):
        _check_x(c, "c")
        U, S, _ = self._factors(c)
        k = S.numel()
        return c[:, :k] @ U[:, :k].T


# ------------------------------------------------------------------------------------------
NOISE_MODELS = ("gaussian", "poisson")


class MeasurementLoss:
    """Negative log-likelihood of ``y`` given ``x0`` (up to a constant), per sample:

    * ``noise="gaussian"``: ``y = A(x0) + sigma n``, ``L = ||y - A(x0)||^2 / (2 sigma^2)``.
    * ``noise="poisson"``: ``y = sigma Poisson(A(x0)/sigma)`` (``sigma`` = one count, e.g. 1/255),
      with the heteroscedastic Gaussian surrogate DPS uses for Poisson noise (Chung et al. 2023,
      Sec. 3.2, ``||y - A x||^2_Lambda``): ``Var[y_j] ~ sigma max(y_j, sigma)``, so
      ``L = sum_j (y_j - A(x0)_j)^2 / (2 sigma max(y_j, sigma))``. Needs ``y >= 0``.

    ``y`` has the operator's output shape, either per sample ``(batch, *out)`` or shared ``(*out)``.
    :meth:`residual_norm` is the noise-weighted residual norm in measurement units
    (``||y - A(x0)||`` for Gaussian noise), the quantity DPS's step-size rule normalises by.
    """

    def __init__(self, operator: Operator, y: Tensor, sigma: float, noise: str = "gaussian"):
        if not isinstance(operator, Operator):
            if isinstance(operator, type) and issubclass(operator, Operator):
                raise TypeError(f"operator must be an instance, e.g. {operator.__name__}(...), not the class")
            raise TypeError(f"operator must be an adjointflow.guidance Operator, got {type(operator).__name__}")
        if not isinstance(y, Tensor) or not y.is_floating_point():
            raise TypeError(f"y must be a floating-point tensor, got {type(y).__name__}")
        if not bool(torch.isfinite(y).all()):
            raise ValueError("y contains NaN/Inf")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        # the weight 1/sigma^2 must be a finite, non-zero float64 (1e-300 squared underflows to 0)
        if not 1e-150 <= sigma <= 1e150:
            raise ValueError(f"sigma={sigma!r} is out of range: 1/sigma^2 must be a finite, non-zero float64 "
                             "(sigma between 1e-150 and 1e150)")
        if noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
        if noise == "poisson" and bool((y < 0).any()):
            raise ValueError("Poisson measurements must be non-negative")
        # its own copy of y, cast per dtype/device once (a copy per step would synchronise on a GPU)
        self.operator, self.y, self.sigma, self.noise = operator, y.detach().clone(), float(sigma), noise

    def __repr__(self):
        return f"MeasurementLoss({self.operator!r}, y.shape={tuple(self.y.shape)}, sigma={self.sigma}, noise={self.noise!r})"

    def _y_like(self, ax: Tensor) -> Tensor:
        y = _once(self, ("y", ax.dtype, ax.device), lambda: self.y.to(dtype=ax.dtype, device=ax.device))
        if tuple(y.shape) == tuple(ax.shape):
            return y
        if tuple(y.shape) == tuple(ax.shape[1:]):
            return y.expand_as(ax)
        raise ValueError(
            f"measurement y has shape {tuple(self.y.shape)} but {type(self.operator).__name__} maps these samples to "
            f"shape {tuple(ax.shape)} (per sample {tuple(ax.shape[1:])}); give y shape (batch, *out) or (*out)"
        )

    def residual(self, x0: Tensor) -> Tensor:
        """``y - A(x0)``."""
        ax = self.operator(x0)
        return self._y_like(ax) - ax

    def _weights(self, y: Tensor) -> Tensor | float:
        if self.noise == "gaussian":
            return 1.0 / self.sigma**2
        return 1.0 / (self.sigma * torch.clamp(y, min=self.sigma))

    def __call__(self, x0: Tensor) -> Tensor:
        ax = self.operator(x0)
        y = self._y_like(ax)
        r = y - ax
        return 0.5 * (self._weights(y) * r * r).reshape(r.shape[0], -1).sum(1)

    def noise_floor(self, x0: Tensor) -> Tensor:
        """``(batch,)`` float64: the expected loss at the true signal, ``E[L(x_true)]``, given ``y``.

        Gaussian noise and an operator with an SVD: ``r/2 + ||(I - P) y||^2 / (2 sigma^2)`` with ``r``
        the rank of ``A`` and ``P`` the projection onto its range: the measurements ``A`` sees carry
        noise of expected loss ``r/2``, and the part of ``y`` outside the range is the same for every
        image (for noise in every entry of ``y`` this is ``m/2`` on average; with ``Inpaint`` and
        noise-free zeros where unobserved, half the observed count). Otherwise ``m/2`` for ``m``
        entries per measurement (approximate for the Poisson surrogate). Fitting below it explains
        noise: guidance stops there by the discrepancy principle."""
        ax = self.operator(x0)
        y = self._y_like(ax).detach()
        b = x0.shape[0]
        op = self.operator
        if self.noise != "gaussian" or not op.has_svd:
            return torch.full((b,), 0.5 * y[0].numel(), dtype=torch.float64)
        seen = op.singular_values(x0) != 0
        rank = int(seen.sum())
        in_range = (op.svd_ut(y).double() * seen).reshape(b, -1).pow(2).sum(1)
        outside = (y.double().reshape(b, -1).pow(2).sum(1) - in_range).clamp_min(0.0)
        return (0.5 * rank + 0.5 * outside / self.sigma**2).cpu()

    @property
    def step_scale(self) -> float:
        """The factor that makes a gradient step dimensionless: ``sigma^2`` for Gaussian noise (so
        ``step_scale * grad L = A^T (A x - y)``), ``sigma * max(mean(y), sigma)`` for the Poisson
        surrogate (its typical weight ``1/(sigma y)``). Guidance methods' SGD steps are
        ``lr * step_scale * grad L``."""
        if self.noise == "gaussian":
            return self.sigma**2
        return self.sigma * max(float(self.y.double().mean()), self.sigma)

    def residual_norm(self, x0: Tensor) -> Tensor:
        """``sigma sqrt(2 L(x0))``: ``||y - A(x0)||`` for Gaussian noise, its noise-weighted
        analogue for Poisson. Its gradient is taken as 0 where the residual vanishes."""
        L = self(x0)
        return self.sigma * torch.sqrt(2.0 * L.clamp_min(torch.finfo(L.dtype).tiny))
