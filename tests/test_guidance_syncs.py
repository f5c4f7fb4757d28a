"""The step-by-step guidance samplers make no host-device synchronisation per step: the number of syncs of a
run (counted as in tests/test_syncs.py) is the same at 10 and at 40 steps, on a VP and a flow path, without a
callback and with the progress bar off, not yet shown (the default delayed bar) or shown (its postfix reads
the loss at most every POSTFIX_INTERVAL_S). NaN/Inf are still reported with the step and time where they
first appeared, though checked once at the end of the run (or before each callback)."""
import math

import pytest
import torch

import adjointflow as af
import adjointflow.guidance.base as guidance_base
from adjointflow.errors import NonFiniteError
from torch.overrides import TorchFunctionMode

from adjointflow.guidance import (DDRM, DPS, DiffPIR, Downsample, FlowChef, FlowDPS, GaussianBlur, Inpaint, LanPaint,
                                  MatrixOperator, MeasurementLoss, PiGDM)
from adjointflow.testing import GaussianData

from test_syncs import Syncs

#: Python-level reads of a tensor on the host; on CPU ``.cpu()``/``.tolist()``/``.numpy()`` do not dispatch to the
#: ops ``Syncs`` counts, so they are counted here too
HOST_READS = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.__bool__,
              torch.Tensor.__float__, torch.Tensor.__int__}


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.n += 1
        return func(*args, **(kwargs or {}))

D = torch.float64
PATHS = {"vp": (af.VPLinear(), "eps"), "flow": (af.LinearFlow(), "velocity")}
METHODS = {
    "DPS": DPS, "FlowChef": FlowChef, "DiffPIR": DiffPIR, "PiGDM": PiGDM, "DDRM": DDRM, "FlowDPS": FlowDPS,
    "LanPaint": LanPaint,
    # the other branches of the loops: a first-order solver without noise, rule='score' (host weights),
    # Adam with several iterations and a guidance window, the posterior-mean stop level
    "DPS-score-Euler": lambda **kw: DPS(solver=af.Euler(), rule="score", **kw),
    "FlowChef-adam-window": lambda **kw: FlowChef(optimizer="adam", iterations=2, window=(0.0, 0.6), **kw),
    "DDRM-stop": lambda **kw: DDRM(stop=0.3, **kw),
    "DiffPIR-stop": lambda **kw: DiffPIR(stop=0.3, **kw),
}


def _inpaint():
    mask = torch.ones(1, 4, 4, dtype=D)
    mask[..., ::2] = 0
    return Inpaint(mask)


#: operators with a closed-form SVD (what DDRM/PiGDM/DiffPIR use), on samples of shape (1, 4, 4)
OPERATORS = {"Inpaint": _inpaint, "Downsample": lambda: Downsample(2), "GaussianBlur": lambda: GaussianBlur(1.0, 3),
             "MatrixOperator": lambda: MatrixOperator(torch.randn(6, 16, generator=torch.Generator().manual_seed(1),
                                                                  dtype=D), input_shape=(1, 4, 4))}


def problem(path, operator=None):
    """8-D Gaussian data and an Inpaint of every other entry, or, with ``operator``, 1x4x4 samples and that
    operator (of ``OPERATORS``)."""
    schedule, prediction = PATHS[path]
    shape = (8,) if operator is None else (1, 4, 4)
    data = GaussianData(torch.zeros(shape, dtype=D), torch.full(shape, 0.5, dtype=D))
    g = torch.Generator().manual_seed(0)
    if operator is None:
        mask = torch.ones(8, dtype=D)
        mask[::2] = 0
        op = Inpaint(mask)
    else:
        op = OPERATORS[operator]()
    obj = MeasurementLoss(op, op(0.5 * torch.randn(2, *shape, generator=g, dtype=D)), sigma=0.1)
    return data.denoiser(schedule, prediction), obj, torch.randn(2, *shape, generator=g, dtype=D)


