"""Rank, world size, local rank and rendezvous derived from srun / mpirun variables (megamu.parallel.launch_env,
megamu.parallel.hostlist): Slurm's compressed node lists, Open MPI and PMI, precedence, job-id ports, errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dist import REPO
from megamu.config import ConfigError
from megamu.parallel.hostlist import expand_hostlist, first_slurm_host
from megamu.parallel.launch_env import (
    PORT_BASE,
    PORT_SPAN,
    LaunchEnv,
    apply_launch_env,
    derive_launch_env,
    job_port,
    without_launch_env,
)


def parsed_first_host(hostlist: str) -> str:
    return expand_hostlist(hostlist)[0]


def derive(env: dict[str, str]) -> LaunchEnv:
    """Without scontrol, whatever the test machine has on PATH."""
    return derive_launch_env(env, first_host=parsed_first_host)


def slurm(procid: int, ntasks: int, localid: int, **more: str) -> dict[str, str]:
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(localid),
            "SLURM_JOB_ID": "4242", **more}


@pytest.mark.parametrize("hostlist,hosts", [
    ("login1", ["login1"]),
    ("gpu-[01-04,07],login1", ["gpu-01", "gpu-02", "gpu-03", "gpu-04", "gpu-07", "login1"]),
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("n[009-011],m7", ["n009", "n010", "n011", "m7"]),
    ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
    ("a[3],b[5-6]c", ["a3", "b5c", "b6c"]),
])
def test_expand_slurm_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["n[1-2", "n1-2]", "n[[1-2]]", "n[3-1]", "n[a-b]", "n[1-]", "a,,b", ""])
def test_malformed_hostlist_is_refused(hostlist):
    with pytest.raises(ConfigError, match="malformed host list"):
        expand_hostlist(hostlist)


def test_a_malformed_node_list_names_its_variable():
    for variable in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        with pytest.raises(ConfigError, match=f"^{variable}: malformed host list 'gpu-\\[01-02'.*MASTER_ADDR"):
            derive(slurm(0, 2, 0, **{variable: "gpu-[01-02"}))


def fake_scontrol(directory, script: str) -> str:
    path = directory / "scontrol"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(directory) + os.pathsep + os.environ["PATH"]


def test_first_host_asks_scontrol_when_it_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_scontrol(tmp_path, 'echo "from-scontrol-$3"\necho other\n'))
    assert first_slurm_host("gpu-[01-02]") == "from-scontrol-gpu-[01-02]"


def test_first_host_is_parsed_when_scontrol_fails_or_is_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_scontrol(tmp_path, "exit 1\n"))
    assert first_slurm_host("gpu-[07-08],login1") == "gpu-07"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert first_slurm_host("node[3-4]-ib") == "node3-ib"


def test_slurm_task_gets_rank_layout_and_first_node_of_a_compressed_list():
    env = slurm(5, 8, 1, SLURM_JOB_NODELIST="gpu-[01-04,07],login1")
    assert derive(env) == LaunchEnv(5, 8, 1, "gpu-01", job_port("4242"), "slurm")


def test_slurm_nodelist_fallbacks_and_user_rendezvous_win():
    assert derive(slurm(0, 2, 0, SLURM_NODELIST="node[1-2]-ib")).master_addr == "node1-ib"
    step = slurm(0, 2, 0, SLURM_STEP_NODELIST="b[3-4]", SLURM_JOB_NODELIST="a[1-4]")
    assert derive(step).master_addr == "b3"  # rank 0 of a step runs on the step's first node
    mine = derive(slurm(1, 2, 1, SLURM_JOB_NODELIST="a[1-2]", MASTER_ADDR="head", MASTER_PORT="23456"))
    assert (mine.master_addr, mine.master_port) == ("head", 23456)


def test_two_steps_of_one_job_get_different_ports():
    nodes = {"SLURM_JOB_NODELIST": "a1"}
    ports = {derive(slurm(0, 2, 0, SLURM_STEP_ID=step, **nodes)).master_port for step in ("0", "1")}
    assert len(ports) == 2


def test_one_slurm_task_binds_any_port_like_a_plain_run():
    """A sweep inside a one-task allocation starts several runs at once: they must not share a derived port."""
    assert derive(slurm(0, 1, 0, SLURM_JOB_NODELIST="a1")) == LaunchEnv(0, 1, 0, "127.0.0.1", 0, "slurm")


def test_rank_and_world_size_take_precedence_over_slurm():
    env = {**slurm(3, 8, 3, SLURM_JOB_NODELIST="a[1-2]"), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert derive(env) == LaunchEnv(1, 2, 1, "10.0.0.1", 29500, "env")


def ompi(rank: int, size: int, local: int, **more: str) -> dict[str, str]:
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(local), **more}


def test_open_mpi_rank_with_master_addr_and_port():
    assert derive(ompi(3, 4, 1, MASTER_ADDR="10.1.2.3", MASTER_PORT="24000")) == \
        LaunchEnv(3, 4, 1, "10.1.2.3", 24000, "openmpi")


def test_open_mpi_port_from_its_job_id():
    launch = derive(ompi(0, 4, 0, MASTER_ADDR="h", OMPI_MCA_ess_base_jobid="1234567"))
    assert launch.master_port == job_port("1234567")


def test_open_mpi_inside_a_slurm_allocation_uses_the_mpi_ranks():
    """mpirun starts its daemons with srun: the ranks inherit that step's SLURM_PROCID, not theirs."""
    env = {**slurm(0, 2, 0, SLURM_JOB_NODELIST="a[1-2]"), **ompi(5, 8, 1, MASTER_ADDR="a1", MASTER_PORT="25000")}
    assert derive(env) == LaunchEnv(5, 8, 1, "a1", 25000, "openmpi")


