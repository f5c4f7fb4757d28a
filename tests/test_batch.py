"""Batch inverse problems (adjointflow.batch): results independent of the number of ranks, resumable
after a SIGKILL with no partial file ever visible, and clear errors for bad inputs."""
from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import ranks
from adjointflow.batch import guide, item_seed
from adjointflow.batch.store import ResultStore
from adjointflow.cli import main
from adjointflow.guidance import Downsample, FlowChef, Inpaint

N_ITEMS = 8
STEPS = 8  # FlowChef steps: ~40 ms an item, enough work to interrupt


def _mask():
    m = torch.ones(16, 16)
    m[4:12, 4:12] = 0
    return m


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    from adjointflow.demo.digits import load_digits_tensor

    x, _ = load_digits_tensor("test")
    path = tmp_path_factory.mktemp("inputs") / "digits.npz"
    np.savez(path, x=x[:N_ITEMS].numpy())
    return path


def _run(inputs, out, steps=STEPS, **kw):
    return guide(inputs, out, task=Inpaint(_mask()), method=FlowChef(steps=steps), progress=False, **kw)


@pytest.fixture(scope="module")
def reference(digits_npz, tmp_path_factory):
    """One uninterrupted run in this process (world size 1)."""
    out = tmp_path_factory.mktemp("p1")
    outcome = _run(digits_npz, out)
    assert outcome.ok and len(outcome.rows) == N_ITEMS
    return out


def _results(out: Path) -> dict:
    store = ResultStore(out)
    return {i: store.load(i) for i in store.finished()}


def _assert_same_results(a: Path, b: Path):
    ra, rb = _results(a), _results(b)
    assert sorted(ra) == sorted(rb) == [f"{i:06d}" for i in range(N_ITEMS)]
    for i in ra:
        for k in ("x", "y", "latent"):
            assert torch.equal(ra[i][k], rb[i][k]), (i, k)  # bit for bit
        for k in ("loss", "psnr", "nfe", "vjps", "seed", "stop_reason", "config_sha256"):
            assert ra[i][k] == rb[i][k], (i, k)
    # nothing else in the folders: no temporary file left behind
    listing = lambda out: sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert listing(a) == listing(b)


def test_two_ranks_give_the_same_results_as_one_bit_for_bit(digits_npz, reference, tmp_path):
    out = tmp_path / "p2"
    assert ranks.run(_run, 2, digits_npz, out, timeout=60) == [0, 0]
    _assert_same_results(reference, out)
    csv = (out / "results.csv").read_text().splitlines()
    assert len(csv) == N_ITEMS + 1 and {line.split(",")[8] for line in csv[1:]} == {"0", "1"}  # both ranks worked
    assert "8 finished, 0 failed" in (out / "summary.md").read_text()


def _run_and_die_mid_write(inputs, out):
    """Rank 1 SIGKILLs itself halfway through writing its second result file; rank 0 runs on."""
    import adjointflow.batch.store as store_module

    if os.environ["RANK"] == "1":
        atomic, calls = store_module.save_atomic, []

        def half_then_die(obj, f):
            buf = io.BytesIO()
            torch.save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        def dying(obj, path, writer=torch.save):
            calls.append(path)
            return atomic(obj, path, half_then_die if len(calls) == 2 else writer)

        store_module.save_atomic = dying
    _run(inputs, out)


def test_a_rank_killed_midway_then_resumed_gives_the_uninterrupted_files(digits_npz, reference, tmp_path):
    out = tmp_path / "killed"
    procs = ranks.start(_run_and_die_mid_write, 2, digits_npz, out)
    try:
        procs[1].join(60)
        assert procs[1].exitcode == -signal.SIGKILL
    finally:
        ranks.kill(procs)  # torchrun stops the other ranks when one dies
    store = ResultStore(out)
    finished = store.finished()
    assert 1 <= len(finished) < N_ITEMS
    for i in finished:  # every visible result file is complete
        store.load(i)
    assert list(store.items.glob("*.tmp")), "the killed rank left no half-written file: the kill was not mid-write"
    outcome = _run(digits_npz, out)  # resumed (here on one process): only the missing items run
    assert outcome.ok and outcome.totals.skipped_finished == len(finished)
    _assert_same_results(reference, out)  # same files, bit for bit, and no temporary file left


def test_a_rerun_skips_finished_items(digits_npz, reference, tmp_path):
    out = tmp_path / "again"
    _run(digits_npz, out)
    ResultStore(out).result_path("000003").unlink()
    outcome = _run(digits_npz, out)
    assert outcome.ok and outcome.totals.ran == 1 and outcome.totals.skipped_finished == N_ITEMS - 1
    _assert_same_results(reference, out)


def test_item_seeds_depend_on_the_item_only():
    assert item_seed(0, "a") == item_seed(0, "a") != item_seed(0, "b") != item_seed(1, "b")
    assert 0 <= item_seed(7, "000001") < 2**63


# ------------------------------------------------------------------------------------------ bad input
def test_another_configuration_is_refused_unless_forced(digits_npz, reference, tmp_path):
    out = tmp_path / "cfg"
    _run(digits_npz, out)
    with pytest.raises(FileExistsError, match="different configuration"):
        _run(digits_npz, out, steps=STEPS + 1)
    before = _results(out)
    assert len(before) == N_ITEMS  # refused before touching anything
    outcome = _run(digits_npz, out, steps=STEPS + 1, force=True)
    assert outcome.ok and outcome.totals.ran == N_ITEMS


