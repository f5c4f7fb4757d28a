"""Bespoke solvers (Shaul et al. 2024): identity = base solver bit for bit, order kept under a fixed
smooth transform, exact (straight-through) gradients, training on a 2-D mixture, save/load, strategies."""
from __future__ import annotations

import copy
import functools
import math
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torchdiffeq import odeint

import adjointflow as af
from adjointflow.solvers import BespokeSolver, Solver, State, fit_bespoke
from adjointflow.solvers.bespoke import model_fingerprint
from adjointflow.solvers.bespoke_ns import BespokeNSSolver
from adjointflow.solvers.bespoke_train import GroundTruth, bespoke_loss, ground_truth, rmse
from adjointflow.testing import GaussianData, GaussianMixture, empirical_order

F64 = torch.float64
T0, T1 = 1.0, 1e-3
# the training toy: four well-separated components (Euler at 4 NFE is far off)
MIX = GaussianMixture([0.3, 0.2, 0.25, 0.25], [[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0], [0.5, -2.0]], [0.3, 0.5, 0.4, 0.35])
# smooth mixture for order tests (notes §8.5: sharp components are not asymptotic at n <= 128)
SMOOTH = GaussianMixture([0.3, 0.2, 0.25, 0.25], [[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0], [0.5, -2.0]], [0.6, 0.9, 0.7, 0.8])

# fixed smooth transform of notes §8.5: t_r = (e^{2r} - 1)/(e^2 - 1), s_r = 1 + r(1 - r)/2
PHI = lambda r: torch.expm1(2 * r) / math.expm1(2.0)
DPHI = lambda r: 2 * torch.exp(2 * r) / math.expm1(2.0)
S = lambda r: 1 + 0.5 * r * (1 - r)
DS = lambda r: 0.5 - r


def den_mix():
    return MIX.denoiser(af.LinearFlow(), "velocity")


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def perturbed(n, base, seed=1, scale=0.2):
    s = BespokeSolver(n, base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=F64))
    return s


@dataclass(frozen=True)
class Midpoint(Solver):
    """Reference explicit midpoint, written like Heun (torch.add kernel), the model called at time tensors
    (as the bespoke solver calls it)."""

    order = 2
    nfe_per_step = 2

    def rows(self, plan):
        return [(plan.grid[i], plan.grid[i + 1]) for i in range(plan.n)]

    def step(self, model, state, c, noise=None):
        t, t_next = c
        dt = float(t_next - t)
        z = torch.add(state.x, model(state.x, t).velocity, alpha=0.5 * dt)
        return State(torch.add(state.x, model(z, t + 0.5 * (t_next - t)).velocity, alpha=dt))


@dataclass(frozen=True)
class TensorTimeEuler(Solver):
    """Reference Euler with the model called at time tensors (as the bespoke solver calls it). The library's
    Euler reads precomputed float64 conversions from its plan, which can differ from a per-time schedule
    evaluation in the last bit, so bit-for-bit identity is checked against this one, and agreement with
    ``af.Euler`` to 1e-14 relative."""

    def rows(self, plan):
        return [(plan.grid[i], plan.grid[i + 1]) for i in range(plan.n)]

    def step(self, model, state, c, noise=None):
        t, t_next = c
        return State(torch.add(state.x, model(state.x, t).velocity, alpha=float(t_next - t)))


# --- frozen rows (sampling without gradients to the solver) ------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("sch, pred", [(af.LinearFlow(), "velocity"), (af.VPLinear(), "eps")])
def test_frozen_identity_is_the_library_euler_bit_for_bit(dtype, sch, pred):
    # without gradients the rows are planned floats and evaluation points, as af.Euler's are
    den = MIX.denoiser(sch, pred)
    s = BespokeSolver(8, "rk1")
    x = randn(64, 2, dtype=dtype)
    grid = s.timesteps(sch.t_start, sch.t_end)
    with torch.no_grad():
        a, e = af.solve(den, x, grid, s), af.solve(den, x, grid, af.Euler())
    assert s.frozen() is False  # outside no_grad its parameters want gradients
    assert torch.equal(a.x, e.x) and a.nfe == e.nfe == 8


def ns_perturbed(n, seed=1, scale=0.05):
    s = BespokeNSSolver(n)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=F64))
    return s


@pytest.mark.parametrize("make", [lambda: perturbed(6, "rk1"), lambda: perturbed(6, "rk2"), lambda: ns_perturbed(6)],
                         ids=["rk1", "rk2", "ns"])
@pytest.mark.parametrize("sch, pred", [(af.LinearFlow(), "velocity"), (af.VPLinear(), "eps")])
def test_frozen_rows_equal_the_differentiable_rows(make, sch, pred):
    den = MIX.denoiser(sch, pred)
    s = make()
    x = randn(64, 2)
    grid = s.timesteps(sch.t_start, sch.t_end)
    ref = af.solve(den, x, grid, s)  # gradients enabled: per-step tensor coefficients
    assert ref.x.requires_grad
    with torch.no_grad():
        fast = af.solve(den, x, grid, s)
    s.requires_grad_(False)  # frozen with gradients enabled too: Backprop to x only
    xl = x.clone().requires_grad_(True)
    frozen = af.solve(den, xl, grid, s)
    (g_frozen,) = torch.autograd.grad(frozen.x.sum(), xl)
    s.requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(af.solve(den, xr, grid, s).x.sum(), xr)
    scale = ref.x.abs().max()
    assert (fast.x - ref.x).abs().max() <= 1e-13 * scale and fast.nfe == ref.nfe
    assert (frozen.x - ref.x).abs().max() <= 1e-13 * scale
    assert (g_frozen - g_ref).abs().max() <= 1e-12 * g_ref.abs().max()


@pytest.mark.parametrize("make", [lambda: perturbed(5, "rk2"), lambda: ns_perturbed(5)], ids=["rk2", "ns"])
def test_frozen_plan_follows_parameter_updates(make):
    # frozen plans are cached by the parameters' values: an in-place update (an optimiser step) is seen
    den, x = den_mix(), randn(32, 2)
    s = make()
    grid = s.timesteps(T0, T1)
    with torch.no_grad():
        before = af.solve(den, x, grid, s).x
        for name, p in s.named_parameters():
            if name != "theta_t":  # the grid's interior follows theta_t
                p.mul_(1.1)
        after = af.solve(den, x, grid, s).x
    ref = af.solve(den, x, grid, s).x.detach()  # differentiable rows, never cached
    assert not torch.equal(before, after)
    assert (after - ref).abs().max() <= 1e-13 * ref.abs().max()


# --- protocol -------------------------------------------------------------------------------------
@pytest.mark.parametrize("base, per_step, order", [("rk1", 4, 1), ("rk2", 8, 2)])
def test_protocol_and_parameter_count(base, per_step, order):
    for n in (1, 3, 10):
        s = BespokeSolver(n, base)
        assert isinstance(s, Solver) and isinstance(s, torch.nn.Module)
        assert sum(p.numel() for p in s.parameters()) == per_step * n - 1
        assert s.order == order and s.nfe_per_step == order and not s.stochastic
    a, b = BespokeSolver(4, base), BespokeSolver(4, base)
    assert a != b and a == a and len({a, b}) == 2  # module identity, not dataclass-field equality
    assert "untrained" in repr(a)


