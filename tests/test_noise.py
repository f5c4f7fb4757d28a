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


# --- one seed, one path: the answer does not depend on what was queried before ----------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_times = st.one_of(st.floats(0.0, 1.0, allow_nan=False), st.integers(0, 64).map(lambda k: k / 64))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), pairs=st.lists(st.tuples(_times, _times), min_size=1, max_size=6),
       warmup=st.lists(st.tuples(_times, _times), max_size=6), order=st.randoms(use_true_random=False))
def test_increments_do_not_depend_on_the_query_order(seed, pairs, warmup, order):
    """Two fresh objects with one seed: the second sees other queries first and the pairs shuffled, yet
    every increment is bit-identical (the path is a function of seed and shape only)."""
    a = BrownianNoise((3, 2), seed=seed, dtype=torch.float64)
    first = [a(s, t) for s, t in pairs]
    b = BrownianNoise((3, 2), seed=seed, dtype=torch.float64)
    for s, t in warmup:
        b(s, t)
    idx = list(range(len(pairs)))
    order.shuffle(idx)
    for i in idx:
        s, t = pairs[i]
        assert torch.equal(b(s, t), first[i]), (pairs[i], warmup)


def test_fine_queries_first_leave_the_coarse_path_unchanged():
    """The reported failure: on a fresh object, a fine solve's queries followed by a coarse SDE solve must
    give the coarse solve alone (it differed by up to 2.8), and the coarse increments are sums of fine ones."""
    from adjointflow import EulerMaruyama, VPLinear, solve, timesteps
    from adjointflow.testing import GaussianData

    sch = VPLinear()
    d = GaussianData(torch.linspace(-1.0, 1.0, 4, dtype=torch.float64), torch.full((4,), 0.6, dtype=torch.float64))
    den = d.denoiser(sch, "eps")
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coarse, fine = timesteps(sch, 10, "uniform", t_start=1.0, t_end=0.02), timesteps(sch, 37, t_start=0.9, t_end=0.01)
    with torch.no_grad():
        alone = solve(den, x, coarse, EulerMaruyama(), noise=BrownianNoise(x.shape, seed=4, dtype=torch.float64)).x
        noise = BrownianNoise(x.shape, seed=4, dtype=torch.float64)
        solve(den, x, fine, EulerMaruyama(), noise=noise)
        after = solve(den, x, coarse, EulerMaruyama(), noise=noise).x
    assert torch.equal(after, alone)
    g = [float(t) for t in timesteps(sch, 40, "uniform", t_start=1.0, t_end=0.02)]
    n = BrownianNoise((5,), seed=9, dtype=torch.float64)
    fine_sum = sum(n(g[i], g[i + 1]) for i in range(4))
    assert torch.allclose(BrownianNoise((5,), seed=9, dtype=torch.float64)(g[0], g[4]), fine_sum, atol=1e-13)


def test_dyadic_tree_values_and_bridge_variance():
    """W(1) ~ N(0, 1); the midpoint given the ends is the Brownian bridge N((W0 + W1)/2, 1/4)."""
    n = BrownianNoise((40000,), seed=1, dtype=torch.float64)
    w1, wh = n(0.0, 1.0), n(0.0, 0.5)
    assert abs(float(w1.var()) - 1.0) < 0.03
    resid = wh - 0.5 * w1
    assert abs(float(resid.var()) - 0.25) < 0.01 and abs(float(resid.mean())) < 0.01
    assert abs(float((resid * w1).mean())) < 0.02  # the bridge noise is independent of W(1)
    # disjoint increments are uncorrelated, also off the dyadic points (inside the finest cells)
    # (steps far above the finest cell, 2^-30 ~ 9e-10, below which the path is linear)
    u, v = n(0.1234567891, 0.3), n(0.3, 0.3000017)
    assert abs(float((u * v).mean()) / (0.1765432109 * 1.7e-6) ** 0.5) < 0.03
    assert abs(float(v.var()) / 1.7e-6 - 1.0) < 0.03


def test_seed_and_interval_are_checked():
    with pytest.raises(ValueError, match="seed"):
        BrownianNoise((2,), seed=-1)
    with pytest.raises(ValueError, match="t0 < t1"):
        BrownianNoise((2,), t0=1.0, t1=0.0)
    n = BrownianNoise((2,), seed=0, dtype=torch.float64, t0=-1.0, t1=3.0)
    assert torch.allclose(n(-1.0, 1.0) + n(1.0, 3.0), n(-1.0, 3.0), atol=1e-14)


def test_caches_do_not_change_the_path(monkeypatch):
    """Without the descent and value caches (as for very large shapes) the increments are the same bits."""
    times = [1.0, 0.73, 0.5, 0.31, 0.3, 0.125, 0.01, 0.3, 0.73]
    cached = BrownianNoise((4,), seed=7, dtype=torch.float64)
    a = [cached(s, t) for s, t in zip(times[:-1], times[1:])]
    monkeypatch.setattr(BrownianNoise, "_path_bytes", 0)
    monkeypatch.setattr(BrownianNoise, "_cache_bytes", 0)
    bare = BrownianNoise((4,), seed=7, dtype=torch.float64)
    assert not bare._keep_path
    for (s, t), w in zip(zip(times[:-1], times[1:]), a):
        assert torch.equal(bare(s, t), w)
    w = bare(0.5, 0.25)
    w.add_(1.0)  # the caller owns the returned tensor: the cached values are unchanged
    assert torch.equal(bare(0.5, 0.25), cached(0.5, 0.25))
