"""The command line (``python -m adjointflow``) and the demo's pieces on a few images."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adjointflow import cli
from adjointflow.demo.digits import DEFAULT_WEIGHTS

HAVE_WEIGHTS = DEFAULT_WEIGHTS.is_file()
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="the committed digits weights are missing")


def run_cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "adjointflow", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_help_lists_the_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for sub in ("demo", "train-digits", "bench"):
        assert sub in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, needle", [
    (["frobnicate"], "invalid choice"),
    ([], "required"),
    (["demo", "--nfe", "3"], "unrecognized arguments"),
    (["train-digits", "--steps", "0"], "positive integer"),
    (["train-digits", "--lr", "fast"], "positive"),
    (["train-digits", "--lr", "inf"], "finite"),
])
def test_bad_arguments_exit_nonzero_with_a_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def _one_line_error(capsys, argv):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "error:" in err
    return err


def test_missing_weights_path_is_a_clear_error(capsys, tmp_path):
    err = _one_line_error(capsys, ["demo", "--weights", str(tmp_path / "nope.safetensors"), "--out",
                                   str(tmp_path / "o")])
    assert "weights not found" in err and "nope.safetensors" in err


def test_directory_without_weights_names_the_training_command(capsys, tmp_path):
    err = _one_line_error(capsys, ["demo", "--weights", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "digits_flow.safetensors" in err and "train-digits" in err


@needs_weights
def test_corrupt_weights_are_refused(capsys, tmp_path):
    import shutil

    shutil.copy(DEFAULT_WEIGHTS, tmp_path / "digits_flow.safetensors")
    with open(tmp_path / "digits_flow.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    err = _one_line_error(capsys, ["demo", "--weights", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "sha256" in err


def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert "not a directory" in _one_line_error(capsys, ["demo", "--out", str(f)])
    assert "not a directory" in _one_line_error(capsys, ["train-digits", "--out", str(f)])


def test_bench_runs_pytest_benchmarks_with_this_python(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd=None: calls.append((cmd, cwd)) or 0)
    assert cli.main(["bench", "-k", "euler"]) == 0
    (cmd, cwd), = calls
    assert cmd[:3] == [sys.executable, "-m", "pytest"]
    assert Path(cmd[3]).name == "benchmarks" and "--benchmark-only" in cmd and cmd[-2:] == ["-k", "euler"]


def test_train_digits_writes_weights_into_out(tmp_path, capsys):
    assert cli.main(["train-digits", "--out", str(tmp_path), "--steps", "2", "--batch", "4", "--log-every", "1",
                     "--no-progress"]) == 0
    assert sorted(f.name for f in tmp_path.iterdir()) == ["digits_flow.safetensors"]  # the one file it writes
    assert "wrote" in capsys.readouterr().out
    # existing weights (e.g. the bundled model) are never overwritten silently
    assert "--force" in _one_line_error(capsys, ["train-digits", "--out", str(tmp_path), "--steps", "2"])
    assert cli.main(["train-digits", "--out", str(tmp_path), "--steps", "2", "--batch", "4", "--log-every", "1",
                     "--no-progress", "--force"]) == 0


# --- the demo's pieces -------------------------------------------------------------------------
def test_psnr_and_strip():
    from adjointflow.demo.report import psnr, strip

    x = torch.zeros(3, 1, 4, 4)
    # offset 0.2 in [-1, 1]: MSE 0.04, peak-to-peak 2 -> 10 log10(4 / 0.04) = 20 dB
    assert psnr(x + 0.2, x) == pytest.approx(20.0)
    assert strip(x).shape == (4, 3 * 5 - 1)


def test_discover_solvers_covers_every_public_solver():
    import adjointflow.solvers as S
    from adjointflow.demo.sampling import discover_solvers
    from adjointflow.solvers.base import Solver

    specs, notes = discover_solvers()
    names = {s.name.split("(")[0] for s in specs} | {n.split(":")[0].split("(")[0] for n in notes}
    for name in S.__all__:
        cls = getattr(S, name)
        if isinstance(cls, type) and issubclass(cls, Solver) and cls.step is not Solver.step:
            assert name in names, f"{name} is neither run nor reported by the demo"


@pytest.fixture(scope="module")
def denoiser():
    if not HAVE_WEIGHTS:
        pytest.skip("the committed digits weights are missing")
    from adjointflow.demo.run import load_denoiser

    return load_denoiser()[0]


def test_euler_error_against_dopri5_halves_with_the_steps(denoiser):
    """The reference is meaningful: a first-order solver's error vs dopri5 roughly halves per doubling."""
    from adjointflow.demo.sampling import SolverSpec, compare_solvers
    from adjointflow.solvers import Euler

    x1 = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    runs, refs, notes = compare_solvers(denoiser, x1, torch.tensor([0, 3, 7]), [SolverSpec("Euler", Euler())],
                                        (5, 10, 20), t_start=0.999, t_end=1e-3, grids=("uniform",),
                                        progress=False)
    assert not notes
    e = [r.rmse for r in runs]
    assert refs["dopri5_check"] < 0.1 * e[-1]
    assert 1.6 < e[0] / e[1] < 2.5 and 1.6 < e[1] / e[2] < 2.5


