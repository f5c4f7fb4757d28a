"""Measurement operators and losses: exact adjoints, pseudo-inverses, reference implementations,
gradients, and clear errors for bad shapes."""
import math

import pytest
import torch
import torch.nn.functional as F

from adjointflow.guidance import (Downsample, FourierMagnitude, GaussianBlur, Inpaint, MatrixOperator,
                                  MeasurementLoss)

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=D)


def linear_ops():
    mask = (torch.rand(3, 8, 8, generator=gen(1)) > 0.4).to(D)
    return [
        ("inpaint", Inpaint(mask), (2, 3, 8, 8)),
        ("inpaint_hw_mask", Inpaint(mask[0]), (2, 3, 8, 8)),
        ("downsample", Downsample(2), (2, 3, 8, 8)),
        ("downsample4_1d", Downsample(4, dims=1), (2, 3, 16)),
        ("blur", GaussianBlur(sigma=1.0, size=5, rcond=0.0), (2, 3, 8, 8)),
        ("blur_wide", GaussianBlur(sigma=2.0, size=7, rcond=0.0), (2, 1, 9, 12)),
        ("matrix", MatrixOperator(rand(5, 12, seed=3)), (2, 12)),
        ("matrix_shaped", MatrixOperator(rand(5, 12, seed=3), input_shape=(3, 4)), (2, 3, 4)),
    ]


