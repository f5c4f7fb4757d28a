import pytest
import torch

from adjointflow import BrownianNoise


def test_increments_additive_and_antisymmetric():
    n = BrownianNoise((2, 3, 4), seed=3, dtype=torch.float64)
    assert torch.allclose(n(1.0, 0.6) + n(0.6, 0.1), n(1.0, 0.1), atol=1e-12)
    assert torch.equal(n(0.1, 0.6), -n(0.6, 0.1))
    assert n(0.3, 0.3).abs().max() == 0


def test_increment_variance():
    n = BrownianNoise((20000,), seed=0, dtype=torch.float64)
    w = n(0.75, 0.5)
    assert abs(float(w.var()) - 0.25) < 0.02 and abs(float(w.mean())) < 0.02


def test_dtype_and_errors():
    assert BrownianNoise((2,), dtype=torch.float32)(1.0, 0.5).dtype == torch.float32
    with pytest.raises(ValueError, match="defined on"):
        BrownianNoise((2,))(1.5, 0.5)
    with pytest.raises(ValueError, match="positive"):
        BrownianNoise((0, 2))
    with pytest.raises(TypeError, match="seed"):
        BrownianNoise((2,), seed=1.5)
    with pytest.raises(TypeError, match="dtype"):
        BrownianNoise((2,), dtype=torch.int64)
