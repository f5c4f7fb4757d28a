"""The process group of a ``torchrun`` job, or a single process: rank, world size, device, and the few
collectives the batch runner and data-parallel bespoke training need, each with a timeout.

``torchrun --nproc-per-node P`` (or ``--nnodes N``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`process_group` reads them. ``device="cuda"`` takes GPU
``LOCAL_RANK`` and the NCCL backend, ``"cpu"`` takes gloo. Without ``WORLD_SIZE`` (or with 1) nothing
is initialised and every collective is the identity, so the same code runs in a notebook.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistContext", "process_group", "DEFAULT_TIMEOUT_S"]

#: seconds a collective (a barrier: ranks finish their shards at different times) may wait for the others
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. ``world_size == 1``: no process group, collectives are no-ops."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, seq: Sequence) -> list:
        """This rank's share of ``seq``: every ``world_size``-th element from ``rank`` (balanced to one item)."""
        return list(seq[self.rank :: self.world_size])

    def barrier(self) -> None:
        """Wait for every rank, at most ``timeout_s``; on gloo a rank that does not arrive is named
        (``monitored_barrier``), on NCCL the process group's timeout applies."""
        if not self.distributed:
            return
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=self.timeout_s), wait_all_ranks=True)
        else:
            dist.barrier(device_ids=[self.local_rank])

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place (on this rank's device for NCCL)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it)") from None


@contextlib.contextmanager
def process_group(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistContext]:
    """Join the ``torchrun`` job described by the environment (gloo for ``device="cpu"``, NCCL and GPU
    ``LOCAL_RANK`` for ``"cuda"``) and leave it on exit; a single process if ``WORLD_SIZE`` is unset or 1.
    A process group that is already initialised is used as is (and left alone on exit)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    local_rank = _env_int("LOCAL_RANK", 0)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device (use device='cpu')")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                             f"start at most that many processes per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    created = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of the job")
        if world > 1:
            dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s),
                                    **({"device_id": dev} if device == "cuda" else {}))
            created = True
    try:
        yield DistContext(rank, world, local_rank, dev, float(timeout_s))
    finally:
        if created:
            dist.destroy_process_group()