# --- identity reproduces the base ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("n", [3, 8])
@pytest.mark.parametrize("sch, pred", [(af.LinearFlow(), "velocity"), (af.VPLinear(), "eps")])
def test_identity_is_euler_bit_for_bit(dtype, n, sch, pred):
    den = MIX.denoiser(sch, pred)
    s = BespokeSolver(n, "rk1")
    x = randn(64, 2, dtype=dtype)
    for grid in (s.timesteps(sch.t_start, sch.t_end), af.timesteps(sch, n, "uniform")):
        a, b = af.solve(den, x, grid, s), af.solve(den, x, grid, TensorTimeEuler())
        assert torch.equal(a.x, b.x) and a.nfe == b.nfe == n
        e = af.solve(den, x, grid, af.Euler())
        tol = 1e-14 if dtype == F64 else 1e-6
        assert (e.x - a.x).abs().max() <= tol * a.x.abs().max() and e.nfe == n


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("n", [3, 8])
def test_identity_rk2_is_midpoint_bit_for_bit(dtype, n):
    den = den_mix()
    s = BespokeSolver(n, "rk2")
    x = randn(64, 2, dtype=dtype)
    grid = af.timesteps(af.LinearFlow(), n)
    a, b = af.solve(den, x, grid, s), af.solve(den, x, grid, Midpoint())
    assert torch.equal(a.x, b.x) and a.nfe == 2 * n


# --- a fixed smooth transform ----------------------------------------------------------------------
def test_from_transform_is_the_papers_step():
    """One step equals Eqs. 17/19 of the paper written out with t_r, s_r and their derivatives."""
    den = den_mix()
    n, x = 5, randn(16, 2)
    t_of = lambda r: T0 + (T1 - T0) * PHI(torch.as_tensor(r, dtype=F64))
    tdot = lambda r: (T1 - T0) * DPHI(torch.as_tensor(r, dtype=F64))
    s_, sd = (lambda r: S(torch.as_tensor(r, dtype=F64))), (lambda r: DS(torch.as_tensor(r, dtype=F64)))
    u = lambda y, r: den(y, t_of(r)).velocity
    h = 1.0 / n
    for base in ("rk1", "rk2"):
        sol = BespokeSolver.from_transform(n, base, PHI, DPHI, S, DS)
        c = sol.coefficients(T0, T1)
        for i in range(n):
            r, r1, rm = i * h, (i + 1) * h, (i + 0.5) * h
            if base == "rk1":
                ref = (s_(r) + h * sd(r)) / s_(r1) * x + h * tdot(r) * s_(r) / s_(r1) * u(x, r)
            else:
                z = (s_(r) + h * sd(r) / 2) * x + h / 2 * s_(r) * tdot(r) * u(x, r)
                ref = s_(r) / s_(r1) * x + h / s_(r1) * (sd(rm) / s_(rm) * z + tdot(rm) * s_(rm) * u(z / s_(rm), rm))
            got = sol.advance(lambda y, t: den(y, t), x, i, c)
            assert torch.allclose(got, ref, rtol=0, atol=1e-13), (base, i)


@pytest.mark.parametrize("base, order", [("rk1", 1), ("rk2", 2)])
def test_fixed_smooth_transform_keeps_order(base, order):
    den = SMOOTH.denoiser(af.LinearFlow(), "velocity")
    x = randn(64, 2, seed=3)
    with torch.no_grad():
        exact = odeint(lambda t, y: den(y, t).velocity, x, torch.tensor([T0, T1], dtype=F64),
                       method="dopri5", rtol=1e-12, atol=1e-12)[-1]
    ns, errs, gaps = [16, 32, 64, 128], [], []
    for n in ns:
        s, b = BespokeSolver.from_transform(n, base, PHI, DPHI, S, DS), BespokeSolver(n, base)
        with torch.no_grad():
            out = af.solve(den, x, s.timesteps(T0, T1), s).x
            out_base = af.solve(den, x, b.timesteps(T0, T1), b).x
        errs.append(rmse(out, exact))
        gaps.append(rmse(out, out_base) / rmse(out_base, exact))
    p = empirical_order(ns, errs)
    print(f"\n{base} errors {errs}, slope {p:.3f}")
    assert abs(p - order) <= 0.15, (p, errs)
    # a real transform, not the identity in disguise: its samples differ from the base solver's by
    # a sizeable fraction of the base solver's own error
    assert min(gaps) > 0.1, gaps


# --- ground truth and straight-through gradients ---------------------------------------------------
@pytest.fixture(scope="module")
def small_gt():
    return ground_truth(den_mix(), randn(48, 2, seed=5), T0, T1, points=513)


def test_ground_truth_interpolation_and_straight_through_derivative(small_gt):
    from adjointflow.driver import ModelCall
    from adjointflow.solvers.bespoke_train import _aux

    den, gt = den_mix(), small_gt
    f = lambda t, y: den(y, t).velocity
    for tq in (0.83, 0.4137, 0.05):
        eps = 1e-5
        ts = torch.tensor([T0, tq + eps, tq, tq - eps], dtype=F64)
        with torch.no_grad():
            xs = odeint(f, gt.x_start, ts, method="dopri5", rtol=1e-12, atol=1e-12)
        assert (gt.at(tq) - xs[2]).abs().max() < 1e-8  # Hermite interpolation of the dense solve
        t = torch.tensor(tq, dtype=F64, requires_grad=True)
        xa = _aux(gt, t, None, ModelCall(den))
        assert torch.equal(xa.detach(), gt.at(tq))  # the value is the ground truth
        w = randn(*xa.shape, seed=9)
        (g,) = torch.autograd.grad((xa * w).sum(), t)
        fd = ((xs[1] - xs[3]) * w).sum() / (2 * eps)
        assert abs(float(g) - float(fd)) <= 1e-6 * abs(float(fd)), (float(g), float(fd))


@pytest.mark.parametrize("base", ["rk1", "rk2"])
@pytest.mark.parametrize("loss", ["bound", "rmse"])
def test_loss_gradient_matches_finite_differences(small_gt, base, loss):
    """Autograd (straight-through for the learned times) == central differences of the loss, where
    the perturbed times read the dense ground truth: every parameter, both losses, both bases."""
    assert_loss_gradient_is_central_difference(perturbed(4, base, seed=2, scale=0.1), den_mix(), small_gt, loss)


def assert_loss_gradient_is_central_difference(s, den, gt, loss, h=1e-6):
    bespoke_loss(s, den, gt, loss=loss).backward()
    for name, p in s.named_parameters():
        fd = torch.zeros_like(p)
        for k in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[k] += h
                lp = bespoke_loss(s, den, gt, loss=loss)
                p.view(-1)[k] -= 2 * h
                lm = bespoke_loss(s, den, gt, loss=loss)
                p.view(-1)[k] += h
            fd.view(-1)[k] = (lp - lm) / (2 * h)
        assert torch.allclose(p.grad, fd, rtol=1e-5, atol=1e-7), (name, p.grad, fd)


def test_bound_loss_bounds_the_error_when_lipschitz_is_an_upper_bound():
    """On Gaussian data the drift is affine with u_x = (alpha alpha' s^2 + sigma sigma')/(alpha^2 s^2 + sigma^2),
    so Lip(u) is known; with lipschitz >= Lip(u) the paper's loss is >= the true final error."""
    std = torch.tensor([0.5, 1.5], dtype=F64)
    data, sch = GaussianData(torch.tensor([1.0, -0.5], dtype=F64), std), af.LinearFlow()
    den = data.denoiser(sch, "velocity")
    t = torch.linspace(T1, T0, 20001, dtype=F64)[:, None]
    a, sg = 1 - t, t
    lip = float(((-a * std**2 + sg) / (a * a * std**2 + sg * sg)).abs().max())
    gt = ground_truth(den, randn(256, 2, seed=4), T0, T1)
    for s in (BespokeSolver(4, "rk1"), perturbed(4, "rk1"), BespokeSolver(3, "rk2"), perturbed(3, "rk2")):
        with torch.no_grad():
            err = float(bespoke_loss(s, den, gt, loss="rmse"))
            bound = float(bespoke_loss(s, den, gt, loss="bound", lipschitz=lip))
        assert err <= bound, (err, bound)