def syncs(method, path, steps, operator=None, **kw):
    """(syncs, host reads) of one run."""
    den, obj, x = problem(path, operator)
    if method == "DPS-score-Euler" and path == "flow":
        kw["grid"] = af.timesteps(den.schedule, steps, t_start=0.999)  # g^2 is infinite at t = 1
    with Syncs() as c, HostReads() as r:
        res = METHODS[method](steps=steps, **kw).run(den, obj, x)
    assert res.losses.shape[0] >= steps and bool(torch.isfinite(res.losses).all())
    return c.n, r.n


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("method", list(METHODS))
def test_sync_count_does_not_grow_with_steps(method, path):
    counts = [syncs(method, path, n, progress=False) for n in (10, 40)]
    assert counts[0] == counts[1], f"{method} on {path}: (syncs, host reads) {counts[0]} at 10 steps, {counts[1]} at 40"


@pytest.mark.parametrize("operator", list(OPERATORS))
@pytest.mark.parametrize("method", ["DPS", "DDRM", "PiGDM", "DiffPIR"])
def test_sync_count_does_not_grow_with_steps_for_every_svd_operator(method, operator):
    counts = [syncs(method, "vp", n, operator, progress=False) for n in (10, 40)]
    assert counts[0] == counts[1], f"{method} with {operator}: {counts[0]} at 10 steps, {counts[1]} at 40"


def test_operator_constants_are_made_once_per_dtype_and_device():
    """What a step reads from an operator is cast to the sample's dtype/device once, not at every call (on a GPU
    a host-to-device copy per step synchronises; the CPU counters above cannot see it)."""
    x = torch.randn(2, 1, 4, 4, dtype=torch.float32)
    inp, down, blur, mat = (OPERATORS[k]() for k in OPERATORS)
    assert inp._m(x) is inp._m(x)
    assert down._householder(x) is down._householder(x)
    assert blur.transfer((4, 4), x.dtype, x.device) is blur.transfer((4, 4), x.dtype, x.device)
    assert mat._factors(x) is mat._factors(x)
    loss = MeasurementLoss(mat, mat(x.double()), sigma=0.1)
    assert loss._y_like(mat(x)) is loss._y_like(mat(x))
    # the operator and the loss keep their own copies: changing the caller's tensors later changes nothing
    m = torch.ones(1, 4, 4, dtype=D)
    op = Inpaint(m)
    m.zero_()
    assert bool((op.mask == 1).all())


@pytest.mark.parametrize("method", ["DPS", "DDRM"])
def test_progress_bar_reads_the_loss_only_while_shown_and_rarely(method, monkeypatch, capsys):
    # the default bar, not shown yet (a run shorter than its delay): nothing read for it
    monkeypatch.setattr(guidance_base, "PROGRESS_DELAY_S", 1e9)
    off = [syncs(method, "vp", n, progress=False)[0] for n in (10, 40)]
    assert [syncs(method, "vp", n)[0] for n in (10, 40)] == off
    assert capsys.readouterr().err == ""
    # a bar on screen: the postfix reads the loss once per POSTFIX_INTERVAL_S (here: once per run)
    monkeypatch.setattr(guidance_base, "POSTFIX_INTERVAL_S", 1e9)
    assert [syncs(method, "vp", n, progress=True)[0] for n in (10, 40)] == [off[0] + 1] * 2
    assert method in capsys.readouterr().err


def test_shown_bar_displays_the_latest_loss_read(capsys):
    with guidance_base.RunMonitor("X", 3, progress=True) as mon:
        mon.record(0, torch.tensor([1.0, 2.0]), torch.zeros(2, 1))
        mon._bar.refresh()
    assert "loss=1.5" in capsys.readouterr().err


class NaNAt:
    """The exact network with NaN output at the grid time ``t_bad`` (chosen on the device, no host read);
    optionally raising ``raise_at_t`` (an exception) at the time ``t_raise``."""

    def __init__(self, den, t_bad, t_raise=None, exc=None):
        self.den, self.t_bad, self.t_raise, self.exc = den, t_bad, t_raise, exc

    def __call__(self, x, t):
        if self.t_raise is not None and abs(float(t[0]) - self.t_raise) < 1e-12:
            raise self.exc
        out = self.den.net(x, t)
        return torch.where((t - self.t_bad).abs()[:, None] < 1e-12, math.nan, out)


def nan_denoiser(den, t_bad, **kw):
    return af.Denoiser(NaNAt(den, t_bad, **kw), den.schedule, den.prediction)


