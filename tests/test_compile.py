"""torch.compile-friendly steps: no graph break in any solver's step, one compiled step reused for every step
of a grid (the number of compiled variants does not grow with N), output equal to the eager solve, and
clear errors instead of a silent eager fallback; ``compile="solve"``: the whole loop as one graph, equal to the eager
solve, and refused where something acts between steps. Backends "eager"/"aot_eager"/counting keep these tests
cheap (inductor's timings: ``benchmarks/test_bench_overhead.py``)."""
import pytest
import torch

import adjointflow as af
from adjointflow.compiled import _step_body
from adjointflow.driver import ModelCall
from adjointflow.plan import bound_plan
from adjointflow.solvers.base import State

from solver_list import ALL_SOLVERS, ODE_SOLVERS


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f = torch.nn.Linear(9, 8)

    def forward(self, x, t):
        return self.f(torch.tanh(torch.cat([x, t[:, None].to(x.dtype)], 1)))


class Counting:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def setup(kind="vp"):
    if kind == "flow":
        return af.Denoiser(Net(), af.LinearFlow(), "velocity"), torch.randn(2, 8)
    return af.Denoiser(Net(), af.VPLinear(), "eps"), torch.randn(2, 8)


@pytest.mark.parametrize("name, factory", [(s[0], s[1]) for s in ODE_SOLVERS], ids=[s[0] for s in ODE_SOLVERS])
def test_steps_trace_without_graph_breaks(name, factory):
    """The warm-up, multistep and final steps of a 6-step grid, traced as one function by dynamo."""
    solver = factory()
    den, x = setup()
    grid = af.timesteps(den.schedule, 6)
    bound = bound_plan(solver, den, grid, x)
    model = ModelCall(den)
    state = solver.init(model, x, grid)

    def three_steps(tensors, r0, r1, r_last):
        calls = []
        for c in (r0, r1, r_last):
            tensors, step_calls = _step_body(solver, model, True, tensors, c, None)
            calls += step_calls
        return tensors, calls

    # the last row with the history a state carries there
    with torch.no_grad():
        ex = torch._dynamo.explain(three_steps)(state.tensors(), bound.rows[0], bound.rows[1], bound.rows[-1])
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


@pytest.mark.parametrize("name, factory, order, kind", ALL_SOLVERS, ids=[s[0] for s in ALL_SOLVERS])
def test_compiled_once_per_kind_of_step_and_equal_to_eager(name, factory, order, kind):
    den, x = setup()
    ns = (24, 48) if name == "dpmpp_3m" else (24,)  # one solver at two grid sizes: the count does not grow
    graphs = []
    for n in ns:
        backend = Counting()
        noise = af.BrownianNoise((2, 8), seed=3) if kind == "sde" else None
        with torch.no_grad():
            out = af.solve(den, x, af.timesteps(den.schedule, n), factory(), compile=backend, noise=noise).x
            ref = af.solve(den, x, af.timesteps(den.schedule, n), factory(), noise=noise).x
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        graphs.append(backend.graphs)
    # one graph per kind of step (warm-up/starter, multistep, ...), reused for the other steps; UniPC-3's state
    # carries three predictions (its corrector needs them), so its warm-up has one more kind of step
    limit = 4 if name.startswith("unipc3") else 3
    assert len(set(graphs)) == 1 and graphs[0] <= limit, graphs


@pytest.mark.filterwarnings("ignore:ContinuousAdjoint")  # 8 steps: too few for its accuracy; equality is the point
@pytest.mark.parametrize("scope, solver, strategies", [
    ("step", af.DPMSolverPP(order=3), (af.Backprop(), af.adjoint.Checkpoint(keep=0), af.adjoint.ContinuousAdjoint())),
    ("solve", af.UniPC(order=3), (af.Backprop(), af.adjoint.ContinuousAdjoint())),
], ids=["step", "solve"])
def test_compiled_gradients_equal_eager_for_every_strategy(scope, solver, strategies):
    den, x0 = setup()
    grid = af.timesteps(den.schedule, 8)
    params = list(den.net.parameters())

    def grads(strategy, compile):
        x = x0.clone().requires_grad_(True)
        out = af.solve(den, x, grid, solver, gradient=strategy, compile=compile).x
        return torch.autograd.grad(out.square().sum(), [x, *params])

    for strategy in strategies:
        for a, b in zip(grads(strategy, af.Compile(scope, "aot_eager")), grads(strategy, False)):
            assert (a - b).norm() <= 1e-5 * b.norm()  # float32 rounding (decomposed ops)


def test_compile_errors_are_clear(monkeypatch):
    den, x = setup()
    grid = af.timesteps(den.schedule, 4)
    with pytest.raises(ValueError, match="unknown torch.compile backend"):
        af.solve(den, x, grid, af.Euler(), compile="no-such-backend")
    with pytest.raises(TypeError, match="compile"):
        af.solve(den, x, grid, af.Euler(), compile=3)

    class Breaks(torch.nn.Module):
        def forward(self, x, t):
            torch._dynamo.graph_break()  # e.g. an untraceable call inside a user network
            return x * t[:, None]

    with pytest.raises(RuntimeError, match="could not compile a Euler step"):
        af.solve(af.Denoiser(Breaks(), af.VPLinear(), "eps"), x, grid, af.Euler(), compile="eager")
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(RuntimeError, match="not supported"):
        af.solve(den, x, grid, af.Euler(), compile=True)