# --- training ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mix_data():
    den = den_mix()
    gts = [ground_truth(den, randn(n, 2, seed=seed), T0, T1) for n, seed in ((1024, 10), (512, 11), (1024, 12))]
    return den, gts


def base_rmse(den, gt, solver_n, base):
    with torch.no_grad():
        s = BespokeSolver(solver_n, base)
        return rmse(af.solve(den, gt.x_start, s.timesteps(T0, T1), s).x, gt.x_end)


@pytest.fixture(scope="module")
def trained_rk1(mix_data):
    den, (tr, va, te) = mix_data
    s = BespokeSolver(4, "rk1")
    hist = fit_bespoke(den, s, tr, va, iterations=60, batch_size=1024, progress=False)  # default recipe, shortened
    return s, hist


def check_transform_valid(s):
    t = s.timesteps()
    assert bool((t[1:] < t[:-1]).all())  # sampling grid: strictly decreasing from t_start to t_end
    c = s.coefficients(*s.interval.tolist())
    assert bool((c["dt"] < 0).all()) and bool((c["s"] > 0).all())
    if s.base == "rk2":
        lo, hi = torch.minimum(c["t"][:-1], c["t"][1:]), torch.maximum(c["t"][:-1], c["t"][1:])
        assert bool((c["t_mid"] > lo).all() and (c["t_mid"] < hi).all() and (c["s_mid"] > 0).all())


def test_training_cuts_heldout_error_rk1_nfe4(mix_data, trained_rk1):
    den, (tr, va, te) = mix_data
    s, hist = trained_rk1
    base = base_rmse(den, te, 4, "rk1")
    with torch.no_grad():
        test = rmse(af.solve(den, te.x_start, s.timesteps(), s).x, te.x_end)
        train = rmse(af.solve(den, tr.x_start, s.timesteps(), s).x, tr.x_end)
    print(f"\nRK1 NFE 4: Euler {base:.4f}, bespoke train {train:.4f}, validation {hist.best_val_rmse:.4f}, "
          f"held-out test {test:.4f} ({base / test:.1f}x), {hist.seconds:.1f} s, {len(hist.loss)} loss evaluations")
    assert base / test >= 5.0, (base, test)
    check_transform_valid(s)
    assert s.trained and s.model_fingerprint == model_fingerprint(den)
    # L-BFGS: one evaluation per 20 iterations, each iteration ~1-2 loss evaluations (line search)
    its = hist.eval_iteration
    assert its[0] == 0 and its[1] == 20 and its == sorted(set(its)) and its[-1] <= 60
    assert hist.stopped in ("iterations", "converged") and (hist.stopped == "converged") == (its[-1] < 60)
    assert its[-1] <= len(hist.loss) == hist.eval_loss_evaluations[-1] <= 4 * its[-1]
    assert len(hist.val_rmse) == len(hist.train_rmse) == len(hist.eval_seconds) == len(its)
    assert hist.best_val_rmse == min(hist.val_rmse)
    assert hist.val_rmse[0] == pytest.approx(base_rmse(den, va, 4, "rk1"), rel=1e-12)


def test_training_cuts_heldout_error_rk2_nfe8(mix_data):
    den, (tr, va, te) = mix_data
    s = BespokeSolver(4, "rk2")
    hist = fit_bespoke(den, s, tr, va, iterations=60, batch_size=1024, progress=False)
    base = base_rmse(den, te, 4, "rk2")
    with torch.no_grad():
        test = rmse(af.solve(den, te.x_start, s.timesteps(), s).x, te.x_end)
    print(f"\nRK2 NFE 8: midpoint {base:.4f}, bespoke validation {hist.best_val_rmse:.4f}, held-out test {test:.4f} "
          f"({base / test:.1f}x)")
    assert base / test >= 3.0, (base, test)
    check_transform_valid(s)


def test_bound_loss_and_adam_train_too(mix_data):
    """The paper's loss and Adam train too (both reach worse errors than the default; see the benchmark)."""
    den, (tr, va, te) = mix_data
    euler = base_rmse(den, te, 4, "rk1")
    s = BespokeSolver(4, "rk1")
    hist = fit_bespoke(den, s, tr, va, loss="bound", iterations=40, batch_size=1024, progress=False)
    assert hist.loss[-1] < 0.5 * hist.loss[0]
    with torch.no_grad():
        test = rmse(af.solve(den, te.x_start, s.timesteps(), s).x, te.x_end)
    assert euler / test >= 2.0
    check_transform_valid(s)
    a = BespokeSolver(4, "rk1")
    hist = fit_bespoke(den, a, tr, va, optimizer="adam", iterations=60, eval_every=20, progress=False)
    assert len(hist.loss) == 60 and hist.eval_iteration == [0, 20, 40, 60] and hist.stopped == "iterations"
    with torch.no_grad():
        test = rmse(af.solve(den, te.x_start, a.timesteps(), a).x, te.x_end)
    assert euler / test >= 2.0
    check_transform_valid(a)


def test_chunked_gradient_equals_the_whole_batch(small_gt):
    """The loss and gradient accumulated chunk by chunk equal those of the whole set at once (what
    lets L-BFGS run on a training set larger than memory, and data-parallel ranks sum their shards)."""
    from adjointflow.solvers.bespoke_train import accumulate_loss_gradient

    den = den_mix()
    for loss in ("rmse", "bound"):
        grads = []
        for chunk in (48, 7):
            s = perturbed(3, "rk2", seed=4, scale=0.1)
            value = accumulate_loss_gradient(s, den, small_gt, torch.arange(48), loss=loss, lipschitz=1.0, chunk=chunk)
            grads.append((value, [p.grad.clone() for p in s.parameters()]))
        assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-13)
        for a, b in zip(grads[0][1], grads[1][1]):
            assert torch.allclose(a, b, rtol=1e-11, atol=1e-15)


def test_patience_stops_early(mix_data, trained_rk1):
    """Adam with a large step from a trained solver only makes it worse: training stops ``patience``
    evaluations after the best one, whose parameters are restored."""
    den, (tr, va, te) = mix_data
    s = copy.deepcopy(trained_rk1[0])
    start = [p.detach().clone() for p in s.parameters()]
    hist = fit_bespoke(den, s, tr, va, optimizer="adam", lr=0.05, lr_final=0.05, iterations=400, eval_every=5,
                       patience=2, progress=False)
    assert hist.stopped == "patience" and len(hist.eval_iteration) < 20, hist.val_rmse
    assert hist.eval_iteration[-1] - hist.best_iteration == 10 and len(hist.loss) == hist.eval_iteration[-1]
    if hist.best_iteration == 0:
        assert all(torch.equal(a, b) for a, b in zip(start, s.parameters()))