@pytest.mark.parametrize("name,op,shape", linear_ops(), ids=[o[0] for o in linear_ops()])
def test_transpose_is_the_adjoint(name, op, shape):
    # <A x, y> = <x, A^T y> for random x, y; and A is linear
    x, x2 = rand(*shape, seed=4), rand(*shape, seed=5)
    ax = op(x)
    y = rand(*ax.shape, seed=6)
    lhs = (ax * y).sum(dim=tuple(range(1, ax.ndim)))
    aty = op.transpose(y)
    assert aty.shape == x.shape
    rhs = (x * aty).sum(dim=tuple(range(1, x.ndim)))
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op(2.0 * x - 3.0 * x2), 2.0 * ax - 3.0 * op(x2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,op,shape", linear_ops(), ids=[o[0] for o in linear_ops()])
def test_pinv_penrose_conditions(name, op, shape):
    # A A+ A = A and A+ A A+ = A+ (on random inputs); A A+ and A+ A symmetric (self-adjoint)
    x = rand(*shape, seed=7)
    ax = op(x)
    y = rand(*ax.shape, seed=8)
    torch.testing.assert_close(op(op.pinv(ax)), ax, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(op.pinv(op(op.pinv(y))), op.pinv(y), rtol=1e-9, atol=1e-9)
    y2 = rand(*ax.shape, seed=9)
    s = lambda a, b: (a * b).sum()
    torch.testing.assert_close(s(op(op.pinv(y)), y2), s(y, op(op.pinv(y2))), rtol=1e-9, atol=1e-9)
    x2 = rand(*shape, seed=10)
    torch.testing.assert_close(s(op.pinv(op(x)), x2), s(x, op.pinv(op(x2))), rtol=1e-9, atol=1e-9)


def test_matrix_pinv_equals_numpy_definition():
    M = rand(5, 12, seed=3)
    op = MatrixOperator(M)
    y = rand(4, 5, seed=1)
    torch.testing.assert_close(op.pinv(y), y @ torch.linalg.pinv(M).T)


def test_downsample_is_average_pooling_and_pinv_is_nearest_upsampling():
    x = rand(2, 3, 8, 6)
    op = Downsample(2)
    torch.testing.assert_close(op(x), F.avg_pool2d(x, 2))
    y = rand(2, 3, 4, 3)
    torch.testing.assert_close(op.pinv(y), F.interpolate(y, scale_factor=2, mode="nearest"))


def test_blur_equals_explicit_circular_convolution():
    sigma, size = 1.3, 5
    op = GaussianBlur(sigma=sigma, size=size)
    x = rand(2, 3, 9, 10)
    k1 = torch.exp(-0.5 * (torch.arange(-(size // 2), size // 2 + 1, dtype=D) / sigma) ** 2)
    k1 = k1 / k1.sum()
    k2 = (k1[:, None] * k1[None, :]).expand(3, 1, size, size)
    ref = F.conv2d(F.pad(x, (size // 2,) * 4, mode="circular"), k2, groups=3)
    torch.testing.assert_close(op(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op(torch.ones(1, 1, 9, 9, dtype=D)), torch.ones(1, 1, 9, 9, dtype=D))


def test_blur_pinv_truncates_small_frequencies():
    op = GaussianBlur(sigma=3.0, size=15, rcond=1e-2)
    K = op.transfer((16, 16))
    assert float(K.abs().min()) < 1e-2 * float(K.abs().max())  # some frequencies are truncated
    y = rand(1, 1, 16, 16)
    z = op.pinv(y)
    # the truncated pseudo-inverse never amplifies by more than 1/(rcond max|K|)
    assert float(z.norm()) <= float(y.norm()) / (1e-2 * float(K.abs().max())) + 1e-9
    # it is the exact pseudo-inverse of the operator with those frequencies removed
    keep = K.abs() > 1e-2 * K.abs().max()
    A_r = lambda v: torch.fft.ifft2(torch.fft.fft2(v) * K * keep).real
    x = rand(1, 1, 16, 16, seed=3)
    torch.testing.assert_close(A_r(op.pinv(A_r(x))), A_r(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op.pinv(A_r(op.pinv(y))), op.pinv(y), rtol=1e-10, atol=1e-10)


def test_fourier_magnitude_parseval_ambiguities_and_gradient():
    op = FourierMagnitude(oversample=2.0)
    x = rand(2, 1, 5, 6)
    y = op(x)
    assert y.shape == (2, 1, 10, 12)
    torch.testing.assert_close(y.pow(2).sum((1, 2, 3)), x.pow(2).sum((1, 2, 3)))
    torch.testing.assert_close(op(-x), y)  # the trivial sign ambiguity of phase retrieval
    torch.testing.assert_close(op(x.flip(-1).flip(-2)), y)  # ... and the flip (conjugate) ambiguity
    loss = MeasurementLoss(op, y[0], sigma=0.1)
    xg = rand(1, 1, 5, 6, seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: loss(v), (xg,), eps=1e-6, atol=1e-6)
    with pytest.raises(NotImplementedError, match="nonlinear"):
        op.transpose(y)
    with pytest.raises(NotImplementedError, match="nonlinear"):
        op.pinv(y)
    assert not op.linear and Inpaint(torch.ones(3)).linear


def test_fourier_magnitude_1d():
    op = FourierMagnitude(oversample=1.5, dims=1)
    x = rand(3, 8)
    assert op(x).shape == (3, 12)


def test_gaussian_loss_value_and_shared_measurement():
    op = MatrixOperator(rand(3, 4, seed=1))
    x = rand(5, 4, seed=2)
    y = rand(3, seed=3)
    L = MeasurementLoss(op, y, sigma=0.5)
    r = y - op(x)
    torch.testing.assert_close(L(x), (r**2).sum(1) / (2 * 0.25))
    torch.testing.assert_close(L.residual_norm(x), r.norm(dim=1))
    torch.testing.assert_close(L.residual(x), r)
    Lb = MeasurementLoss(op, y.expand(5, 3).clone(), sigma=0.5)
    torch.testing.assert_close(Lb(x), L(x))


def test_poisson_loss_is_heteroscedastic_gaussian():
    op = Inpaint(torch.ones(6))
    y = torch.tensor([0.0, 0.01, 0.5, 1.0, 2.0, 0.3], dtype=D)
    sigma = 0.05
    L = MeasurementLoss(op, y, sigma=sigma, noise="poisson")
    x = rand(2, 6).abs()
    var = sigma * torch.clamp(y, min=sigma)
    torch.testing.assert_close(L(x), ((y - x) ** 2 / (2 * var)).sum(1))


def test_poisson_noise_variance_matches_model():
    # the weights are the inverse variances of y = sigma Poisson(A x / sigma)
    sigma, ax = 0.02, torch.tensor([0.3, 1.0], dtype=D)
    ys = sigma * torch.poisson((ax / sigma).expand(200000, 2), generator=gen(0))
    torch.testing.assert_close(ys.var(0), sigma * ax, rtol=0.02, atol=0)


# --- errors ---------------------------------------------------------------------------------
def test_measurement_shape_mismatch_is_a_clear_error():
    L = MeasurementLoss(Downsample(2), rand(2, 3, 8, 8), sigma=0.1)  # y has the image's size, not A's
    with pytest.raises(ValueError, match=r"measurement y has shape \(2, 3, 8, 8\).*\(2, 3, 4, 4\)"):
        L(rand(2, 3, 8, 8))
    L = MeasurementLoss(MatrixOperator(rand(3, 4)), rand(4), sigma=0.1)
    with pytest.raises(ValueError, match="measurement y"):
        L(rand(2, 4))
    with pytest.raises(ValueError, match="expects samples of shape"):
        MatrixOperator(rand(3, 4))(rand(2, 5))
    with pytest.raises(ValueError, match="measurements have shape"):
        MatrixOperator(rand(3, 4)).transpose(rand(2, 4))


def test_mask_errors():
    with pytest.raises(ValueError, match=r"mask of shape \(7, 7\) does not fit samples of shape \(3, 8, 8\)"):
        Inpaint(torch.ones(7, 7))(rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="does not fit"):
        Inpaint(torch.ones(2, 3, 8, 8))(rand(2, 3, 8, 8))  # a batch-shaped mask is not one sample's shape
    with pytest.raises(ValueError, match="binary"):
        Inpaint(torch.full((8, 8), 0.5))
    with pytest.raises(TypeError, match="mask"):
        Inpaint()


def test_operator_argument_errors():
    with pytest.raises(ValueError, match="divisible"):
        Downsample(3)(rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="factor"):
        Downsample(0)
    with pytest.raises(ValueError, match="odd"):
        GaussianBlur(sigma=1.0, size=4)
    with pytest.raises(ValueError, match="sigma"):
        GaussianBlur(sigma=-1.0, size=5)
    with pytest.raises(ValueError, match=">= 9"):
        GaussianBlur(sigma=1.0, size=9)(rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="oversample"):
        FourierMagnitude(oversample=0.5)
    with pytest.raises(ValueError, match="last 2 dimension"):
        Downsample(2)(rand(4, 8))
    with pytest.raises(ValueError, match="columns"):
        MatrixOperator(rand(3, 4), input_shape=(5,))
    with pytest.raises(TypeError, match="floating"):
        Downsample(2)(torch.ones(1, 1, 4, 4, dtype=torch.int64))


def test_measurement_loss_argument_errors():
    op = Inpaint(torch.ones(4))
    with pytest.raises(ValueError, match="sigma"):
        MeasurementLoss(op, rand(4), sigma=0.0)
    with pytest.raises(ValueError, match="noise"):
        MeasurementLoss(op, rand(4), sigma=0.1, noise="laplace")
    with pytest.raises(ValueError, match="non-negative"):
        MeasurementLoss(op, -rand(4).abs(), sigma=0.1, noise="poisson")
    with pytest.raises(TypeError, match="instance"):
        MeasurementLoss(Inpaint, rand(4), sigma=0.1)
    with pytest.raises(TypeError, match="Operator"):
        MeasurementLoss(lambda x: x, rand(4), sigma=0.1)
    with pytest.raises(ValueError, match="NaN"):
        MeasurementLoss(op, torch.tensor([math.nan, 0, 0, 0], dtype=D), sigma=0.1)
    # 1/sigma^2 underflows / overflows: refused at construction, not a math error mid-run
    for sigma in (1e-300, 1e-160, 1e200):
        for noise in ("gaussian", "poisson"):
            with pytest.raises(ValueError, match="sigma.*out of range"):
                MeasurementLoss(op, rand(4).abs(), sigma=sigma, noise=noise)
    assert torch.isfinite(MeasurementLoss(op, rand(4), sigma=1e-150)(rand(1, 4))).all()
