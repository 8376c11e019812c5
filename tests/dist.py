"""Launch `python -m megamu.train` (or a small script) on N local processes, like the deepspeed
launcher does: one process per rank with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR=127.0.0.1 /
MASTER_PORT (a free port) set, gloo on CPU.

Returns every rank's exit code and output, so a test can assert on failures as well as success; a rank still
running at the timeout is aborted (its Python stacks printed) and marked `timed_out`, beside the others.
"""
from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

from megamu.parallel.launch_env import without_launch_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str
    ended_at: float  # time.time() when its exit was seen (every rank is polled every POLL_S)
    timed_out: bool = False  # still running at the launch's timeout: aborted, its Python stacks in `output`


@dataclass
class LaunchResult:
    ranks: list[RankResult]

    @property
    def returncodes(self) -> list[int]:
        return [r.returncode for r in self.ranks]

    @property
    def ok(self) -> bool:
        return all(code == 0 for code in self.returncodes)

    def describe(self) -> str:
        return "\n".join(f"--- rank {r.rank} (exit {r.returncode}{', timed out' if r.timed_out else ''}) ---\n"
                         f"{r.output[-4000:]}" for r in self.ranks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Another process may take the free port between free_port() and rank 0's bind: such a launch is retried.
PORT_TAKEN = ("EADDRINUSE", "Address already in use")
POLL_S = 0.1
ABORT_GRACE_S = 10.0  # for a timed-out rank's stack dump before it is killed
# SIGABRT would leave a core file in the repository where core dumps are on: the ranks inherit this limit.
resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))


def launch(args: list[str], nprocs: int = 1, timeout: float = 240.0,
           extra_env: Optional[dict[str, str]] = None,
           rank_env: Optional[Callable[[int], dict[str, str]]] = None) -> LaunchResult:
    """Run `python ARGS...` once per rank and wait for all of them.

    Each rank gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or
    with `rank_env` only the variables rank_env(rank) returns (to play srun or mpirun).
    """
    for _attempt in range(3):
        result = _launch_once(args, nprocs, timeout, extra_env, rank_env)
        if not any(marker in r.output for r in result.ranks for marker in PORT_TAKEN):
            break
    return result


def _launch_once(args: list[str], nprocs: int, timeout: float, extra_env: Optional[dict[str, str]],
                 rank_env: Optional[Callable[[int], dict[str, str]]]) -> LaunchResult:
    port = str(free_port())
    # A launcher around the tests (pytest under srun or mpirun) must not leak its variables into the ranks.
    inherited = without_launch_env(os.environ)
    # Each rank writes to a file, not a pipe: a pipe nobody reads while another rank is waited for fills up,
    # and a rank blocked writing to it stalls its peers in their next collective while its heartbeat goes on.
    with contextlib.ExitStack() as files:
        logs = [files.enter_context(tempfile.TemporaryFile(mode="w+", prefix=f"rank{rank}-"))
                for rank in range(nprocs)]
        procs: list[subprocess.Popen] = []
        try:
            for rank in range(nprocs):
                launcher = rank_env(rank) if rank_env else {
                    "RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
                env = {**inherited, **launcher,
                       # Ranks share two cores: one thread each avoids oversubscription.
                       "OMP_NUM_THREADS": "1",
                       # A rank aborted at the timeout prints every thread's Python stack: where it was stuck.
                       "PYTHONFAULTHANDLER": "1",
                       **(extra_env or {})}
                procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=logs[rank],
                                              stderr=subprocess.STDOUT, text=True))
            ended_at = wait_all(procs, timeout)
            timed_out = {rank for rank, proc in enumerate(procs) if rank not in ended_at and proc.poll() is None}
            ended_at.update({rank: time.time() for rank in range(nprocs) if rank not in set(ended_at) | timed_out})
            for rank in timed_out:
                procs[rank].send_signal(signal.SIGABRT)
            wait_all([procs[rank] for rank in timed_out], ABORT_GRACE_S)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return LaunchResult([RankResult(rank, proc.returncode, read_log(log), ended_at.get(rank, time.time()),
                                        rank in timed_out) for rank, (proc, log) in enumerate(zip(procs, logs))])


def wait_all(procs: list[subprocess.Popen], timeout: float) -> dict[int, float]:
    """Wait until every process has ended or `timeout` seconds have passed; {index: time.time() it ended}
    for those that ended."""
    ended_at: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(ended_at) < len(procs) and time.monotonic() < deadline:
        for i, proc in enumerate(procs):
            if i not in ended_at and proc.poll() is not None:
                ended_at[i] = time.time()
        time.sleep(POLL_S)
    return ended_at


def read_log(log) -> str:  # type: ignore[no-untyped-def]
    log.seek(0)
    return log.read()


def run_train(argv: list[str], nprocs: int = 1, **kwargs) -> LaunchResult:
    """`python -m megamu.train ARGV...` on `nprocs` ranks."""
    return launch(["-m", "megamu.train", *argv], nprocs, **kwargs)


def run_script(code: str, argv: list[str], nprocs: int = 1, **kwargs) -> LaunchResult:
    """`python -c CODE ARGV...` on `nprocs` ranks (for runs that patch something first)."""
    return launch(["-c", code, *argv], nprocs, **kwargs)