# --- warm start and NFE budgets ----------------------------------------------------------------------
def test_load_transform_resamples_the_transform():
    """Same step count: the identical transform. A finer solver holds the coarse one's samples (its
    nodes and midpoints include them), so going back recovers it exactly; a smooth transform resampled
    at another step count is close to the same transform built at that count."""
    for base in ("rk1", "rk2"):
        s = BespokeSolver.from_transform(4, base, PHI, DPHI, S, DS)
        same, fine, back = BespokeSolver(4, base), BespokeSolver(8, base), BespokeSolver(4, base)
        same.load_transform(s)
        fine.load_transform(s)
        back.load_transform(fine)
        for a, b, c in zip(s.parameters(), same.parameters(), back.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-14) and torch.allclose(a, c, rtol=0, atol=1e-12)
        # phi is interpolated linearly between samples h = 1/4 apart (RK1): error <= h^2/8 max|phi''|
        ref = BespokeSolver.from_transform(8, base, PHI, DPHI, S, DS)
        bound = (1 / 4) ** 2 / 8 * 4 * math.exp(2.0) / math.expm1(2.0) * (T0 - T1)
        assert (fine.timesteps(T0, T1) - ref.timesteps(T0, T1)).abs().max() <= bound
        assert not fine.trained  # the transform, not the interval or the model
    with pytest.raises(ValueError, match="base='rk1' transform into a base='rk2'"):
        BespokeSolver(3, "rk2").load_transform(BespokeSolver(3, "rk1"))


def test_warm_start_from_another_nfe(mix_data, trained_rk1):
    """init = a trained solver at another NFE: a far better start than the identity, and a shorter
    run reaches what a cold run reaches (the speed-up is measured in the benchmark)."""
    den, (tr, va, te) = mix_data
    coarse = trained_rk1[0]  # RK1, 4 steps
    warm = BespokeSolver(6, "rk1")
    hw = fit_bespoke(den, warm, tr, va, init=coarse, iterations=20, batch_size=1024, progress=False)
    cold = BespokeSolver(6, "rk1")
    hc = fit_bespoke(den, cold, tr, va, iterations=20, batch_size=1024, progress=False)
    print(f"\nRK1 4 -> 6 steps: start {hw.val_rmse[0]:.4f} (cold {hc.val_rmse[0]:.4f}), after 20 iterations "
          f"{hw.best_val_rmse:.4f} (cold {hc.best_val_rmse:.4f})")
    assert hw.val_rmse[0] < 0.5 * hc.val_rmse[0]
    assert hw.best_val_rmse < hc.best_val_rmse
    check_transform_valid(warm)


def test_warm_start_and_nfe_refusals(mix_data, trained_rk1):
    den, (tr, va, te) = mix_data
    coarse = trained_rk1[0]
    other = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [0.5, 0.5]).denoiser(af.LinearFlow(), "velocity")
    cases = [
        (dict(init=coarse), BespokeSolver(3, "rk2"), den, "init has base='rk1'.*base='rk2'"),
        (dict(init=coarse), BespokeSolver(3, "rk1"), other, "init was trained for a different model"),
        (dict(init=BespokeSolver(3, "rk1")), BespokeSolver(3, "rk1"), den, "init is untrained"),
        (dict(init=coarse, t_end=1e-2), BespokeSolver(3, "rk1"), den, "init was trained on"),
        (dict(init=af.Euler()), BespokeSolver(3, "rk1"), den, "init must be a trained BespokeSolver"),
    ]
    for kw, solver, d, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            fit_bespoke(d, solver, tr, va, iterations=1, progress=False, **kw)
    with pytest.raises(ValueError, match="NFE 5 is not achievable with base='rk2'.*nfe=4 or nfe=6"):
        BespokeSolver.for_nfe(5, "rk2")
    with pytest.raises(ValueError, match="NFE 1 is not achievable.*use nfe=2,"):
        BespokeSolver.for_nfe(1, "rk2")
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="nfe must be a positive int"):
            BespokeSolver.for_nfe(bad)
    assert (BespokeSolver.for_nfe(5, "rk1").n_steps, BespokeSolver.for_nfe(6).n_steps) == (5, 3)


# --- use inside solve: gradient strategies, batches, dtypes -------------------------------------------
def test_trained_solver_with_every_gradient_strategy(mix_data, trained_rk1):
    den, _ = mix_data
    s, _ = trained_rk1
    x = randn(8, 2, seed=21)
    w = randn(8, 2, seed=22)
    grid = s.timesteps()

    def grad(strategy):
        xl = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((af.solve(den, xl, grid, s, gradient=strategy).x * w).sum(), xl)
        return g

    g_bp = grad(af.Backprop())
    fd = torch.zeros_like(x)
    with torch.no_grad():
        for k in range(x.numel()):
            e = torch.zeros_like(x).view(-1)
            e[k] = 1e-6
            e = e.view_as(x)
            fd.view(-1)[k] = ((af.solve(den, x + e, grid, s).x - af.solve(den, x - e, grid, s).x) * w).sum() / 2e-6
    assert torch.allclose(g_bp, fd, rtol=1e-6, atol=1e-8)
    assert torch.allclose(grad(af.Checkpoint()), g_bp, rtol=0, atol=1e-13)
    assert torch.allclose(grad(af.ContinuousAdjoint()), g_bp, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("base", ["rk1", "rk2"])
def test_adjoint_step_gives_exact_gradients_for_latent_cond_and_params(base):
    """ContinuousAdjoint uses the transposed bespoke step: it equals Backprop for x, cond and the
    model's parameters (GaussianData's mean and std)."""
    data = GaussianData(torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.7, 1.3], dtype=F64))
    den = data.denoiser(af.LinearFlow(), "velocity")
    s = perturbed(5, base, seed=7)
    grid = s.timesteps(T0, T1)
    x, cond, w = randn(6, 2, seed=1), 0.3 * randn(6, 2, seed=2), randn(6, 2, seed=3)

    def grads(strategy):
        xl, cl = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
        out = af.solve(den, xl, grid, s, cond=cl, gradient=strategy).x
        return torch.autograd.grad((out * w).sum(), [xl, cl, data.mean, data.std])

    ref = grads(af.Backprop())
    for strategy in (af.Checkpoint(), af.ContinuousAdjoint()):
        for a, b in zip(grads(strategy), ref):
            assert torch.allclose(a, b, rtol=1e-11, atol=1e-13), strategy
    # the explicit API (no .backward()) replays the solve from x_start
    with torch.no_grad():
        x_end = af.solve(den, x, grid, s, cond=cond).x
    res = s.adjoint(den, grid, x_end, w, cond=cond, params=[data.mean, data.std], x_start=x)
    for a, b in zip([res.x, res.cond, *res.params], ref):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-13)


def test_batch_invariance_and_float32(trained_rk1):
    den, den32 = den_mix(), MIX.denoiser(af.LinearFlow(), "velocity")
    s, _ = trained_rk1
    x = randn(5, 2, seed=8)
    with torch.no_grad():
        full = af.solve(den, x, s.timesteps(), s).x
        for i in range(5):
            assert torch.allclose(af.solve(den, x[i : i + 1], s.timesteps(), s).x[0], full[i], rtol=1e-13, atol=1e-13)
        out32 = af.solve(den32, x.float(), s.timesteps(), s).x
    assert out32.dtype == torch.float32 and torch.allclose(out32.double(), full, atol=1e-4)


# --- the grid -----------------------------------------------------------------------------------------
def test_grid_must_be_the_solvers_own(trained_rk1):
    den, s = den_mix(), trained_rk1[0]
    x = randn(4, 2)
    with pytest.raises(ValueError, match="exactly 5 points"):
        af.solve(den, x, af.timesteps(af.LinearFlow(), 8), s)
    with pytest.raises(ValueError, match="learned times"):
        af.solve(den, x, af.timesteps(af.LinearFlow(), 4), s)  # uniform, but the learned times moved
    with pytest.raises(ValueError, match="trained on the interval"):
        af.solve(den, x, BespokeSolver(4).timesteps(1.0, 0.01), s)
    assert torch.equal(s.timesteps(), s.timesteps(T0, T1))
    with pytest.raises(ValueError, match="untrained"):
        BespokeSolver(4).timesteps()
    with pytest.raises(ValueError, match="outside"):
        BespokeSolver(4).timesteps(1.5, 0.0)
    # an untrained solver takes any interval, including an inversion grid
    u = BespokeSolver(3, "rk2")
    out = af.solve(den, x, u.timesteps(0.2, 0.9), u)
    assert torch.equal(out.x, af.solve(den, x, u.timesteps(0.2, 0.9), Midpoint()).x)


