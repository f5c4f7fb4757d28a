"""Hypothesis strategies for property tests of solvers (import into your own test-suite).

Example::

    from hypothesis import given
    from adjointflow.testing.strategies import schedules, shapes

    @given(schedules(), shapes())
    def test_my_property(schedule, shape): ...
"""
from __future__ import annotations

from hypothesis import strategies as st

from ..models import PREDICTIONS
from ..schedules import EDM, VE, LinearFlow, VPCosine, VPLinear

__all__ = ["schedules", "predictions", "shapes", "grids", "times"]


def schedules(flow: bool = True):
    """Continuous schedules with randomised parameters (VPLinear, VPCosine, VE, EDM and, if ``flow``, LinearFlow)."""
    options = [
        st.builds(VPLinear, beta_min=st.floats(0.05, 0.5), beta_max=st.floats(5.0, 25.0)),
        st.builds(VPCosine, s=st.floats(0.001, 0.02)),
        st.builds(VE, sigma_min=st.floats(0.005, 0.05), sigma_max=st.floats(10.0, 100.0)),
        st.builds(EDM, sigma_min=st.floats(0.001, 0.01), sigma_max=st.floats(20.0, 100.0), rho=st.floats(3.0, 9.0)),
    ]
    if flow:
        options.append(st.just(LinearFlow()))
    return st.one_of(*options)


def predictions():
    """Any supported prediction type."""
    return st.sampled_from(PREDICTIONS)


def shapes(max_batch: int = 4, max_dims: int = 3, max_side: int = 4):
    """State shapes ``(batch, *dims)`` with 1..max_dims trailing dimensions."""
    return st.tuples(
        st.integers(1, max_batch), st.lists(st.integers(1, max_side), min_size=1, max_size=max_dims)
    ).map(lambda bd: (bd[0], *bd[1]))


def times(lo: float = 0.02, hi: float = 0.98):
    """Interior times where every schedule is regular."""
    return st.floats(lo, hi, allow_nan=False)


@st.composite
def grids(draw, schedule=None, min_steps: int = 1, max_steps: int = 20):
    """Valid decreasing sampling grids for ``schedule`` (any kind)."""
    from ..grids import GRID_KINDS, timesteps

    sch = draw(schedules()) if schedule is None else schedule
    n = draw(st.integers(min_steps, max_steps))
    kind = draw(st.sampled_from(GRID_KINDS))
    t_start = draw(st.floats(0.5, min(0.99, sch.t_start)))
    t_end = draw(st.floats(0.002, 0.2))
    return timesteps(sch, n, kind, t_start=t_start, t_end=t_end)
