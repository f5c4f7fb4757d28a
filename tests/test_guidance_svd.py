"""Closed-form operator SVDs ``A = U diag(s) V^T`` checked against the dense matrix of each operator
on small sizes: V orthogonal, U orthonormal on the singular directions, ``U^T A V = diag(s)``, and the
singular values equal the dense SVD's."""
import pytest
import torch

from adjointflow.guidance import Downsample, FourierMagnitude, GaussianBlur, Inpaint, MatrixOperator
from adjointflow.guidance.objectives import Operator

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def svd_ops():
    mask = (torch.rand(2, 6, 6, generator=gen(1)) > 0.4).to(D)
    return [
        ("inpaint", Inpaint(mask), (2, 6, 6)),
        ("inpaint_hw_mask", Inpaint(mask[0]), (2, 6, 6)),
        ("downsample2", Downsample(2), (2, 6, 4)),
        ("downsample3", Downsample(3), (1, 6, 3)),
        ("downsample2_1d", Downsample(2, dims=1), (3, 8)),
        ("downsample2_3d", Downsample(2, dims=3), (4, 2, 4)),
        ("blur", GaussianBlur(sigma=1.0, size=5), (1, 8, 8)),
        ("blur_odd_sizes", GaussianBlur(sigma=2.0, size=7), (2, 7, 9)),
        ("blur_1d", GaussianBlur(sigma=0.7, size=3, dims=1), (2, 10)),
        ("matrix_wide", MatrixOperator(torch.randn(5, 12, generator=gen(3), dtype=D)), (12,)),
        ("matrix_tall", MatrixOperator(torch.randn(7, 4, generator=gen(4), dtype=D), input_shape=(2, 2)), (2, 2)),
    ]


def dense(fn, shape):
    """Columns fn(e_j) for the standard basis of samples of ``shape``."""
    n = 1
    for s in shape:
        n *= s
    basis = torch.eye(n, dtype=D).reshape(n, *shape)
    return fn(basis).reshape(n, -1).T


@pytest.mark.parametrize("name,op,shape", svd_ops(), ids=[o[0] for o in svd_ops()])
def test_svd_matches_the_dense_matrix(name, op, shape):
    assert op.has_svd
    A = dense(op, shape)                                      # (m, n)
    x = torch.zeros(1, *shape, dtype=D)
    s = op.singular_values(x).reshape(-1)                     # (n,) spectral layout
    Vt = dense(op.svd_vt, shape)                              # (n, n): spectral <- image
    n = Vt.shape[0]
    assert s.numel() == n == A.shape[1]
    torch.testing.assert_close(Vt @ Vt.T, torch.eye(n, dtype=D), rtol=0, atol=1e-12)
    spec_shape = op.svd_vt(x).shape[1:]
    V = dense(op.svd_v, spec_shape)
    torch.testing.assert_close(V, Vt.T, rtol=0, atol=1e-12)  # svd_v is the inverse (= transpose)
    out_shape = op(x).shape[1:]
    Ut = dense(op.svd_ut, out_shape)                          # (n, m)
    U = dense(op.svd_u, spec_shape)                           # (m, n)
    on = s > 0
    # U^T A V = diag(s), U restricted to the singular directions is orthonormal and U^T U = I there
    torch.testing.assert_close(Ut @ A @ V, torch.diag(s), rtol=0, atol=1e-12)
    torch.testing.assert_close(U[:, on], Ut[on].T, rtol=0, atol=1e-12)
    torch.testing.assert_close(Ut[on] @ Ut[on].T, torch.eye(int(on.sum()), dtype=D), rtol=0, atol=1e-12)
    # A = U diag(s) V^T exactly, and the singular values are the dense SVD's
    torch.testing.assert_close(U @ torch.diag(s) @ Vt, A, rtol=0, atol=1e-12)
    ref = torch.linalg.svdvals(A)
    got = torch.sort(s, descending=True).values[: ref.numel()]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # batched calls act per sample
    xb = torch.randn(3, *shape, generator=gen(5), dtype=D)
    torch.testing.assert_close(op.svd_vt(xb).reshape(3, -1), xb.reshape(3, -1) @ Vt.T, rtol=0, atol=1e-12)


def test_operators_without_svd_say_which_have_one():
    for op in (FourierMagnitude(), Operator()):
        assert not op.has_svd
        with pytest.raises(NotImplementedError, match="Inpaint, Downsample, GaussianBlur, MatrixOperator"):
            op.svd_vt(torch.zeros(1, 4, 4, dtype=D))