# --- persistence ----------------------------------------------------------------------------------------
def test_save_load_round_trip_and_refusals(tmp_path, trained_rk1):
    den, s = den_mix(), trained_rk1[0]
    path = tmp_path / "bespoke.pt"
    s.save(path)  # the fingerprint recorded by fit_bespoke
    t = BespokeSolver.load(path, denoiser=den, n_steps=4, base="rk1")
    x = randn(16, 2)
    with torch.no_grad():
        assert torch.equal(af.solve(den, x, t.timesteps(), t).x, af.solve(den, x, s.timesteps(), s).x)
    assert t.trained and torch.equal(t.interval, s.interval)
    with pytest.raises(ValueError, match="n_steps=4.*n_steps=8"):
        BespokeSolver.load(path, denoiser=den, n_steps=8)
    with pytest.raises(ValueError, match="base"):
        BespokeSolver.load(path, denoiser=den, base="rk2")
    other = GaussianMixture([0.3, 0.2, 0.25, 0.25], [[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0], [0.5, -2.1]],
                            [0.3, 0.5, 0.4, 0.35]).denoiser(af.LinearFlow(), "velocity")
    with pytest.raises(ValueError, match="different model"):
        BespokeSolver.load(path, denoiser=other)
    with pytest.raises(ValueError, match="different model"):
        BespokeSolver.load(path, denoiser=MIX.denoiser(af.VPLinear(), "eps"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved BespokeSolver"):
        BespokeSolver.load(tmp_path / "other.pt", denoiser=den)
    with pytest.raises(ValueError, match="unknown model"):
        BespokeSolver(3).save(tmp_path / "u.pt")
    BespokeSolver(3).save(tmp_path / "u.pt", den)
    assert not BespokeSolver.load(tmp_path / "u.pt", denoiser=den, n_steps=3).trained


def test_ground_truth_cache(tmp_path):
    den = den_mix()
    x = randn(32, 2, seed=30)
    path = tmp_path / "gt.pt"
    a = ground_truth(den, x, T0, T1, points=65, cache=path)
    b = ground_truth(den, x, T0, T1, points=65, cache=path)
    assert torch.equal(a.x, b.x) and b.seconds == a.seconds  # read back, not recomputed
    c = ground_truth(den, x + 1e-3, T0, T1, points=65, cache=path)  # other samples: recomputed
    assert not torch.equal(c.x_end, a.x_end) and torch.equal(c.x_start, x + 1e-3)


# --- bad input ------------------------------------------------------------------------------------------
def test_bad_input():
    den = den_mix()
    for n in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="n_steps"):
            BespokeSolver(n)
    with pytest.raises(ValueError, match="base"):
        BespokeSolver(4, "rk3")
    with pytest.raises(ValueError, match="phi"):
        BespokeSolver.from_transform(4, "rk1", lambda r: r**2 + 0.1, lambda r: 2 * r + 1, S, DS)
    with pytest.raises(ValueError, match="s\\(0\\) = 1"):
        BespokeSolver.from_transform(4, "rk1", PHI, DPHI, lambda r: 2 + r, lambda r: 1 + 0 * r)
    with pytest.raises(ValueError, match="positive"):
        BespokeSolver.from_transform(4, "rk1", PHI, DPHI, lambda r: 1 - 2 * r, lambda r: -2 + 0 * r)
    x = randn(8, 2)
    with pytest.raises(ValueError, match="shares 8 sample"):
        fit_bespoke(den, BespokeSolver(2), x, x, iterations=1, progress=False)
    with pytest.raises(ValueError, match="loss"):
        fit_bespoke(den, BespokeSolver(2), x, x + 1, loss="l2", progress=False)
    with pytest.raises(TypeError, match="BespokeSolver"):
        fit_bespoke(den, af.Euler(), x, x + 1, progress=False)
    with pytest.raises(TypeError, match="GroundTruth"):
        fit_bespoke(den, BespokeSolver(2), [1.0], x + 1, progress=False)
    with pytest.raises(ValueError, match="iterations"):
        fit_bespoke(den, BespokeSolver(2), x, x + 1, iterations=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        fit_bespoke(den, BespokeSolver(2), x, x + 1, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        fit_bespoke(den, BespokeSolver(2), x, x + 1, optimizer="sgd", progress=False)
    with pytest.raises(ValueError, match="lr_final .* applies to optimizer='adam' only"):
        fit_bespoke(den, BespokeSolver(2), x, x + 1, lr_final=1e-3, progress=False)
    with pytest.raises(ValueError, match="patience"):
        fit_bespoke(den, BespokeSolver(2), x, x + 1, patience=0, progress=False)
    with pytest.raises(ValueError, match="points >= 17"):
        fit_bespoke(den, BespokeSolver(2), ground_truth(den, x, T0, T1, points=2), ground_truth(den, x + 1, T0, T1,
                    points=2), loss="bound", progress=False)
    with pytest.raises(TypeError, match="Denoiser"):
        ground_truth(lambda x, t: x, x, T0, T1)
    with pytest.raises(ValueError, match="different times"):
        ground_truth(den, x, 0.5, 0.5)
    with pytest.raises(ValueError, match="points"):
        ground_truth(den, x, T0, T1, points=1)
    gt = ground_truth(den, x, T0, T1, points=17)
    with pytest.raises(ValueError, match="outside the ground-truth interval"):
        gt.at(0.0)
    with pytest.raises(ValueError, match="spans"):
        fit_bespoke(den, BespokeSolver(2), gt, x + 1, t_end=0.01, progress=False)


def test_fit_with_cond_and_progress_bar():
    data = GaussianData(torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.3, 0.6], dtype=F64))
    den = data.denoiser(af.LinearFlow(), "velocity")
    xt, xv = randn(64, 2, seed=40), randn(32, 2, seed=41)
    ct, cv = randn(64, 2, seed=42), randn(32, 2, seed=43)
    s = BespokeSolver(3, "rk2")
    hist = fit_bespoke(den, s, xt, xv, cond_train=ct, cond_val=cv, iterations=10, batch_size=32,
                       eval_every=5, progress=True, gt_points=65)
    assert hist.best_val_rmse < hist.val_rmse[0]
    # the ground truth used the conditioning: check against the exact flow map
    gt = ground_truth(den, xv, T0, T1, cond=cv, points=9)
    assert torch.allclose(gt.x_end, data.flow_map(af.LinearFlow(), xv, T0, T1, cond=cv), atol=1e-8)
    with pytest.raises(ValueError, match="different model"):
        fit_bespoke(den_mix(), s, xt, xv, iterations=1, progress=False)


def test_fingerprint_sees_schedule_tables_guidance_scale_and_net_time():
    """Review regressions: VPDiscrete tables, a classifier-free guidance scale and net_time lambdas must
    change the fingerprint; save() refuses to relabel a trained solver; fit_bespoke refuses foreign ground truth."""
    from adjointflow import ClassifierFreeGuidance, Denoiser, VPDiscrete
    from adjointflow.solvers.bespoke import model_fingerprint

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x, t, c=None):
            return self.lin(x)

    net = Net()
    lin = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    cos = torch.cumprod(1 - torch.linspace(1e-4, 0.01, 1000, dtype=torch.float64), 0)
    fp = lambda d: model_fingerprint(d)
    assert fp(Denoiser(net, VPDiscrete(lin), "eps")) != fp(Denoiser(net, VPDiscrete(cos), "eps"))
    assert fp(Denoiser(net, VPDiscrete(lin), "eps")) == fp(Denoiser(net, VPDiscrete(lin.clone()), "eps"))
    assert fp(Denoiser(net, VPDiscrete(lin), "eps", net_time=lambda t: 999 * t)) != \
        fp(Denoiser(net, VPDiscrete(lin), "eps", net_time=lambda t: 1000 * t))
    assert fp(Denoiser(ClassifierFreeGuidance(net, 2.0, 0), VPDiscrete(lin), "eps")) != \
        fp(Denoiser(ClassifierFreeGuidance(net, 7.5, 0), VPDiscrete(lin), "eps"))


