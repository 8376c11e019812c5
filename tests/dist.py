"""Launch `python -m megamu.train` (or a small script) on N local processes, like the deepspeed
launcher does: one process per rank with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR=127.0.0.1 /
MASTER_PORT (a free port) set, gloo on CPU.

Returns every rank's exit code and output, so a test can assert on failures as well as success.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
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
    ended_at: float  # time.time() when its exit was seen (ranks are waited for in rank order)


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
        return "\n".join(f"--- rank {r.rank} (exit {r.returncode}) ---\n{r.output[-4000:]}" for r in self.ranks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Another process may take the free port between free_port() and rank 0's bind: such a launch is retried.
PORT_TAKEN = ("EADDRINUSE", "Address already in use")


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
    procs = []
    for rank in range(nprocs):
        launcher = rank_env(rank) if rank_env else {
            "RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nprocs),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        env = {**inherited, **launcher,
               # Ranks share two cores: one thread each avoids oversubscription.
               "OMP_NUM_THREADS": "1",
               **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=timeout)
            results.append(RankResult(rank, proc.returncode, out, time.time()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return LaunchResult(results)


def run_train(argv: list[str], nprocs: int = 1, **kwargs) -> LaunchResult:
    """`python -m megamu.train ARGV...` on `nprocs` ranks."""
    return launch(["-m", "megamu.train", *argv], nprocs, **kwargs)


def run_script(code: str, argv: list[str], nprocs: int = 1, **kwargs) -> LaunchResult:
    """`python -c CODE ARGV...` on `nprocs` ranks (for runs that patch something first)."""
    return launch(["-c", code, *argv], nprocs, **kwargs)
