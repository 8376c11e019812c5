"""Run a test function on N gloo processes (127.0.0.1, a free port) and report failures in the parent.

Importing torch costs seconds on a small CPU machine, so workers fork from a fork server that
imported it once, and `run_distributed` keeps one pool of ready workers per world size for the whole
pytest session and hands each call to it. Each worker has `torch.distributed` initialised (gloo,
env:// so DeepSpeed finds it too) with the world as the default group. A failure on any rank raises
`DistributedTestError` in the parent with that rank's traceback; if a rank then stays stuck in a
collective (its peer failed before joining), or a process dies, the pool is torn down and the next
call starts a fresh one.

The function must be defined at module level (it is pickled by name) and its result picklable.
pytest does not rewrite `assert` in worker processes: compare with torch.testing.assert_close or
give asserts a message.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

from dist import free_port

# A rank blocked in a collective gives up after this long, so a broken test cannot hang forever.
COLLECTIVE_TIMEOUT_S = 60.0
# After one rank fails, how long the others get to report before the pool is presumed stuck.
STRAGGLER_GRACE_S = 2.0


class DistributedTestError(AssertionError):
    """A function run by run_distributed failed on at least one rank."""


def _worker_main(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # several workers share few cores; oversubscription is slower
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    while True:
        task = tasks.get()
        if task is None:
            break
        try:
            fn, args = pickle.loads(task)
            payload = pickle.dumps((rank, True, fn(*args)))
        except BaseException:  # report everything, including AssertionError and unpicklable results
            payload = pickle.dumps((rank, False, traceback.format_exc()))
        results.put(payload)
    dist.destroy_process_group()


class WorkerPool:
    """`world_size` processes with torch.distributed initialised, running one function at a time."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("forkserver")
        # The fork server imports these once; every worker (of every pool) then forks from it in
        # milliseconds instead of importing them itself, and it has run no torch threads, so forking is
        # safe. torch.distributed.tensor (with sympy) is what torch.testing.assert_close imports on first use.
        ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor", "pytest"])
        port = free_port()
        self.world_size = world_size
        self._results = ctx.Queue()
        self._tasks = [ctx.SimpleQueue() for _ in range(world_size)]
        self._procs = [ctx.Process(target=_worker_main, args=(rank, world_size, port, self._tasks[rank],
                                                               self._results), daemon=True)
                       for rank in range(world_size)]
        for proc in self._procs:
            proc.start()

    def run(self, fn: Callable[..., Any], args: tuple, timeout_s: float) -> list[Any]:
        """fn(*args) on every rank; the per-rank results, or DistributedTestError."""
        try:
            task = pickle.dumps((fn, args))
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise TypeError(f"run_distributed needs a module-level function and picklable arguments: {err}") from None
        for tasks in self._tasks:
            tasks.put(task)
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(results) + len(failures) < self.world_size:
            if failures:
                deadline = min(deadline, time.monotonic() + STRAGGLER_GRACE_S)
            try:
                rank, ok, value = pickle.loads(self._results.get(timeout=0.1))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    codes = ", ".join(f"rank {r} exit code {self._procs[r].exitcode}" for r in dead)
                    self.terminate()
                    raise DistributedTestError(f"worker process died ({codes})" + _describe(failures))
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(results) - set(failures))
                    self.terminate()
                    raise DistributedTestError(f"ranks {missing} did not finish {fn.__name__} "
                                               f"(stuck in a collective?)" + _describe(failures))
                continue
            (results if ok else failures)[rank] = value
        if failures:
            raise DistributedTestError(_describe(failures).lstrip())
        return [results[rank] for rank in range(self.world_size)]

    @property
    def usable(self) -> bool:
        return all(proc.is_alive() for proc in self._procs)

    def close(self) -> None:
        for tasks in self._tasks:
            tasks.put(None)
        for proc in self._procs:
            proc.join(timeout=5)
        self.terminate()

    def terminate(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)


def _describe(failures: dict[int, str]) -> str:
    return "".join(f"\n--- rank {rank} failed:\n{tb}" for rank, tb in sorted(failures.items()))


_TP_GROUPS: dict[int, tuple[Any, int]] = {}


def tensor_parallel_group(tp: int) -> tuple[Any, int]:
    """Inside a worker: this rank's TP group of `tp` ranks, and that group's index.

    With tp equal to the world size this is the world. Otherwise the groups are strided
    ({0, n, 2n, ...}, {1, n+1, ...} with n = world / tp), so code that uses the global rank where it
    needs the rank inside the group gives wrong results instead of accidentally right ones.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    if tp == world:
        return dist.group.WORLD, 0
    if tp not in _TP_GROUPS:
        stride = world // tp
        groups = [dist.new_group(list(range(first, world, stride))) for first in range(stride)]  # all ranks call
        index = dist.get_rank() % stride
        _TP_GROUPS[tp] = (groups[index], index)
    return _TP_GROUPS[tp]


_POOLS: dict[int, WorkerPool] = {}


def run_distributed(world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Run fn(*args) on `world_size` gloo ranks and return the list of per-rank results.

    Raises DistributedTestError (an AssertionError, so pytest shows it as a test failure) naming the
    failing ranks with their tracebacks.
    """
    pool = _POOLS.get(world_size)
    if pool is None or not pool.usable:
        pool = _POOLS[world_size] = WorkerPool(world_size)
    try:
        return pool.run(fn, args, timeout_s)
    finally:
        if not pool.usable:
            del _POOLS[world_size]


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