def test_save_refuses_relabel_and_fit_refuses_foreign_ground_truth(tmp_path):
    import adjointflow as af
    from adjointflow.solvers.bespoke_train import ground_truth
    from adjointflow.testing import GaussianMixture

    a = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [0.5, 0.5]).denoiser(af.LinearFlow(), "velocity")
    b = GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5]).denoiser(af.LinearFlow(), "velocity")
    g = torch.Generator().manual_seed(0)
    tr, va = torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    s = af.BespokeSolver(2)
    af.fit_bespoke(a, s, tr, va, t_end=1e-2, iterations=2, progress=False, loss="rmse")
    with pytest.raises(ValueError, match="different model"):
        s.save(tmp_path / "s.pt", denoiser=b)
    gt_b = ground_truth(b, tr, 1.0, 1e-2, rtol=1e-6, atol=1e-6, points=9)
    gv_b = ground_truth(b, va, 1.0, 1e-2, rtol=1e-6, atol=1e-6, points=9)
    with pytest.raises(ValueError, match="different model"):
        af.fit_bespoke(a, af.BespokeSolver(2), gt_b, gv_b, t_end=1e-2, iterations=2, progress=False)


@pytest.mark.parametrize("n", [3, 8])
def test_scale_time_rk1_with_the_ddim_transform_is_ddim(n):
    """Independent check of the RK1 scale-time step (not a restatement of its formula): with
    s_r = alpha(t0)/alpha(t_r) and t_r such that rho = sigma/alpha is linear in r, Euler on the transformed
    ODE is DDIM (Song et al. 2021; DDIM = Euler in (x/alpha, sigma/alpha)). Euler itself differs by O(1)."""
    import adjointflow as af
    from adjointflow.testing import GaussianMixture

    F = torch.float64
    sch = af.VPLinear()
    den = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.5, 0.5]], [0.3, 0.5]).denoiser(sch, "eps")
    T0, T1 = torch.tensor(1.0, dtype=F), torch.tensor(1e-3, dtype=F)
    rho = lambda t: sch.sigma(t) / sch.alpha(t)
    r0, r1 = rho(T0), rho(T1)
    t_of = lambda r: sch.t_from_log_snr(-torch.log(r0 + r * (r1 - r0)))

    def dt_dr(r):
        t = t_of(r)
        return (r1 - r0) / (rho(t) * (sch.dlog_sigma_dt(t) - sch.dlog_alpha_dt(t)))

    s = lambda r: sch.alpha(T0) / sch.alpha(t_of(r))
    b = af.BespokeSolver.from_transform(
        n, "rk1", lambda r: (t_of(r) - T0) / (T1 - T0), lambda r: dt_dr(r) / (T1 - T0),
        s, lambda r: -s(r) * sch.dlog_alpha_dt(t_of(r)) * dt_dr(r))
    g = b.timesteps(1.0, 1e-3)
    x = torch.randn(64, 2, dtype=F, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        xb, xd, xe = (af.solve(den, x, g, solver).x for solver in (b, af.DDIM(), af.Euler()))
    assert (xb - xd).abs().max() < 1e-10
    assert (xe - xd).abs().max() > 1e-2


# --- trust: model identity, checksums, damaged files (issue 12 items 4, 5, 10) ----------------------
GLOBAL_SCALE = torch.tensor(1.0, dtype=F64)


def _scaled(x, t, scale=1.0):
    return scale * torch.tanh(x) * (1 - t[:, None])


def _reads_a_global(x, t):
    return GLOBAL_SCALE * torch.tanh(x) * (1 - t[:, None])


class _CallableNet:
    """A network that is a plain callable object (not an nn.Module)."""

    def __init__(self, w):
        self.w = w

    def __call__(self, x, t):
        return self.w * torch.tanh(x) * (1 - t[:, None])


class _NumpyNet(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = np.asarray(w, dtype=np.float64)  # a numpy attribute: not a parameter nor a buffer

    def forward(self, x, t):
        return torch.as_tensor(self.w) * torch.tanh(x) * (1 - t[:, None])


def _vden(net):
    return af.Denoiser(net, af.LinearFlow(), "velocity")


def _trained_for(den, tmp_path, name="s.pt", **kw):
    s = BespokeSolver(2, "rk1")
    g = torch.Generator().manual_seed(3)
    tr, va = (torch.randn(16, 2, generator=g, dtype=F64) for _ in range(2))
    fit_bespoke(den, s, tr, va, t_end=1e-2, iterations=2, loss="rmse", progress=False, rtol=1e-6, atol=1e-6,
                gt_points=2, **kw)
    s.save(tmp_path / name, **kw)
    return tmp_path / name


def test_fingerprint_tells_apart_networks_that_are_not_modules(tmp_path, monkeypatch):
    """functools.partial, callable objects, functions reading globals and numpy attributes are hashed by
    value: a solver saved for one model is refused for the other (on the round-1 code all four loaded)."""
    pairs = {
        "partial": (functools.partial(_scaled, scale=1.0), functools.partial(_scaled, scale=2.0)),
        "callable object": (_CallableNet(torch.tensor(1.0, dtype=F64)), _CallableNet(torch.tensor(2.0, dtype=F64))),
        "numpy attribute": (_NumpyNet([1.0, 1.0]), _NumpyNet([1.0, 2.0])),
    }
    for kind, (a, b) in pairs.items():
        assert model_fingerprint(_vden(a)) == model_fingerprint(_vden(copy.deepcopy(a))), kind  # by value, not id
        path = _trained_for(_vden(a), tmp_path, f"{kind}.pt")
        with pytest.raises(ValueError, match="different model"):
            BespokeSolver.load(path, denoiser=_vden(b))
        assert BespokeSolver.load(path, denoiser=_vden(a)).trained
    path = _trained_for(_vden(_reads_a_global), tmp_path, "global.pt")
    monkeypatch.setattr(sys.modules[__name__], "GLOBAL_SCALE", torch.tensor(2.0, dtype=F64))
    with pytest.raises(ValueError, match="different model"):
        BespokeSolver.load(path, denoiser=_vden(_reads_a_global))


def test_a_network_the_fingerprint_cannot_see_needs_a_model_id(tmp_path):
    """State held in a C object (here a torch.Generator in a closure) cannot be hashed by value: fitting,
    saving and loading refuse to claim the model unless the user names it with model_id."""
    from adjointflow.fingerprint import FingerprintGap

    gen = torch.Generator().manual_seed(0)
    w = torch.rand(2, generator=gen, dtype=F64)

    def net(x, t):
        return w * torch.tanh(x) * (1 - t[:, None]) + 0 * torch.rand(1, generator=gen, dtype=F64)

    den = _vden(net)
    with pytest.raises(FingerprintGap, match="closure variable 'gen'.*model_id"):
        model_fingerprint(den)
    with pytest.raises(ValueError, match="model_id"):
        _trained_for(den, tmp_path)
    path = _trained_for(den, tmp_path, model_id="tanh-net-v1")
    assert BespokeSolver.load(path, denoiser=den, model_id="tanh-net-v1").trained
    with pytest.raises(ValueError, match="model_id"):
        BespokeSolver.load(path, denoiser=den)
    with pytest.raises(ValueError, match="different model"):
        BespokeSolver.load(path, denoiser=den, model_id="tanh-net-v2")
    with pytest.raises(ValueError, match="model_id must be a non-empty string"):
        model_fingerprint(den, model_id="")


def _flip_byte_of(path, needle: bytes):
    data = bytearray(path.read_bytes())
    k = data.find(needle)
    assert k >= 0 and data.find(needle, k + 1) < 0
    data[k + 3] ^= 0x01
    path.write_bytes(bytes(data))


def test_saved_solver_carries_a_checksum(tmp_path, trained_rk1):
    """One flipped byte in a tensor record, or edited metadata, is a ValueError naming the file."""
    s = trained_rk1[0]
    den = den_mix()
    path = tmp_path / "solver.pt"
    s.save(path)
    _flip_byte_of(path, s.kappa.detach().numpy().tobytes())
    with pytest.raises(ValueError, match=f"{path}.*checksum"):
        BespokeSolver.load(path, denoiser=den)
    for key, value in (("base", "rk2"), ("n_steps", 3), ("state_dict", None)):
        s.save(path)
        blob = torch.load(path, weights_only=True)
        if key == "state_dict":
            blob["state_dict"]["interval"] = torch.tensor([1.0, 0.01], dtype=F64)
        else:
            blob[key] = value
        torch.save(blob, path)
        with pytest.raises(ValueError, match=f"{path}.*checksum"):
            BespokeSolver.load(path, denoiser=den)


def test_ground_truth_cache_carries_a_checksum(tmp_path):
    den, x = den_mix(), randn(16, 2, seed=31)
    path = tmp_path / "gt.pt"
    gt = ground_truth(den, x, T0, T1, points=9, cache=path)
    _flip_byte_of(path, gt.x_end.numpy().tobytes()[:64])
    with pytest.raises(ValueError, match=f"{path}.*checksum"):
        ground_truth(den, x, T0, T1, points=9, cache=path)
    ground_truth(den, x, T0, T1, points=9, cache=tmp_path / "fresh.pt")
    blob = torch.load(tmp_path / "fresh.pt", weights_only=True)
    blob["nfe"] += 1
    torch.save(blob, tmp_path / "fresh.pt")
    with pytest.raises(ValueError, match="fresh.pt.*checksum"):
        ground_truth(den, x, T0, T1, points=9, cache=tmp_path / "fresh.pt")
    torch.save({"x": x}, tmp_path / "other.pt")  # not a cache: refused, never overwritten
    with pytest.raises(ValueError, match="other.pt is not a ground-truth cache"):
        ground_truth(den, x, T0, T1, points=9, cache=tmp_path / "other.pt")


def test_damaged_files_raise_value_error_naming_the_file(tmp_path, trained_rk1):
    s, den = trained_rk1[0], den_mix()
    good = tmp_path / "good.pt"
    s.save(good)
    data = good.read_bytes()
    cases = {"truncated.pt": data[: len(data) // 2], "empty.pt": b"", "garbage.pt": b"\x00not a zip" * 10}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{tmp_path / name} is not a readable BespokeSolver file"):
            BespokeSolver.load(tmp_path / name, denoiser=den)
    blob = torch.load(good, weights_only=True)
    for key in ("n_steps", "state_dict", "sha256", "model_fingerprint"):
        torch.save({k: v for k, v in blob.items() if k != key}, tmp_path / "incomplete.pt")
        with pytest.raises(ValueError, match=f"incomplete.pt is an incomplete BespokeSolver file: '{key}'"):
            BespokeSolver.load(tmp_path / "incomplete.pt", denoiser=den)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        BespokeSolver.load(tmp_path / "missing.pt", denoiser=den)
    # parameters that do not fit, or are not finite, behind a valid checksum
    from adjointflow.fingerprint import digest

    meta = {k: blob.get(k) for k in ("format", "version", "n_steps", "base", "model_fingerprint", "info")}
    for bad in ({**blob["state_dict"], "kappa": torch.zeros(7, dtype=F64)},
                {**blob["state_dict"], "kappa": torch.full((4,), math.nan, dtype=F64)},
                {k: v for k, v in blob["state_dict"].items() if k != "sdot"}):
        torch.save({**blob, "state_dict": bad, "sha256": digest(meta, bad)}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match="bad.pt: the saved parameters"):
            BespokeSolver.load(tmp_path / "bad.pt", denoiser=den)


def test_demo_skips_a_damaged_bundled_solver_with_a_one_line_note(tmp_path, monkeypatch):
    """A truncated bundled bespoke file does not abort the demo: that solver is skipped with one line."""
    from adjointflow.demo import bespoke_digits
    from adjointflow.demo.run import DemoConfig, run_demo

    nfe = sorted(bespoke_digits.BUNDLED)[0]
    src = bespoke_digits.bundled_path(nfe)
    damaged = tmp_path / "bundle"
    damaged.mkdir()
    data = src.read_bytes()
    bespoke_digits.bundled_path(nfe, damaged).write_bytes(data[: len(data) - 200])
    monkeypatch.setattr(bespoke_digits, "BUNDLE_DIR", damaged)
    cfg = DemoConfig(n_samples=1, nfes=(nfe,), grids=("uniform",), sde_ref_steps=4, n_inverse=1, n_show=1,
                     guidance_steps=2, dflow_iterations=1, adjoint_iterations=1, measure_memory=False)
    res = run_demo(out_dir=tmp_path / "out", config=cfg, progress=False)
    skipped = [n for n in res.notes if n.startswith("BespokeSolver")]
    assert len(skipped) == 1 and "\n" not in skipped[0], res.notes
    assert f"NFE {nfe}: skipped" in skipped[0] and "not a readable BespokeSolver file" in skipped[0]
    assert not any(r.name.startswith("BespokeSolver") for r in res.sample_runs)
    assert (tmp_path / "out" / "results.md").is_file()


# --- the bundled digits solvers ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_heldout():
    """The digits model and 10 latents (labels 0-9) no bundled solver was trained or validated on,
    with their dopri5 solutions at 1e-6."""
    from adjointflow.demo import bespoke_digits as B
    from adjointflow.demo.run import load_denoiser

    den = load_denoiser()[0]
    x, y = B._latents(10, 4242)
    return den, ground_truth(den, x, B.T_START, B.T_END, cond=y, rtol=1e-6, atol=1e-6, points=2)


def _generic_errors_within(den, gt, nfe, t0, t1):
    """RMSE of every deterministic solver of the demo table, on its grid kinds, within ``nfe`` evaluations
    (every grid kind and solver variant: benchmarks/test_bench_bespoke.py)."""
    from adjointflow.demo.run import FULL
    from adjointflow.demo.sampling import discover_solvers

    out = {}
    for spec in discover_solvers()[0]:
        if spec.solver.stochastic:
            continue
        for kind in FULL.grids:
            steps = nfe // spec.solver.nfe_per_step
            while steps >= 1:
                try:
                    grid = af.timesteps(den.schedule, steps, kind, t_start=t0, t_end=t1)
                except ValueError:
                    break
                with torch.no_grad():
                    sol = af.solve(den, gt.x_start, grid, spec.solver, cond=gt.cond)
                if sol.nfe <= nfe:
                    out[spec.name, kind] = rmse(sol.x, gt.x_end)
                    break
                steps -= 1
    return out


@pytest.mark.parametrize("nfe", [5, 10, 20])
def test_bundled_solver_loads_and_beats_every_generic_solver(digits_heldout, nfe):
    """The bundled solver for ``nfe`` loads (fingerprint and checksum verified), spends at most ``nfe``
    evaluations and is more accurate on held-out latents than every generic solver on every grid of the
    demo table at that budget."""
    from adjointflow.demo import bespoke_digits as B

    den, gt = digits_heldout
    assert set(B.BUNDLED) == {5, 10, 20}
    s = B.load_bundled_bespoke(den, nfe)
    assert s.trained and s.n_steps * s.nfe_per_step <= nfe
    assert B.bundled_path(nfe).stat().st_size < 16_000
    with torch.no_grad():
        err = rmse(af.solve(den, gt.x_start, s.timesteps(), s, cond=gt.cond).x, gt.x_end)
    generic = _generic_errors_within(den, gt, nfe, B.T_START, B.T_END)
    best = min(generic, key=generic.get)
    print(f"\nNFE {nfe}: bespoke {s.base} x {s.n_steps} {err:.4f}, best generic {best} {generic[best]:.4f}")
    assert len(generic) >= 10 and err < generic[best], (nfe, err, best, generic[best])


def test_bundled_solvers_refuse_another_model(digits_heldout):
    from adjointflow.demo import bespoke_digits as B

    den, _ = digits_heldout
    other = af.Denoiser(den.net, af.LinearFlow(), "velocity", net_time=lambda t: 0.5 * t)
    for nfe in B.BUNDLED:
        with pytest.raises(ValueError, match="different model"):
            B.load_bundled_bespoke(other, nfe)


# --- the non-stationary bespoke solver ---------------------------------------------------------------
NS_GENERIC = [af.Euler(), af.DDIM(), af.UniPC(order=3), af.UniPC(order=2, variant="bh1", corrector=False),
              af.DPMSolverPP(order=2)]


@pytest.mark.parametrize("kind", ["uniform", "quadratic"])
def test_ns_from_solver_is_that_solver(kind):
    """Every one-evaluation-per-step linear solver is a BespokeNSSolver: the read-off coefficients give
    the same samples to rounding (float64), on the mixture's nonlinear drift."""
    den, x = den_mix(), randn(64, 2, seed=3)
    grid = af.timesteps(den.schedule, 5, kind, t_start=T0, t_end=T1)
    for solver in NS_GENERIC:
        ns = af.BespokeNSSolver.from_solver(solver, 5, den.schedule, T0, T1, kind)
        assert torch.allclose(ns.timesteps(), grid, rtol=0, atol=1e-14)
        with torch.no_grad():
            ref, got = af.solve(den, x, grid, solver).x, af.solve(den, x, ns.timesteps(), ns).x
        assert float((got - ref).abs().max()) < 1e-12, solver
    fresh = af.BespokeNSSolver(5)  # the identity: Euler on the uniform grid
    with torch.no_grad():
        e = af.solve(den, x, fresh.timesteps(T0, T1), af.Euler()).x
        assert float((af.solve(den, x, fresh.timesteps(T0, T1), fresh).x - e).abs().max()) < 1e-13


def test_ns_refusals(tmp_path, mix_data):
    den, (tr, va, te) = mix_data
    for solver, msg in ((af.Heun(), "10 evaluations for 5 steps"),
                        (af.DPMSolverPP(order=2, multistep=False), "evaluations for 5 steps"),
                        (af.SDEDPMSolverPP(order=1), "deterministic generic Solver"),
                        (BespokeSolver(5, "rk1"), "deterministic generic Solver")):
        with pytest.raises(ValueError, match=msg):
            af.BespokeNSSolver.from_solver(solver, 5, den.schedule, T0, T1)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="nfe must be a positive int"):
            af.BespokeNSSolver.for_nfe(bad)
    assert af.BespokeNSSolver.for_nfe(5).n_steps == 5  # any NFE, odd ones too
    with pytest.raises(ValueError, match="BespokeNSSolver has base='ns'"):
        af.BespokeNSSolver(3, base="rk2")
    with pytest.raises(ValueError, match="NFE 5 is not achievable with base='rk2'.*or BespokeNSSolver"):
        BespokeSolver.for_nfe(5, "rk2")
    ns = af.BespokeNSSolver.from_solver(af.UniPC(order=2), 3, den.schedule, T0, T1)
    with pytest.raises(ValueError, match="loss='bound' needs a one-step"):
        fit_bespoke(den, af.BespokeNSSolver(3), tr, va, loss="bound", iterations=1, progress=False)
    with pytest.raises(ValueError, match="init has n_steps=3.*from_solver"):
        fit_bespoke(den, af.BespokeNSSolver(4), tr, va, init=_trained_copy(ns, den), iterations=1, progress=False)
    with pytest.raises(ValueError, match="init has base='rk1'.*base='ns'"):
        fit_bespoke(den, af.BespokeNSSolver(4), tr, va, init=_trained_copy(BespokeSolver(4, "rk1"), den),
                    iterations=1, progress=False)
    with pytest.raises(ValueError, match="no continuous-adjoint step"):
        af.solve(den, randn(4, 2).requires_grad_(), ns.timesteps(), ns, gradient=af.ContinuousAdjoint()).x.sum().backward()
    ns.save(tmp_path / "ns.pt", den)
    with pytest.raises(ValueError, match="base='ns' solver: load it with BespokeNSSolver.load"):
        BespokeSolver.load(tmp_path / "ns.pt", denoiser=den)
    _trained_copy(BespokeSolver(3, "rk2"), den).save(tmp_path / "rk2.pt", den)
    with pytest.raises(ValueError, match="base='rk2' solver: load it with BespokeSolver.load"):
        af.BespokeNSSolver.load(tmp_path / "rk2.pt", denoiser=den)


def _trained_copy(solver, den):
    s = copy.deepcopy(solver)
    with torch.no_grad():
        s.interval.copy_(torch.tensor([T0, T1], dtype=F64))
    s.model_fingerprint = model_fingerprint(den)
    return s


def test_ns_loss_gradient_matches_finite_differences(small_gt):
    den = den_mix()
    s = af.BespokeNSSolver.from_solver(af.UniPC(order=2), 4, den.schedule, T0, T1)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=F64))
    assert_loss_gradient_is_central_difference(s, den, small_gt, "rmse")
    assert float(s.beta.grad.triu(1).abs().max()) == 0.0  # the unused upper triangle gets no gradient


def test_ns_training_improves_on_its_start_and_round_trips(tmp_path, mix_data):
    den, (tr, va, te) = mix_data
    s = af.BespokeNSSolver.from_solver(af.UniPC(order=3), 4, den.schedule, T0, T1)
    err = lambda solver: rmse(af.solve(den, te.x_start, solver.timesteps(), solver).x, te.x_end)
    with torch.no_grad():
        start = err(s)
    hist = fit_bespoke(den, s, tr, va, iterations=20, batch_size=1024, progress=False)
    with torch.no_grad():
        trained = err(s)
    print(f"\nNS NFE 4 from UniPC-3: held-out {start:.4f} -> {trained:.4f} ({hist.seconds:.1f} s)")
    assert trained < 0.5 * start
    s.save(tmp_path / "ns.pt", den)
    back = af.BespokeNSSolver.load(tmp_path / "ns.pt", denoiser=den, n_steps=4)
    with torch.no_grad():
        assert err(back) == trained