def test_dps_beats_the_degraded_input_on_both_tasks(denoiser):
    from adjointflow.demo.inverse import make_tasks, method_factories, solve_inverse_problems

    tasks = make_tasks(3, 0.05, seed=0)
    x_init = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    factories = {"DPS": method_factories(guidance_steps=30)["DPS"]}
    runs, notes = solve_inverse_problems(denoiser, tasks, factories, x_init, 0.05, progress=False,
                                         measure_memory=False)
    from adjointflow.demo.report import psnr

    assert len(runs) == 2 and not notes
    for task, run in zip(tasks, runs):
        assert run.psnr > psnr(task.degraded, task.truth) + 3.0, (task.name, run.psnr)
        assert run.nfe == 30 and run.vjps == 30


@needs_weights
def test_demo_smoke_tiny_configuration(tmp_path):
    """The whole job end to end on 2 images with tiny budgets: files, tables, every method accounted for."""
    from adjointflow.demo.run import DemoConfig, run_demo

    cfg = DemoConfig(n_samples=2, nfes=(2, 4), grids=("uniform",), sde_ref_steps=8, n_inverse=2, n_show=2,
                     guidance_steps=3, dflow_iterations=1, adjoint_iterations=1)
    found = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = run_demo(out_dir=tmp_path, config=cfg, progress=False, threads=1)
        assert torch.get_num_threads() == 2  # global state left as found
    finally:
        torch.set_num_threads(found)
    for f in ("solvers.png", "inverse_problems.png", "results.md"):
        assert (tmp_path / f).stat().st_size > 0
    md = (tmp_path / "results.md").read_text()
    assert "RMSE @ NFE 4" in md and "degraded input" in md
    # every guidance method actually ran on both tasks (none "not built yet" or "failed")
    from adjointflow.demo.inverse import method_factories

    built = {k for k, f in method_factories().items() if f is not None}
    assert {"DPS", "FlowChef", "DFlow", "AdjointGuidance"} <= built
    assert {r.method for r in res.inverse_runs} == built
    assert len(res.inverse_runs) == 2 * len(built)
    assert not [n for n in res.notes if "failed" in n or "not built" in n], res.notes
    # every discovered solver sampled
    from adjointflow.demo.sampling import discover_solvers

    assert {r.name for r in res.sample_runs} == {spec.name for spec in discover_solvers()[0]}


def test_demo_config_validation():
    from adjointflow.demo.run import DemoConfig

    with pytest.raises(ValueError, match="n_samples"):
        DemoConfig(n_samples=0)
    with pytest.raises(ValueError, match="grids"):
        DemoConfig(grids=("spiral",))
    with pytest.raises(ValueError, match="t_end"):
        DemoConfig(t_start=0.1, t_end=0.5)


# --- every expected failure: one line, non-zero status; --debug adds the traceback -------------------------
def test_force_guards_every_file_the_command_writes(tmp_path, capsys):
    """train-digits writes exactly one file; anything else in --out (here a lone digits_flow.json, which an
    earlier version overwrote without asking) is left alone, with or without --force."""
    (tmp_path / "digits_flow.json").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine too")
    args = ["train-digits", "--out", str(tmp_path), "--steps", "1", "--batch", "2", "--no-progress"]
    assert cli.main(args) == 0
    assert "--force" in _one_line_error(capsys, args)
    assert cli.main([*args, "--force"]) == 0
    assert (tmp_path / "digits_flow.json").read_text() == "mine" and (tmp_path / "notes.txt").read_text() == "mine too"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["digits_flow.json", "digits_flow.safetensors", "notes.txt"]


@needs_weights
def test_malformed_weights_metadata_is_one_line(capsys, tmp_path):
    from safetensors.torch import load_file

    from adjointflow.demo.weights_file import read_header, save_weights

    meta = {k: v for k, v in read_header(DEFAULT_WEIGHTS).meta.items() if k not in ("arch", "tensors_sha256")}
    save_weights(tmp_path / "digits_flow.safetensors", load_file(str(DEFAULT_WEIGHTS)), meta)  # no 'arch'
    err = _one_line_error(capsys, ["demo", "--weights", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "arch" in err and "digits_flow.safetensors" in err and "--debug" in err


@pytest.mark.parametrize("exc", [FloatingPointError("training loss became nan at step 3; lower lr"),
                                 OSError(28, "No space left on device")])
def test_diverging_training_and_io_errors_are_one_line(capsys, monkeypatch, tmp_path, exc):
    from adjointflow.demo import digits

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(digits, "train_digits", fail)
    err = _one_line_error(capsys, ["train-digits", "--out", str(tmp_path), "--no-progress"])
    assert str(exc.args[-1]) in err


def test_training_that_diverges_raises_before_writing(tmp_path, monkeypatch):
    from adjointflow.demo import digits

    calls, real = [], digits._flow_loss

    def diverging(*a):  # the third step's loss overflows
        calls.append(1)
        return real(*a) * (float("inf") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(digits, "_flow_loss", diverging)
    with pytest.raises(FloatingPointError, match="loss became inf at step 3"):
        digits.train_digits(tmp_path, steps=5, batch=2, progress=False, arch=dict(channels=8, emb_dim=16, groups=4))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(capsys, tmp_path, where):
    args = ["demo", "--weights", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")]
    assert cli.main(["--debug", *args] if where == "before" else [*args, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "weights not found" in err.strip().splitlines()[-1]