def test_open_mpi_without_master_addr_is_one_line_naming_the_variable():
    with pytest.raises(ConfigError) as info:
        derive(ompi(1, 2, 1, MASTER_PORT="24000"))
    assert "MASTER_ADDR" in str(info.value) and "\n" not in str(info.value)


def test_open_mpi_without_port_or_job_id_names_master_port():
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        derive(ompi(0, 2, 0, MASTER_ADDR="h"))


def test_one_open_mpi_rank_needs_no_rendezvous():
    assert derive(ompi(0, 1, 0)) == LaunchEnv(0, 1, 0, "127.0.0.1", 0, "openmpi")


def test_pmi_ranks_of_mpich_or_intel_mpi():
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h", "MASTER_PORT": "26000"}
    assert derive(env) == LaunchEnv(2, 4, 0, "h", 26000, "pmi")


def test_srun_pmi_agreeing_with_slurm_uses_the_slurm_node_list():
    env = {**slurm(1, 2, 1, SLURM_JOB_NODELIST="c[5-6]"), "PMI_RANK": "1", "PMI_SIZE": "2"}
    assert derive(env) == LaunchEnv(1, 2, 1, "c5", job_port("4242"), "slurm")


def test_no_launcher_is_a_world_of_one():
    assert derive({}) == LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single")


@pytest.mark.parametrize("env,named", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "LOCAL_RANK"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
    (ompi(0, 2, 0, MASTER_ADDR="h", MASTER_PORT="p"), "MASTER_PORT"),
    (slurm(2, 2, 0, SLURM_JOB_NODELIST="a1"), "rank 2"),
])
def test_bad_launcher_variables_are_config_errors(env, named):
    with pytest.raises(ConfigError, match=named):
        derive(env)


def test_job_port_is_in_range_and_the_same_in_every_process():
    ports = [job_port(str(job)) for job in range(1000, 3000)]
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports) and len(set(ports)) > 1000
    code = "from megamu.parallel.launch_env import job_port; print(job_port('987654'))"
    for seed in ("1", "2"):  # str hashes are salted per process; the port must not be
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        assert int(out.stdout) == job_port("987654")


def test_apply_exports_the_torch_variables_and_is_idempotent():
    environ = slurm(1, 2, 1, SLURM_JOB_NODELIST="localhost")
    first = apply_launch_env(environ)
    assert {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == \
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": first.master_addr,
         "MASTER_PORT": str(job_port("4242"))}
    again = apply_launch_env(environ)
    assert (again.rank, again.world_size, again.local_rank, again.master_addr, again.master_port) == \
        (first.rank, first.world_size, first.local_rank, first.master_addr, first.master_port)


def test_a_child_env_drops_rank_identity_and_keeps_the_job():
    """A sweep's child starts as its own world, yet `--trainer "srun ..."` must still find the allocation."""
    rank_identity = {
        "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_NPROCS": "8", "SLURM_LOCALID": "3",
        "SLURM_NODEID": "0", "SLURM_STEPID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_STEP_NUM_TASKS": "8", "SLURM_GTIDS": "0,1,2,3", "SLURM_TASK_PID": "123",
        "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
        "PMI_RANK": "3", "PMI_SIZE": "8", "PMIX_RANK": "3", "MPI_LOCALRANKID": "3"}
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODELIST": "n[1-2]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "8", "SLURM_CONF": "/etc/slurm/slurm.conf",
           "OMPI_MCA_btl": "^openib", "PATH": "/usr/bin", "OMP_NUM_THREADS": "4"}
    assert without_launch_env({**rank_identity, **job}) == job
    assert derive(without_launch_env({**rank_identity, **job})) == LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single")
