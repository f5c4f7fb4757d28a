import pytest
import torch

from adjointflow.grids import timesteps, validate_grid
from adjointflow.schedules import EDM, LinearFlow, VPCosine, VPLinear


@pytest.mark.parametrize("kind", ["uniform", "logsnr", "quadratic", "karras"])
@pytest.mark.parametrize("sch", [VPLinear(), VPCosine(), EDM()], ids=lambda s: type(s).__name__)
def test_grid_endpoints_and_monotone(kind, sch):
    g = timesteps(sch, 10, kind, t_start=0.9, t_end=0.01)
    assert g.dtype == torch.float64 and g.shape == (11,)
    assert float(g[0]) == 0.9 and float(g[-1]) == 0.01
    assert bool((g[1:] < g[:-1]).all())


def test_logsnr_grid_uniform_in_lambda():
    sch = VPLinear()
    g = timesteps(sch, 8, "logsnr")
    d = sch.log_snr(g).diff()
    assert torch.allclose(d, d[0].expand_as(d), rtol=1e-9)


def test_karras_grid_formula():
    sch = VPLinear()
    g = timesteps(sch, 6, "karras", t_start=1.0, t_end=1e-3)
    st = sch.sigma_tilde(g)
    s0, s1 = float(st[0]), float(st[-1])
    r = torch.linspace(0, 1, 7, dtype=torch.float64)
    ref = (s0 ** (1 / 7) + r * (s1 ** (1 / 7) - s0 ** (1 / 7))) ** 7
    assert torch.allclose(st, ref, rtol=1e-9)


def test_quadratic_grid():
    g = timesteps(VPLinear(), 4, "quadratic", t_start=1.0, t_end=0.04)
    assert torch.allclose(g, torch.linspace(1.0, 0.2, 5, dtype=torch.float64) ** 2)


def test_defaults_and_denoise_to_zero():
    g = timesteps(LinearFlow(), 4)  # flows default to a uniform grid from 1 to 1e-3
    assert torch.allclose(g, torch.linspace(1.0, 1e-3, 5, dtype=torch.float64))
    g0 = timesteps(VPLinear(), 4, denoise_to_zero=True)
    assert g0.shape == (6,) and float(g0[-1]) == 0.0


def test_grid_errors():
    with pytest.raises(ValueError, match="finite log-SNR"):
        timesteps(LinearFlow(), 4, "logsnr", t_start=1.0)
    with pytest.raises(ValueError, match="unknown grid kind"):
        timesteps(VPLinear(), 4, "cosine")
    with pytest.raises(ValueError, match="positive int"):
        timesteps(VPLinear(), 0)
    with pytest.raises(ValueError, match="outside"):
        timesteps(VPLinear(), 4, t_start=1.5)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        timesteps("vp", 4)


@pytest.mark.parametrize(
    "grid, err, match",
    [
        (torch.ones(2, 2) * 0.5, ValueError, "1-D"),
        ([0.5], ValueError, "at least two"),
        ([1.0, 0.5, 0.7], ValueError, "monotone"),
        ([1.0, 0.5, 0.5, 0.1], ValueError, "duplicate"),
        ([1.2, 0.5], ValueError, "outside"),
        ([1.0, float("nan")], ValueError, "NaN"),
        ("1,0", TypeError, "grid must be"),
    ],
)
def test_validate_grid_errors(grid, err, match):
    with pytest.raises(err, match=match):
        validate_grid(grid)


BAD_TAILS = [([0.5, 0.7], "monotone"), ([0.5, 0.5], "duplicate"), ([0.5, 1.2], "outside"), ([0.5, -0.1], "outside"),
             ([0.5, float("nan")], "NaN"), ([0.5, float("inf")], "NaN/Inf"), ([0.5, -float("inf")], "NaN/Inf")]


@pytest.mark.parametrize("length", [4, 70], ids=["short", "long"])  # a grid up to 64 times is tested on a list
@pytest.mark.parametrize("tail, match", BAD_TAILS, ids=[m + str(i) for i, (_, m) in enumerate(BAD_TAILS)])
def test_validate_grid_errors_short_and_long(tail, match, length):
    head = torch.linspace(1.0, 0.6, length - len(tail), dtype=torch.float64).tolist()
    with pytest.raises(ValueError, match=match):
        validate_grid(head + tail)
    good = validate_grid(head + [0.5, 0.1])
    assert good.shape == (length,)


def test_validate_grid_accepts_increasing():
    g = validate_grid([0.1, 0.5, 0.9])
    assert g.dtype == torch.float64