def test_shapes_that_do_not_fit_the_model_stop_before_any_work(tmp_path):
    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"item '000000' has shape \(1, 8, 8\), the model's samples"):
        _run(small, tmp_path / "o1")
    assert not any((tmp_path / "o1" / "items").glob("*.pt"))
    meas = tmp_path / "meas.npz"  # 2x SR measurements are 8x8; 16x16 ones do not fit
    np.savez(meas, y=np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="the task's measurements have shape"):
        guide(meas, tmp_path / "o2", task=Downsample(2), method=FlowChef(steps=2), progress=False)
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="does not fit the model's samples"):
        guide(good, tmp_path / "o3", task=Inpaint(torch.ones(8, 8)), method=FlowChef(steps=2), progress=False)


def test_unreadable_items_get_an_error_line_and_a_failing_exit(tmp_path, capsys):
    from adjointflow.demo.digits import load_digits_tensor

    folder = tmp_path / "in"
    folder.mkdir()
    x, _ = load_digits_tensor("test")
    for i in range(3):
        np.save(folder / f"digit{i}.npy", x[i].numpy())
    (folder / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "mask.npy", _mask().numpy())
    args = ["guide", str(folder), "--given", "images", "--out", str(tmp_path / "out"), "--task", "inpaint",
            "--mask", str(tmp_path / "mask.npy"), "--method", "FlowChef", "--set", "steps=2", "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "1 item(s) failed; first: broken: unreadable" in err
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["broken", "error"], ["digit0", "ok"], ["digit1", "ok"],
                                                   ["digit2", "ok"]]
    assert "`broken`: unreadable" in (tmp_path / "out" / "summary.md").read_text()
    # once the file is fixed, a rerun runs only it and succeeds
    np.save(folder / "broken.npy", x[3].numpy())
    assert main(args) == 0
    assert "4 finished, 0 failed" in (tmp_path / "out" / "summary.md").read_text()


def test_cli_errors_are_one_line(tmp_path, capsys, digits_npz):
    base = ["guide", str(digits_npz), "--out", str(tmp_path / "o"), "--method", "FlowChef", "--no-progress"]
    assert main(base + ["--task", "inpaint"]) == 1
    assert "--task inpaint needs --mask" in capsys.readouterr().err
    assert main(base + ["--task", "sr", "--set", "stepz=3"]) == 1
    assert "unexpected keyword argument 'stepz'" in capsys.readouterr().err
    assert main(base[:-2] + ["NoSuchMethod", "--task", "sr"]) == 1
    assert "expected one of" in capsys.readouterr().err
    assert main(base + ["--task", "nosuchmodule:f"]) == 1
    assert "cannot import 'nosuchmodule'" in capsys.readouterr().err


def test_the_command_under_torchrun_gives_the_same_results(digits_npz, reference, tmp_path):
    import subprocess
    import sys

    np.save(tmp_path / "mask.npy", _mask().numpy())
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "adjointflow",
           "guide", str(digits_npz), "--out", str(out), "--given", "images", "--task", "inpaint", "--mask",
           str(tmp_path / "mask.npy"), "--method", "FlowChef", "--set", f"steps={STEPS}", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{N_ITEMS} of {N_ITEMS} item(s) finished" in done.stdout
    _assert_same_results(reference, out)


def test_user_model_and_objective_and_png_images_through_the_command(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from adjointflow.demo.digits import load_digits_tensor

    (tmp_path / "user_parts.py").write_text(
        "from adjointflow import pretrained\n"
        "from adjointflow.guidance import Downsample, MeasurementLoss\n"
        "def factory():\n    return pretrained.digits(), (1, 16, 16)\n"
        "def objective(y):\n    return MeasurementLoss(Downsample(2), y, 0.05)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x, _ = load_digits_tensor("test")
    meas, pngs = tmp_path / "meas", tmp_path / "pngs"
    meas.mkdir(), pngs.mkdir()
    for i in range(2):
        np.save(meas / f"m{i}.npy", Downsample(2)(x[i : i + 1])[0].numpy())
        Image.fromarray(((x[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8), "L").save(pngs / f"p{i}.png")
    common = ["--method", "FlowChef", "--set", "steps=2", "--no-progress"]
    assert main(["guide", str(meas), "--out", str(tmp_path / "o1"), "--task", "user_parts:objective",
                 "--model", "user_parts:factory", *common]) == 0
    assert main(["guide", str(pngs), "--given", "images", "--out", str(tmp_path / "o2"), "--task", "blur",
                 "--blur-sigma", "0.8", *common]) == 0
    rows = (tmp_path / "o2" / "results.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [["p0", "ok"], ["p1", "ok"]] and all(r.split(",")[3] for r in rows)
    blob = ResultStore(tmp_path / "o2").load("p0")
    assert blob["y"].shape == (1, 1, 16, 16)  # simulated from the PNG through the blur
    # a user objective cannot simulate measurements from images: refused before any work
    assert main(["guide", str(pngs), "--given", "images", "--out", str(tmp_path / "o3"), "--task",
                 "user_parts:objective", *common]) == 1
    assert "a user objective needs measurements" in capsys.readouterr().err
