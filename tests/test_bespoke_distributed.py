"""Data-parallel bespoke training (adjointflow.distributed.bespoke): world size 2 equals world size 1
(float64, <= 1e-6 relative; measured 3e-13 L-BFGS, 2e-15 Adam), the ranks stay identical, rank 0 saves atomically."""
from __future__ import annotations

import os

import pytest
import torch

import adjointflow as af
import ranks
from adjointflow.distributed.bespoke import SampleShard, _blocks, fit_bespoke_distributed
from adjointflow.distributed.context import DistContext
from adjointflow.solvers import BespokeSolver
from adjointflow.testing import GaussianMixture

F64 = torch.float64
MIX = GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64), torch.tensor([[1.5, 0.0], [-1.0, 0.5]], dtype=F64),
                      torch.tensor([[0.3, 0.5], [0.6, 0.2]], dtype=F64))


def _samples(n, seed):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _train(out_dir, optimizer):
    den = MIX.denoiser(af.LinearFlow(), "velocity")
    solver = BespokeSolver(3, "rk2")
    kw = dict(iterations=6, eval_every=3) if optimizer == "lbfgs" else dict(iterations=8, eval_every=4, batch_size=12)
    hist = fit_bespoke_distributed(den, solver, _samples(40, 1), _samples(24, 2), t_start=1.0, t_end=1e-3, gt_chunk=8,
                                   rtol=1e-9, atol=1e-9, optimizer=optimizer, progress=False,
                                   save=out_dir / "solver.pt", **kw)
    rank = int(os.environ.get("RANK", "0"))  # the process group is gone once training returns
    torch.save({"params": [p.detach().clone() for p in solver.parameters()], "loss": hist.loss,
                "val": hist.val_rmse, "train": hist.train_rmse}, out_dir / f"rank{rank}.pt")


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_world_size_two_trains_the_same_solver_as_one(tmp_path, optimizer):
    one, two = tmp_path / "ws1", tmp_path / "ws2"
    one.mkdir(), two.mkdir()
    _train(one, optimizer)
    assert ranks.run(_train, 2, two, optimizer, timeout=60) == [0, 0]
    ref = torch.load(one / "rank0.pt")
    start = [p.detach() for p in BespokeSolver(3, "rk2").parameters()]
    moved = max(float((a - b).abs().max()) for a, b in zip(ref["params"], start))
    assert moved > 1e-3, "training did not move the parameters: the comparison would be empty"
    for r in (0, 1):
        got = torch.load(two / f"rank{r}.pt")
        for a, b in zip(ref["params"], got["params"]):
            assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max()), (r, a, b)
        torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref["loss"]), rtol=1e-9, atol=0)
        torch.testing.assert_close(torch.tensor(got["val"]), torch.tensor(ref["val"]), rtol=1e-9, atol=0)
        torch.testing.assert_close(torch.tensor(got["train"]), torch.tensor(ref["train"]), rtol=1e-9, atol=0)
    r0, r1 = (torch.load(two / f"rank{r}.pt")["params"] for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))  # the ranks took identical steps
    den = MIX.denoiser(af.LinearFlow(), "velocity")
    saved = BespokeSolver.load(two / "solver.pt", denoiser=den)
    assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), r0))
    assert sorted(p.name for p in two.iterdir()) == ["rank0.pt", "rank1.pt", "solver.pt"]  # no temporary file


def test_a_rank_without_samples_in_a_minibatch_still_joins_the_mean():
    shard = SampleShard(DistContext(), 10, 20, 30)
    assert shard.local(torch.tensor([25, 12, 3, 19])).tolist() == [2, 9]
    p = torch.nn.Parameter(torch.ones(3, dtype=F64))
    assert shard.mean(2.5, 4, [p]) == 2.5 and torch.equal(p.grad, torch.zeros(3, dtype=F64))  # grad None -> 0


def test_ground_truth_blocks_are_whole_chunks_for_every_rank():
    assert _blocks(40, 8, 2) == [(0, 16), (16, 40)]
    assert _blocks(40, 8, 1) == [(0, 40)]
    assert _blocks(41, 8, 3) == [(0, 16), (16, 32), (32, 41)]
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        _blocks(20, 8, 4)


def _digits_cli(out, *extra):
    from adjointflow.distributed.bespoke_digits import main

    args = ["--nfe", "5", "--out", str(out), "--n-train", "2", "--n-val", "2", "--iterations", "1", "--gt-chunk", "1",
            "--gt-tol", "1e-2", "--no-progress", *extra]
    if main(args) != 0:
        raise SystemExit(1)


def test_the_digits_solver_trains_on_two_ranks_and_rank_0_saves_it(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from adjointflow import pretrained

    den = pretrained.digits()  # before the fork: the ranks inherit the imports (seconds each otherwise)
    out = tmp_path / "solver.pt"
    assert ranks.run(_digits_cli, 2, out, timeout=90) == [0, 0]
    from adjointflow.demo.bespoke_digits import load_bundled_bespoke

    solver = load_bundled_bespoke(den, 5, out)  # checked against the model it was trained for
    assert type(solver).__name__ == "BespokeNSSolver" and solver.n_steps == 5 and solver.trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["solver.pt"]
    from adjointflow.distributed.bespoke_digits import main

    assert main(["--out", str(out)]) == 1 and "exists (pass --force" in capsys.readouterr().err
