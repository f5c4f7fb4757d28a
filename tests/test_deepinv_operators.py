"""deepinv physics as MeasurementLoss operators: the same loss, gradient, transpose and pseudo-inverse as
our own operators on the same mask / kernel, to float64 rounding. Optional: skipped without deepinv
(``make test-deepinv`` runs it in its own environment; see the README)."""
import math
import sys

import pytest
import torch

from adjointflow import Denoiser, LinearFlow
from adjointflow.guidance import DFlow, Downsample, GaussianBlur, Inpaint, MatrixOperator, MeasurementLoss, Operator
from adjointflow.integrations.deepinv_operators import DeepinvOperator
from adjointflow.testing import GaussianData

F64 = torch.float64


def _import_deepinv():
    try:
        import deepinv
    except ImportError:
        pytest.skip("deepinv is not installed (make test-deepinv)", allow_module_level=True)
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        # PyPI's torchvision is a CUDA build: over a CPU torch its C++ ops do not load and its import stops
        # registering a fake kernel for an op that was never defined. deepinv's physics use no torchvision
        # op; declaring the two schemas lets the import finish (the ops stay without kernels).
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _import_deepinv.lib = lib  # keep the definitions alive
        for m in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "deepinv")]:
            del sys.modules[m]
        import deepinv
    return deepinv


dinv = _import_deepinv()
SHAPE = (3, 16, 16)


def _same(ours, theirs, y_ours, y_theirs, sigma=0.1, seed=0):
    """Loss and gradient w.r.t. x of both MeasurementLosses agree to float64 rounding."""
    x = torch.randn(2, *SHAPE, dtype=F64, generator=torch.Generator().manual_seed(seed))
    out = []
    for op, y in ((ours, y_ours), (theirs, y_theirs)):
        xx = x.clone().requires_grad_(True)
        loss = MeasurementLoss(op, y, sigma=sigma)(xx)
        (g,) = torch.autograd.grad(loss.sum(), xx)
        out.append((loss.detach(), g))
    (l0, g0), (l1, g1) = out
    assert float(l0.min()) > 1.0 and float(g0.abs().max()) > 1.0  # not trivially zero
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-12)


def test_inpainting_equals_inpaint():
    mask = (torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.4).to(F64)
    physics = dinv.physics.Inpainting(img_size=SHAPE, mask=mask.expand(SHAPE).clone())
    ours, theirs = Inpaint(mask), DeepinvOperator(physics)
    assert theirs.linear
    truth = torch.randn(2, *SHAPE, dtype=F64, generator=torch.Generator().manual_seed(2))
    y = ours(truth)
    torch.testing.assert_close(theirs(truth), y, rtol=0, atol=0)
    _same(ours, theirs, y, y)
    torch.testing.assert_close(theirs.transpose(y), ours.transpose(y), rtol=1e-12, atol=0)
    torch.testing.assert_close(theirs.pinv(y), ours.pinv(y), rtol=1e-12, atol=0)


def test_downsampling_equals_our_operator():
    """deepinv's Downsampling with a 2x2 box filter is average pooling (our Downsample) up to where the
    box sits; with filter=None it is plain subsampling, compared with the same dense matrix."""
    physics = dinv.physics.Downsampling(img_size=SHAPE, factor=2, filter=None, device="cpu")
    n = 16 * 16
    rows = [(2 * i) * 16 + 2 * j for i in range(8) for j in range(8)]
    M = torch.zeros(64, n, dtype=F64)
    M[torch.arange(64), rows] = 1.0
    theirs = DeepinvOperator(physics)
    truth = torch.randn(2, *SHAPE, dtype=F64, generator=torch.Generator().manual_seed(3))
    ours = _PerChannel(MatrixOperator(M, input_shape=(16, 16)))
    y = theirs(truth)
    torch.testing.assert_close(ours(truth), y, rtol=0, atol=0)
    _same(ours, theirs, y, y)
    torch.testing.assert_close(theirs.transpose(y), ours.transpose(y), rtol=1e-12, atol=1e-15)
    # the box filter: same measurement as Downsample(2) up to a shift of the blocks
    box = DeepinvOperator(dinv.physics.Downsampling(img_size=SHAPE, factor=2, filter=torch.full((1, 1, 2, 2), 0.25,
                                                    dtype=F64), padding="circular", device="cpu"))
    yb, ya = box(truth), Downsample(2)(truth)
    shifted = [Downsample(2)(torch.roll(truth, (a, b), (-2, -1))) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    assert min(float((yb - s).abs().max()) for s in shifted) < 1e-12, float((yb - ya).abs().max())


class _PerChannel(Operator):
    """One dense 2-D operator applied to every channel of (batch, C, H, W)."""

    def __init__(self, op):
        self.op = op

    def _forward(self, x):
        b, c = x.shape[:2]
        return self.op(x.reshape(b * c, *x.shape[2:])).reshape(b, c, 8, 8)

    def transpose(self, y):
        b, c = y.shape[:2]
        return self.op.transpose(y.reshape(b * c, -1)).reshape(b, c, 16, 16)


def test_blur_fft_equals_gaussian_blur():
    sigma, size = 1.5, 7
    ours = GaussianBlur(sigma=sigma, size=size)
    r = size // 2
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=F64) / sigma) ** 2)
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]
    theirs = DeepinvOperator(dinv.physics.BlurFFT(img_size=SHAPE, filter=kernel, device="cpu"))
    truth = torch.randn(2, *SHAPE, dtype=F64, generator=torch.Generator().manual_seed(4))
    y = ours(truth)
    torch.testing.assert_close(theirs(truth), y, rtol=0, atol=1e-12)
    _same(ours, theirs, y, y)
    torch.testing.assert_close(theirs.transpose(y), ours.transpose(y), rtol=0, atol=1e-12)


def test_dflow_blend_initialisation_uses_a_dagger():
    """D-Flow's blend start (ODE inversion of A^+ y) is the same with deepinv's Inpainting and our Inpaint."""
    shape = (1, 4, 4)
    data = GaussianData(torch.zeros(*shape, dtype=F64), torch.ones(*shape, dtype=F64))
    den: Denoiser = data.denoiser(LinearFlow(), "velocity")
    mask = (torch.rand(*shape, generator=torch.Generator().manual_seed(5)) > 0.5).to(F64)
    truth = torch.randn(2, *shape, dtype=F64, generator=torch.Generator().manual_seed(6))
    z = torch.randn(2, *shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    method = DFlow(steps=4, blend=0.3)
    starts = []
    for op in (Inpaint(mask), DeepinvOperator(dinv.physics.Inpainting(img_size=shape, mask=mask.clone()))):
        starts.append(method.initial_latent(den, MeasurementLoss(op, Inpaint(mask)(truth), sigma=0.1), z))
    assert not torch.allclose(starts[0], z)  # the blend is active
    torch.testing.assert_close(starts[1], starts[0], rtol=1e-12, atol=1e-14)
    assert math.isfinite(float(starts[1].sum()))


def test_bad_physics_is_refused():
    with pytest.raises(TypeError, match="instance"):
        DeepinvOperator(dinv.physics.Inpainting)
    with pytest.raises(TypeError, match="method A"):
        DeepinvOperator(object())


def test_readme_deepinv_example_runs():
    """The README's deepinv example (a ```py block: make test does not run it) runs here."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Inverse problems with deepinv operators", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    exec(compile(code, "README.md[deepinv example]", "exec"), {"__name__": "readme"})
