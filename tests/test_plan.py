"""The per-solve plan: rows bound to the model, cached plans never reused for another solve's inputs."""
import pytest
import torch

import adjointflow as af
from adjointflow.plan import Plan, bound_plan
from adjointflow.testing import GaussianData

F64 = torch.float64


def data():
    return GaussianData(torch.linspace(-1.0, 1.0, 3, dtype=F64), torch.full((3,), 0.6, dtype=F64))


def fresh(den):
    return af.Denoiser(den.net, den.schedule, den.prediction, den.net_time, den.noise_at_zero)


def test_rows_are_bound_tensors_of_the_state_dtype_and_evaluation_points():
    sch = af.VPLinear()
    den = data().denoiser(sch, "eps")
    x = torch.randn(2, 3)
    bound = af.DPMSolverPP(order=3).plan(sch, af.timesteps(sch, 10)).bind(den, x)  # h < 1: third order, 2S start
    r = bound.rows[3]
    assert r.k == 3 and r.s is bound.evals[3] and r.s.t_net.shape == (2,)
    for v in (r.first.a, r.first.b, r.r0, r.r1, r.w1, r.w2):
        assert isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.ndim == 0
    assert bound.rows[0].starter is not None and bool(torch.isnan(bound.rows[1].r1))  # no step i - 2 yet
    two = af.DPMSolverPP(order=2).plan(sch, af.timesteps(sch, 6)).bind(den, x)
    assert two.rows[3].r1 is None and two.rows[3].w2 is None  # never read by a 2M step: nothing bound


@pytest.mark.parametrize("solver", [af.DPMSolverPP(order=2), af.DEIS(order=3), af.Heun()], ids=repr)
def test_cached_plans_follow_solver_grid_schedule_and_denoiser(solver):
    d = data()
    x = torch.randn(2, 3, dtype=F64)
    for sch in (af.VPLinear(), af.VPLinear(beta_max=10.0), af.VPCosine()):
        den = d.denoiser(sch, "eps")
        for n in (5, 7):
            g = af.timesteps(sch, n)
            first = af.solve(den, x, g, solver).x
            again = af.solve(den, x, g, solver).x
            uncached = solver.plan(sch, g).bind(den, x)
            assert bound_plan(solver, den, g, x) is bound_plan(solver, den, g, x)  # cached ...
            assert torch.equal(first, again)
            ref = af.solve(fresh(den), x, g.clone(), solver).x  # ... and equal to a fresh plan
            assert torch.equal(first, ref) and len(uncached.rows) == n
    # a changed prediction type is a different bound plan
    den = d.denoiser(af.VPLinear(), "eps")
    g = af.timesteps(af.VPLinear(), 5)
    eps_out = af.solve(den, x, g, solver).x
    den.prediction = "x0"
    assert not torch.equal(af.solve(den, x, g, solver).x, eps_out)


def test_plan_cache_keys_on_the_solver_fields():
    sch = af.VPLinear()
    a, b = af.DPMSolverPP(order=2), af.DPMSolverPP(order=2, solver_type="heun")
    den, x, g = data().denoiser(sch, "eps"), torch.randn(2, 3, dtype=F64), af.timesteps(sch, 8)
    assert not torch.equal(af.solve(den, x, g, a).x, af.solve(den, x, g, b).x)
    assert bound_plan(a, den, g, x).plan is not bound_plan(b, den, g, x).plan


def test_network_modifying_its_time_in_place_is_refused():
    class InPlace(torch.nn.Module):
        def forward(self, x, t):
            t.mul_(2.0)
            return torch.zeros_like(x)

    den = af.Denoiser(InPlace(), af.VPLinear(), "eps")
    with pytest.raises(ValueError, match="in place"):
        af.solve(den, torch.randn(2, 3), af.timesteps(af.VPLinear(), 4), af.Euler())


def test_plan_nodes_are_the_schedule_in_float64():
    sch = af.VPCosine()
    g = af.timesteps(sch, 4, "uniform", t_start=1.0)
    p = Plan(sch, g)
    assert p.nodes.alpha[0] == 0.0 and p.nodes.lam[0] == float("-inf")
    assert p.nodes.dalpha.tolist() == pytest.approx(sch.dalpha_dt(g).tolist(), rel=1e-15)
    assert p.start.t.tolist() == g[:-1].tolist() and p.end.t.tolist() == g[1:].tolist()
