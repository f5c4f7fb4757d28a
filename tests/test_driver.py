import pytest
import torch

import adjointflow as af
from adjointflow import Denoiser, Euler, EulerMaruyama, Heun, NonFiniteError, VPLinear, solve, timesteps
from adjointflow.testing import GaussianData


@pytest.fixture
def setup():
    sch = VPLinear()
    data = GaussianData(torch.linspace(-1, 1, 4, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64))
    return sch, data, data.denoiser(sch, "eps")


def test_solution_fields(setup):
    sch, data, den = setup
    x = torch.randn(3, 4, dtype=torch.float64)
    g = timesteps(sch, 10)
    sol = solve(den, x, g, Heun(), save_trajectory=True)
    assert sol.nfe == 20 and sol.trajectory.shape == (11, 3, 4)
    assert torch.equal(sol.trajectory[0], x) and torch.equal(sol.trajectory[-1], sol.x)
    assert torch.equal(sol.grid, g)
    assert sol.x.dtype == torch.float64
    assert solve(den, x, g, Euler()).trajectory is None
    # the convenience method is the same call
    assert torch.equal(Heun().solve(den, x, g).x, sol.x)


def test_heun_final_step_to_zero_falls_back_to_euler(setup):
    sch, data, den = setup
    g = timesteps(sch, 5, denoise_to_zero=True)
    sol = solve(den, torch.randn(2, 4, dtype=torch.float64), g, Heun())
    assert sol.nfe == 2 * 5 + 1 and bool(torch.isfinite(sol.x).all())


def test_inversion_round_trip(setup):
    # An increasing grid integrates the PF-ODE back to noise; Heun with many steps inverts to O(h^2).
    sch, data, den = setup
    x1 = torch.randn(3, 4, dtype=torch.float64)
    g = timesteps(sch, 200)
    x0 = solve(den, x1, g, Heun()).x
    back = solve(den, x0, g.flip(0), Heun()).x
    assert (back - x1).abs().max() < 1e-3
    exact = data.flow_map(sch, x0, g[-1], g[0])
    assert (back - exact).abs().max() < 1e-3


def test_batch_invariance_and_determinism(setup):
    sch, data, den = setup
    x = torch.randn(5, 4, dtype=torch.float64)
    g = timesteps(sch, 7)
    full = solve(den, x, g, Heun()).x
    for i in range(5):
        assert torch.equal(solve(den, x[i : i + 1], g, Heun()).x[0], full[i])
    assert torch.equal(solve(den, x, g, Heun()).x, full)


def test_float32_close_to_float64(setup):
    sch, data, den = setup
    x = torch.randn(3, 4, dtype=torch.float64)
    g = timesteps(sch, 20)
    ref = solve(den, x, g, Heun()).x
    data32 = GaussianData(data.mean.detach().float(), data.std.detach().float())
    out = solve(data32.denoiser(sch, "eps"), x.float(), g, Heun()).x
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-4


def test_callback_sees_steps_and_can_replace_state(setup):
    sch, data, den = setup
    seen = []

    def cb(info):
        seen.append((info.i, float(info.t), float(info.t_next)))
        return torch.zeros_like(info.x_next) if info.i == 2 else None

    g = timesteps(sch, 4)
    sol = solve(den, torch.randn(2, 4, dtype=torch.float64), g, Euler(), callback=cb, save_trajectory=True)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert torch.equal(sol.trajectory[3], torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="callback"):
        solve(den, torch.randn(2, 4, dtype=torch.float64), g, Euler(), callback=lambda i: torch.zeros(3))


def test_backprop_gradient_matches_exact_map(setup):
    # Plain autograd through solve: gradient of a Heun solve -> exact PF-ODE Jacobian as steps grow.
    sch, data, den = setup
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    g = timesteps(sch, 400)
    solve(den, x, g, Heun()).x.sum().backward()
    exact = data.flow_map_grads(sch, x.detach(), g[0], g[-1], torch.ones(2, 4, dtype=torch.float64))
    assert torch.allclose(x.grad, exact["x"], rtol=1e-4)
    assert torch.allclose(data.mean.grad, exact["mean"], rtol=1e-4)
    assert torch.allclose(data.std.grad, exact["std"], rtol=1e-3, atol=1e-6)


class NaNAfter(torch.nn.Module):
    def __init__(self, t_bad):
        super().__init__()
        self.t_bad = t_bad

    def forward(self, x, t):
        out = torch.zeros_like(x)
        return out + float("nan") if float(t[0]) < self.t_bad else out


def test_nan_from_model_names_step_and_time():
    sch = VPLinear()
    den = Denoiser(NaNAfter(0.5), sch, "eps")
    g = timesteps(sch, 10, "uniform", t_start=1.0, t_end=0.05)
    with pytest.raises(NonFiniteError, match=r"step 6 \(t=0\.43\)") as e:
        solve(den, torch.zeros(2, 3), g, Euler())
    assert e.value.step == 6 and abs(e.value.t - 0.43) < 1e-12


