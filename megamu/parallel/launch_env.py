"""Who started this process, and so its rank, world size, local rank and rendezvous address.

torch.distributed and DeepSpeed read RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (and
DeepSpeed falls back to mpi4py discovery when one is missing). torchrun and the deepspeed launcher set
them; srun and mpirun set their own variables instead, from which `derive_launch_env` computes them:

- RANK and WORLD_SIZE set (torchrun, deepspeed): used as they are.
- Open MPI (OMPI_COMM_WORLD_*) and MPICH / Intel MPI (PMI_RANK, PMI_SIZE): checked before Slurm, because
  inside an allocation mpirun starts its daemons with srun and its ranks inherit that step's SLURM_*.
  srun's own PMI (--mpi=pmi2) agrees with SLURM_PROCID / SLURM_NTASKS, and then Slurm's branch is used.
- Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID): rank 0 runs on the first host of the node list.
- none of these: a world of one.

The port is MASTER_PORT, else one derived from the job id, the same in every task without any message.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Callable, Mapping, MutableMapping, Optional

from megamu.errors import ConfigError
from megamu.parallel.hostlist import first_slurm_host

# Derived ports fall in [20000, 32000): unprivileged, and below Linux's ephemeral range (32768 and up), from
# which the OS picks the local ports of outgoing connections.
PORT_BASE = 20000
PORT_SPAN = 12000
LOCALHOST = "127.0.0.1"


# What makes a process a rank of some launch: torchrun's variables, and each launcher's task and step
# identity. The job's own (SLURM_JOB_ID, SLURM_JOB_NODELIST, ...) are not among them.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEPID",
                  "SLURM_GTIDS", "SLURM_TASK_PID", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")
RANK_PREFIXES = ("SLURM_STEP_", "OMPI_COMM_WORLD_")
NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")  # first set wins


def without_launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` minus every rank-identity variable, for a child that must start as its own world (a sweep's
    runs, a test's ranks): an inherited rank or task count would make it wait for peers that never come.
    The job's variables stay, so a child such as `srun ...` still runs inside the allocation."""
    return {k: v for k, v in env.items() if k not in RANK_VARIABLES and not k.startswith(RANK_PREFIXES)}


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int  # 0: a world of one binds whatever port the OS hands out
    launcher: str  # "env" (torchrun / deepspeed), "openmpi", "pmi", "slurm" or "single"


def job_port(job_id: str) -> int:
    """A port in [PORT_BASE, PORT_BASE + PORT_SPAN) that every task of job `job_id` computes alike."""
    return PORT_BASE + zlib.crc32(job_id.encode()) % PORT_SPAN


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except KeyError:
        raise ConfigError(f"{key} is not set, but the launcher's other variables are: set {key} too") from None
    except ValueError:
        raise ConfigError(f"{key}={env[key]!r} is not an integer") from None


def _agrees_with_slurm(env: Mapping[str, str]) -> bool:
    return env.get("PMI_RANK") == env.get("SLURM_PROCID") and env.get("PMI_SIZE") == env.get("SLURM_NTASKS")


def _first_host(env: Mapping[str, str], variable: str, first_host: Callable[[str], str]) -> str:
    """Rank 0's host: the first of node list `variable`, which names the variable when it is malformed."""
    try:
        return first_host(env[variable])
    except ConfigError as err:
        raise ConfigError(f"{variable}: {err}; fix it, or export MASTER_ADDR=<host of rank 0> for every "
                          f"rank") from None


def _master(env: Mapping[str, str], world_size: int, default_addr: Optional[str],
            job_id: Optional[str]) -> tuple[str, int]:
    """(address, port) of the rendezvous: set by the user, else derived; a world of one needs neither."""
    if world_size == 1:
        return env.get("MASTER_ADDR") or LOCALHOST, _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else 0
    addr = env.get("MASTER_ADDR") or default_addr
    if not addr:
        raise ConfigError("MASTER_ADDR is not set: export MASTER_ADDR=<host of rank 0> for every rank")
    if env.get("MASTER_PORT"):
        return addr, _int(env, "MASTER_PORT")
    if not job_id:
        raise ConfigError("MASTER_PORT is not set and this launcher has no job id: export MASTER_PORT=<free "
                          "port> for every rank")
    return addr, job_port(job_id)


def derive_launch_env(env: Mapping[str, str],
                      first_host: Callable[[str], str] = first_slurm_host) -> LaunchEnv:
    """This process's place in the job, from its environment (see the module docstring for precedence)."""
    if "RANK" in env or "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env or world > 1 else 0
        launcher, default_addr, job_id = "env", None, None
    elif "OMPI_COMM_WORLD_RANK" in env:
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
        launcher, default_addr = "openmpi", None
        job_id = env.get("OMPI_MCA_ess_base_jobid") or env.get("PMIX_NAMESPACE")
    elif "PMI_RANK" in env and not _agrees_with_slurm(env):
        rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local = _int(env, "MPI_LOCALRANKID")
        launcher, default_addr, job_id = "pmi", None, None
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun sets both for every task
        rank, world, local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID")
        nodelist = next((k for k in NODELIST_VARIABLES if env.get(k)), None)
        launcher = "slurm"
        needs_host = world > 1 and nodelist is not None and not env.get("MASTER_ADDR")
        default_addr = _first_host(env, nodelist, first_host) if needs_host else None
        # Tasks of one step share the step id; two steps of a job running at once must not share a port.
        job_id = ".".join(env[k] for k in ("SLURM_JOB_ID", "SLURM_STEP_ID") if env.get(k)) or None
    else:
        rank, world, local, launcher, default_addr, job_id = 0, 1, 0, "single", None, None
    if not 0 <= rank < world or not 0 <= local < world:
        raise ConfigError(f"launcher variables give rank {rank} and local rank {local} in a world of {world}; "
                          f"both must lie in [0, {world})")
    addr, port = _master(env, world, default_addr, job_id)
    return LaunchEnv(rank, world, local, addr, port, launcher)


def apply_launch_env(environ: MutableMapping[str, str] = os.environ) -> LaunchEnv:
    """Derive this process's LaunchEnv and export it as the variables torch.distributed and DeepSpeed read.

    Idempotent: once exported, a second call reads the same values back through RANK / WORLD_SIZE.
    """
    launch = derive_launch_env(environ)
    environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank),
                   MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
    return launch