class CountingCalls(Counting):
    """Counting, and also the calls of the compiled graphs."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


@pytest.mark.parametrize("name, factory, order, kind", ALL_SOLVERS, ids=[s[0] for s in ALL_SOLVERS])
def test_whole_solve_is_one_graph_equal_to_eager(name, factory, order, kind):
    """compile="solve": one graph per grid, called once per solve, reused for the same grid (a new grid is a new
    graph); the same trajectory and NFE as the eager solve."""
    den, x = setup()
    backend = CountingCalls()
    spec = af.Compile("solve", backend)
    for n, graphs in ((5, 1), (5, 1), (7, 2)):
        noise = af.BrownianNoise((2, 8), seed=3) if kind == "sde" else None
        grid = af.timesteps(den.schedule, n)
        calls = backend.calls
        with torch.no_grad():
            out = af.solve(den, x, grid, factory(), compile=spec, noise=noise, save_trajectory=True)
            ref = af.solve(den, x, grid, factory(), noise=noise, save_trajectory=True)
        assert (backend.graphs, backend.calls - calls) == (graphs, 1)
        torch.testing.assert_close(out.trajectory, ref.trajectory, rtol=1e-6, atol=1e-6)
        assert out.nfe == ref.nfe


def test_whole_solve_names_a_bad_step():
    """The deferred NaN/Inf check of a compiled loop: the final state is bad, the eager rerun names the step."""

    class NaNLate(torch.nn.Module):
        def forward(self, x, t):
            return torch.where(t[:, None] < 0.5, torch.full_like(x, float("nan")), torch.zeros_like(x))

    den = af.Denoiser(NaNLate(), af.VPLinear(), "eps")
    grid = af.timesteps(af.VPLinear(), 10, "uniform", t_start=1.0, t_end=0.05)  # grid[6] = 0.43
    with pytest.raises(af.NonFiniteError, match=r"model returned NaN/Inf at step 6 \(t=0\.43\)"):
        af.solve(den, torch.zeros(2, 3), grid, af.Euler(), compile=af.Compile("solve", "eager"))


def test_whole_solve_refuses_what_acts_between_steps():
    den, x = setup()
    grid = af.timesteps(den.schedule, 4)

    class Mine(af.Backprop):
        pass

    for kwargs, what in ((dict(gradient=af.Checkpoint()), "Checkpoint"), (dict(gradient=Mine()), "only Backprop"),
                         (dict(callback=lambda info: None), "callback"), (dict(progress=True), "progress"),
                         (dict(check_finite="step"), "check_finite='step'")):
        with pytest.raises(ValueError, match=f"compile='solve' .*{what}"):
            af.solve(den, x, grid, af.Euler(), compile="solve", **kwargs)


def test_whole_solve_errors_are_clear():
    den, x = setup()
    grid = af.timesteps(den.schedule, 4)

    class Breaks(torch.nn.Module):
        def forward(self, x, t):
            torch._dynamo.graph_break()
            return x * t[:, None]

    with pytest.raises(RuntimeError, match="could not compile a Euler solve as one graph"):
        af.solve(af.Denoiser(Breaks(), af.VPLinear(), "eps"), x, grid, af.Euler(), compile=af.Compile("solve", "eager"))

    class WrongShape(af.BrownianNoise):
        def __call__(self, t0, t1):
            return super().__call__(t0, t1)[:1]

    with pytest.raises(ValueError, match=r"returned shape \(1, 8\) but x has \(2, 8\) \(step 0\)"):
        af.solve(den, x, grid, af.EulerMaruyama(), noise=WrongShape((2, 8), seed=0), compile=af.Compile("solve", "eager"))


def test_compile_spec():
    from adjointflow.compiled import check_compile

    assert check_compile(True) == check_compile("step") == af.Compile()
    assert check_compile("solve") == af.Compile(scope="solve")
    assert check_compile("aot_eager") == af.Compile(backend="aot_eager")
    assert check_compile(False) is None
    with pytest.raises(ValueError, match="scope"):
        af.Compile(scope="loop")
    with pytest.raises(TypeError, match="mode"):
        af.Compile(mode=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        af.Compile(mode="bogus")
    with pytest.raises(ValueError, match="inductor option"):
        af.Compile(backend="eager", mode="reduce-overhead")
    with pytest.raises(TypeError, match="backend"):
        af.Compile(backend=42)
    with pytest.raises(TypeError, match="backend"):
        af.Compile(backend=af.Compile())

    class Unhashable:
        __hash__ = None

        def __call__(self, gm, example_inputs):
            return gm.forward

    with pytest.raises(TypeError, match="hashable"):
        af.Compile(backend=Unhashable())
    with pytest.raises(ValueError, match="compile='bogus': unknown torch.compile backend"):
        check_compile("bogus")
