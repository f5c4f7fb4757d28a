"""Launch a function on P gloo ranks (forked processes, the environment ``torchrun`` would set) with a
deadline: tests of the distributed code never hang. Forking skips re-importing torch (seconds per rank)."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = 0
    try:
        fn(*args)
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)  # not sys.exit: the forked pytest must not run its own exit handlers


def start(fn, world: int, *args) -> list:
    """Start ``fn(*args)`` on ``world`` ranks; returns the processes (rank order)."""
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def wait(procs, timeout: float) -> list[int]:
    """Exit codes of ``procs``; all are killed and ``TimeoutError`` raised if they are not done in ``timeout`` s."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    if any(p.is_alive() for p in procs):
        kill(procs)
        raise TimeoutError(f"ranks still running after {timeout} s (killed)")
    return [p.exitcode for p in procs]


def kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join(10)


def run(fn, world: int, *args, timeout: float = 60.0) -> list[int]:
    return wait(start(fn, world, *args), timeout)
