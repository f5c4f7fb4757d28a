"""The demo's set-up behaviour: missing extras reported at once, torch's thread count left as found."""
import importlib.util

import pytest
import torch

from adjointflow.demo import run as demo_run


def _hide(monkeypatch, *modules):
    real = importlib.util.find_spec
    monkeypatch.setattr(demo_run.importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def test_missing_extras_are_named_together_with_the_install_command(monkeypatch, tmp_path):
    _hide(monkeypatch, "matplotlib", "sklearn")
    with pytest.raises(ImportError) as info:
        demo_run.run_demo(out_dir=tmp_path / "out", quick=True, progress=False)
    msg = str(info.value)
    assert "scikit-learn" in msg and "matplotlib" in msg and "safetensors" not in msg
    assert "pip install 'adjointflow[demo]'" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()  # nothing ran before the check


def test_cli_prints_the_one_line_message(monkeypatch, capsys, tmp_path):
    from adjointflow.cli import main

    _hide(monkeypatch, "safetensors", "matplotlib", "sklearn")
    found = torch.get_num_threads()
    try:
        assert main(["demo", "--quick", "--out", str(tmp_path / "o")]) == 1
    finally:
        torch.set_num_threads(found)  # the command line sets one thread, as documented
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "safetensors, scikit-learn, matplotlib" in err[0] and "adjointflow[demo]" in err[0]


def test_all_extras_present_passes():
    demo_run.check_demo_extras()  # the test environment installs the demo extras


def test_torch_threads_restores_the_count_even_on_error():
    found = torch.get_num_threads()
    other = 1 if found != 1 else 2
    with demo_run.torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == found
    with pytest.raises(RuntimeError):
        with demo_run.torch_threads(other):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == found
    with demo_run.torch_threads(None):
        assert torch.get_num_threads() == found


def test_harmonic_fill_is_exact_on_a_harmonic_image_and_keeps_observed_pixels():
    from adjointflow.demo.baselines import harmonic_fill

    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramp = (0.1 * xx - 0.05 * yy + 0.3)[None, None].double()  # linear: discrete-harmonic inside
    mask = torch.ones(16, 16)
    mask[4:12, 4:12] = 0
    torch.testing.assert_close(harmonic_fill(ramp * mask, mask), ramp, rtol=0, atol=1e-5)
    noisy = ramp + 0.1 * torch.randn(ramp.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = harmonic_fill(noisy * mask, mask)
    assert torch.equal(out[..., mask.bool()], noisy[..., mask.bool()])


def test_bicubic_baseline_keeps_constants_and_beats_nearest_on_smooth_images():
    from adjointflow.demo.baselines import bicubic_upsample, classical_estimate
    from adjointflow.guidance import Downsample, Inpaint

    c = torch.full((2, 1, 8, 8), 0.3)
    torch.testing.assert_close(bicubic_upsample(c, 2), torch.full((2, 1, 16, 16), 0.3))
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 16), torch.linspace(0, 3, 16), indexing="ij")
    img = torch.sin(xx + 0.5 * yy)[None, None]
    op = Downsample(2)
    label, est = classical_estimate(op, op(img))
    assert label == "classical: bicubic"
    assert float((est - img).pow(2).mean()) < 0.5 * float((op.pinv(op(img)) - img).pow(2).mean())
    assert classical_estimate(Inpaint(torch.ones(16, 16)), img)[0] == "classical: harmonic fill"


def test_quick_help_says_what_quick_runs():
    from adjointflow.cli import build_parser

    d = demo_run.QUICK.describe()
    assert f"NFE {'/'.join(map(str, demo_run.QUICK.nfes))}" in d and f"{demo_run.QUICK.n_inverse} digits" in d
    sub = build_parser()._subparsers._group_actions[0].choices["demo"]
    helps = " ".join(a.help or "" for a in sub._actions if "--quick" in a.option_strings)
    assert " ".join(d.split()) in " ".join(helps.split())


def test_non_monotone_errors_get_a_note():
    from types import SimpleNamespace

    from adjointflow.schedules import LinearFlow

    runs = [SimpleNamespace(name="DPMSolverPP(order=3)", grid="uniform", nfe_target=n, steps=s, rmse=e, stochastic=False)
            for n, s, e in ((5, 5, 0.04), (10, 10, 0.017), (20, 20, 0.097))]
    notes = demo_run._non_monotone_notes(runs, LinearFlow(), demo_run.FULL)
    assert len(notes) == 1 and "NFE 10 to 20" in notes[0] and "in lambda" in notes[0]
    runs[-1].rmse = 0.01
    assert demo_run._non_monotone_notes(runs, LinearFlow(), demo_run.FULL) == []