def test_dps_update_nan_names_its_step_and_time():
    den, obj, x = problem("vp")
    times = af.timesteps(den.schedule, 10).tolist()

    class BadNoise:  # a Brownian increment that is NaN on step 6 only: the loss there is still finite
        shape, dtype, device = tuple(x.shape), x.dtype, x.device

        def __call__(self, t, t_next):
            return torch.full(self.shape, math.nan if t == times[6] else 0.0, dtype=D)

    with pytest.raises(NonFiniteError, match=rf"the DPS update produced NaN/Inf at step 6 \(t={times[6]:.6g}\); "
                                             "try a smaller scale") as e:
        DPS(steps=10, noise=BadNoise(), progress=False).run(den, obj, x)
    assert e.value.step == 6 and e.value.t == times[6]


@pytest.mark.parametrize("method", ["DPS", "FlowChef", "FlowDPS", "DDRM"])
def test_objective_nan_names_its_step_and_time(method):
    den, obj, x = problem("flow")
    times = af.timesteps(den.schedule, 10).tolist()

    class Bad(MeasurementLoss):  # a measurement loss (DDRM needs its operator), NaN from step 3 on
        time_dependent = True

        def __call__(self, x0, t=None):  # t: a grid time (None: the run's input check and its final estimate)
            loss = super().__call__(x0)
            return loss if t is None else loss * torch.where(t < times[2] - 1e-9, math.nan, 1.0)

    bad = Bad(obj.operator, obj.y, obj.sigma)
    with pytest.raises(NonFiniteError, match=rf"the objective returned NaN/Inf at step 3 \(t={times[3]:.6g}\)") as e:
        METHODS[method](steps=10, progress=False).run(den, bad, x)
    assert e.value.step == 3 and e.value.t == times[3]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("method", ["DDRM", "LanPaint", "DPS"])
def test_model_nan_names_the_first_bad_step(method, path):
    den, obj, x = problem(path)
    times = af.timesteps(den.schedule, 10).tolist()
    # DPS evaluates the objective at the model's estimate first; the decomposition samplers update first
    first = "the objective returned" if method == "DPS" else f"the {method} update produced"
    with pytest.raises(NonFiniteError, match=rf"{first} NaN/Inf at step 4 \(t={times[4]:.6g}\)") as e:
        METHODS[method](steps=10, progress=False).run(nan_denoiser(den, times[4]), obj, x)
    assert e.value.step == 4 and e.value.t == times[4]


@pytest.mark.parametrize("exc", [RuntimeError("later failure"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_an_earlier_nan_is_reported_before_a_later_error_or_ctrl_c(exc):
    # checked at the end, a NaN at step 4 would otherwise be hidden by what happens at step 7
    den, obj, x = problem("vp")
    times = af.timesteps(den.schedule, 10).tolist()
    bad = nan_denoiser(den, times[4], t_raise=times[7], exc=exc)
    with pytest.raises(NonFiniteError, match=rf"the DDRM update produced NaN/Inf at step 4 \(t={times[4]:.6g}\)"):
        DDRM(steps=10, progress=False).run(bad, obj, x)
    # without the NaN the run behaves as before: the error propagates, Ctrl-C returns the result so far
    ok = af.Denoiser(NaNAt(den, math.inf, t_raise=times[7], exc=exc), den.schedule, den.prediction)
    if isinstance(exc, KeyboardInterrupt):
        res = DDRM(steps=10, progress=False).run(ok, obj, x)
        assert res.interrupted and res.losses.shape[0] == 8
    else:
        with pytest.raises(RuntimeError, match="later failure"):
            DDRM(steps=10, progress=False).run(ok, obj, x)


@pytest.mark.parametrize("method", ["DPS", "PiGDM"])
def test_a_callback_never_sees_a_bad_step(method):
    den, obj, x = problem("vp")
    times = af.timesteps(den.schedule, 10).tolist()
    seen = []
    with pytest.raises(NonFiniteError, match=rf"at step 4 \(t={times[4]:.6g}\)"):
        METHODS[method](steps=10, progress=False, callback=lambda s: seen.append((s.iteration, s.t))).run(
            nan_denoiser(den, times[4]), obj, x)
    assert seen == [(i, times[i]) for i in range(4)]