def test_bad_inputs(setup):
    sch, data, den = setup
    x = torch.randn(2, 4, dtype=torch.float64)
    g = timesteps(sch, 4)
    with pytest.raises(TypeError, match="instance"):
        solve(den, x, g, Euler)
    with pytest.raises(TypeError, match="Solver"):
        solve(den, x, g, "euler")
    with pytest.raises(TypeError, match="Denoiser"):
        solve(lambda x, t: x, x, g, Euler())
    with pytest.raises(TypeError, match="floating"):
        solve(den, torch.zeros(2, 4, dtype=torch.long), g, Euler())
    with pytest.raises(TypeError, match="tensor"):
        solve(den, [1.0, 2.0], g, Euler())
    with pytest.raises(ValueError, match="batch"):
        solve(den, torch.zeros(()), g, Euler())
    with pytest.raises(ValueError, match="monotone"):
        solve(den, x, [1.0, 0.2, 0.5], Euler())
    with pytest.raises(ValueError, match="at least two"):
        solve(den, x, [1.0], Euler())
    with pytest.raises(ValueError, match="batch size"):
        solve(den, x, g, Euler(), cond=torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        solve(den, x, g, Euler(), cond=torch.zeros(2, 4, dtype=torch.float32))
    with pytest.raises(TypeError, match="dict of tensors"):
        solve(den, x, g, Euler(), cond=[1, 2])
    with pytest.raises(ValueError, match=r"cond\['a'\]"):
        solve(den, x, g, Euler(), cond={"a": torch.zeros(5)})
    with pytest.raises(ValueError, match="device"):
        solve(den, x, g, Euler(), cond=torch.zeros(2, 4, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match="gradient"):
        solve(den, x, g, Euler(), gradient="adjoint")
    with pytest.raises(TypeError, match="instance"):
        solve(den, x, g, Euler(), gradient=af.Backprop)
    with pytest.raises(ValueError, match="deterministic"):
        solve(den, x, g, Euler(), noise=af.BrownianNoise(x.shape))
    with pytest.raises(ValueError, match="decreasing"):
        solve(den, x, g.flip(0), EulerMaruyama())
    with pytest.raises(ValueError, match="noise has shape"):
        solve(den, x, g, EulerMaruyama(), noise=af.BrownianNoise((3, 4), dtype=torch.float64))


def test_cond_reaches_the_network_and_sets_the_mean(setup):
    sch, data, den = setup
    x = torch.randn(2, 4, dtype=torch.float64)
    cond = torch.full((2, 4), 3.0, dtype=torch.float64, requires_grad=True)
    g = timesteps(sch, 400)  # Heun's error here is ~2.5e-4 at 200 steps, ~6e-5 at 400
    out = solve(den, x, g, Heun(), cond=cond).x
    exact = data.flow_map(sch, x, g[0], g[-1], cond=cond)
    assert torch.allclose(out, exact, atol=1e-4)
    out.sum().backward()
    ex = data.flow_map_grads(sch, x, g[0], g[-1], torch.ones_like(x), cond=cond.detach())
    assert torch.allclose(cond.grad, ex["cond"], rtol=1e-4)


def test_noise_dtype_and_type_checked(setup):
    sch, data, den = setup
    x = torch.randn(2, 4, dtype=torch.float64)
    g = timesteps(sch, 4)
    with pytest.raises(TypeError, match="dtype"):
        solve(den, x, g, EulerMaruyama(), noise=af.BrownianNoise((2, 4), dtype=torch.float32))
    with pytest.raises(TypeError, match="BrownianNoise"):
        solve(den, x, g, EulerMaruyama(), noise=3)


def test_network_output_dtype_is_cast_to_the_state_dtype():
    class Half(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x, dtype=torch.float16)

    den = Denoiser(Half(), VPLinear(), "eps")
    out = solve(den, torch.randn(2, 3), timesteps(VPLinear(), 3), Euler()).x
    assert out.dtype == torch.float32

    class Ints(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x, dtype=torch.long)

    with pytest.raises(TypeError, match="floating"):
        solve(Denoiser(Ints(), VPLinear(), "eps"), torch.randn(2, 3), timesteps(VPLinear(), 3), Euler())


@pytest.mark.parametrize("solver", [Euler(), Heun(), EulerMaruyama()], ids=lambda s: type(s).__name__)
def test_eps_model_at_alpha_zero_is_a_clear_error(solver):
    # eps -> velocity divides by alpha, which is 0 at t = 1 of a flow path: a clear error, not NaN
    from adjointflow import LinearFlow

    den = GaussianData(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)).denoiser(LinearFlow(), "eps")
    with pytest.raises(ValueError, match="alpha = 0"):
        solve(den, torch.randn(3, 2, dtype=torch.float64), timesteps(LinearFlow(), 4), solver)
