"""Two ranks started the way srun and mpirun start them (only their variables set, no RANK / WORLD_SIZE /
MASTER_*) find each other, report the right layout and train the single-process losses; a bare process
is a world of one; Open MPI without MASTER_ADDR stops with one line naming it."""
from __future__ import annotations

import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from dist import free_port, run_script, run_train
from megamu.errors import EXIT_USER_ERROR
from megamu.parallel.launch_env import job_port
from test_train_e2e import REL_TOL, assert_close, losses, read_records, write_config

STEPS = 4
# Trains, then prints what this rank saw; torch.distributed stays initialised after main() returns.
TRAIN_AND_REPORT = """
import os, sys
import torch.distributed as dist
from megamu.parallel import get_parallel_state
from megamu.train import main
code = main(sys.argv[1:])
state = get_parallel_state()
print(f"LAYOUT rank={dist.get_rank()} world={dist.get_world_size()} dp={state.get_data_parallel_world_size()} "
      f"local={os.environ['LOCAL_RANK']} port={os.environ['MASTER_PORT']}")
sys.exit(code)
"""
LAYOUT = re.compile(r"LAYOUT rank=(\d+) world=(\d+) dp=(\d+) local=(\d+) port=(\d+)")


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def slurm_job_id() -> str:
    """A job id whose derived port is free right now."""
    return next(job for job in (f"{os.getpid()}{n}" for n in range(100)) if bindable(job_port(job)))


def slurm_env(job_id: str):
    # The first host resolves to this machine; the rest only exercise the compressed form.
    return lambda rank: {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                         "SLURM_JOB_NODELIST": "localhost,gpu-[01-03]", "SLURM_JOB_ID": job_id}


def ompi_env(port: int):
    return lambda rank: {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2",
                         "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(port)}


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_tokenizer, tiny_dataset_prefix) -> str:
    root = tmp_path_factory.mktemp("launch")
    return write_config(str(root / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix, str(root / "runs"))


@pytest.fixture(scope="module")
def runs(config, tmp_path_factory) -> dict:
    """A bare single process, two srun-like and two mpirun-like ranks, all at once (start-up dominates)."""
    root = tmp_path_factory.mktemp("launch_runs")
    job_id, ompi_port = slurm_job_id(), free_port()
    launches = {"single": (1, lambda rank: {}), "slurm": (2, slurm_env(job_id)), "ompi": (2, ompi_env(ompi_port))}

    def train(name: str):
        nprocs, rank_env = launches[name]
        return run_script(TRAIN_AND_REPORT, ["--config", config, f"train.out_dir={root / name}",
                                             f"train.max_steps={STEPS}", "train.eval_interval=0",
                                             "--deepspeed_config", "ds_configs/zero1.json"], nprocs, rank_env=rank_env)

    with ThreadPoolExecutor(len(launches)) as pool:
        results = dict(zip(launches, pool.map(train, launches)))
    for name, result in results.items():
        assert result.ok, f"{name}:\n{result.describe()}"
    return {"results": results, "dirs": {name: str(root / name) for name in launches},
            "ports": {"slurm": job_port(job_id), "ompi": ompi_port}}


def layouts(result) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in LAYOUT.search(r.output).groups()) for r in result.ranks]


def test_bare_process_is_a_world_of_one(runs):
    assert layouts(runs["results"]["single"]) == [(0, 1, 1, 0, 0)]


@pytest.mark.parametrize("launcher", ["slurm", "ompi"])
def test_launcher_ranks_get_their_layout_and_train_the_single_process_losses(runs, launcher):
    port = runs["ports"][launcher]
    assert layouts(runs["results"][launcher]) == [(0, 2, 2, 0, port), (1, 2, 2, 1, port)]
    run_dir = runs["dirs"][launcher]
    meta = read_records(run_dir, "meta")[0]
    assert (meta["world_size"], meta["dp"]) == (2, 2)
    reference = losses(runs["dirs"]["single"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert_close(losses(run_dir), reference, REL_TOL)


def test_open_mpi_without_master_addr_stops_with_one_line(config, tmp_path):
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    result = run_train(["--config", config, f"train.out_dir={tmp_path / 'run'}"], 1, rank_env=lambda rank: env)
    assert result.returncodes == [EXIT_USER_ERROR], result.describe()
    errors = [line for line in result.ranks[0].output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MASTER_ADDR" in errors[0], result.describe()
    assert not os.path.exists(tmp_path / "run")
