"""Multi-node launch on one machine: two "nodes" of a made-up hostfile, each started by the real `deepspeed`
launcher with --no_ssh --node_rank, train a TP=2 model across them and match one process's losses; the
SLURM example's srun line is valid bash and its megamu command line loads.

The launcher with --no_ssh never resolves or contacts the hosts: it encodes the hostfile's slots as
world info, and each node's `deepspeed.launcher.launch` starts the ranks of entry --node_rank (ranks
numbered host by host), so made-up names work without pdsh, ssh or DNS. With --master_addr given it
does not ask the first host for its address either.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from dist import REPO, free_port, read_log, run_train, wait_all
from megamu.config import load_config
from megamu.parallel.launch_env import without_launch_env
from megamu.shipped import resolve_config
from test_train_e2e import REL_TOL, assert_close, losses, read_records, write_config

STEPS = 4
HOSTS = ("node-a", "node-b")  # resolve nowhere: the launcher must not need them to
LAUNCH_TIMEOUT_S = 150
TRAIN = [f"train.max_steps={STEPS}", "train.eval_interval=0", "--deepspeed_config", "ds_configs/zero1.json"]
SBATCH = os.path.join(REPO, "examples", "slurm", "train.sbatch")


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_tokenizer, tiny_dataset_prefix) -> str:
    root = tmp_path_factory.mktemp("multinode")
    return write_config(str(root / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix, str(root / "runs"))


def launch_nodes(hostfile: str, argv: list[str]) -> list[tuple[int, str]]:
    """`deepspeed --hostfile H --no_ssh --node_rank i ... --module megamu.train ARGV` for every node at once;
    (exit code, output) per node. Each node's launcher and its ranks form one process group, killed whole
    if it outlives the timeout, so a hang leaves nothing running."""
    port = str(free_port())
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**without_launch_env(os.environ), "OMP_NUM_THREADS": "1"}
    logs = [tempfile.TemporaryFile(mode="w+", prefix=f"node{node}-") for node in range(len(HOSTS))]
    procs = [subprocess.Popen([deepspeed, "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", port,
                               "--module", "megamu.train", *argv],
                              cwd=REPO, env=env, stdout=logs[node], stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
             for node in range(len(HOSTS))]
    ended: dict[int, float] = {}
    try:
        ended = wait_all(procs, LAUNCH_TIMEOUT_S)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher's ranks too, not just the launcher
            except ProcessLookupError:
                pass
            proc.wait()
    results = [(proc.returncode, ("" if node in ended else f"[timed out after {LAUNCH_TIMEOUT_S}s: killed]\n")
                + read_log(log)) for node, (proc, log) in enumerate(zip(procs, logs))]
    for log in logs:
        log.close()
    return results


def test_two_nodes_by_the_deepspeed_launcher_train_tp2_with_single_process_losses(config, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host} slots=1\n" for host in HOSTS))
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    with ThreadPoolExecutor(2) as pool:
        reference = pool.submit(run_train, ["--config", config, f"train.out_dir={single}", *TRAIN])
        launched = pool.submit(launch_nodes, str(hostfile),
                               ["--config", config, f"train.out_dir={nodes}", "parallel.tensor=2", *TRAIN])
        reference, launched = reference.result(), launched.result()
    assert reference.ok, reference.describe()
    for node, (code, output) in enumerate(launched):
        assert code == 0, f"node {node} (exit {code}):\n{output[-6000:]}"
    meta = read_records(str(nodes), "meta")[0]
    assert (meta["world_size"], meta["tp"], meta["dp"]) == (2, 2, 1)
    assert sorted(losses(str(single))) == list(range(1, STEPS + 1))
    assert_close(losses(str(nodes)), losses(str(single)), REL_TOL)


def run_sbatch_with_fake_srun(tmp_path, **env: str) -> list[str]:
    """Run the example sbatch script under bash with an `srun` that only records its arguments."""
    bin_dir, recorded = tmp_path / "bin", tmp_path / "srun.args"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" > {shlex.quote(str(recorded))}\n')
    (bin_dir / "srun").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "megamu", "SLURM_CPUS_PER_TASK": "8"}
    result = subprocess.run(["bash", SBATCH], cwd=REPO, capture_output=True, text=True,
                            env={**without_launch_env(os.environ), **slurm, **env,
                                 "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    return recorded.read_text().split("\0")[:-1]


def test_slurm_example_is_valid_bash_and_runs_one_srun_step(tmp_path):
    check = subprocess.run(["bash", "-n", SBATCH], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    lines = open(SBATCH).read().splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = {line.split()[1].split("=")[0] for line in lines if line.startswith("#SBATCH")}
    assert {"--nodes", "--ntasks-per-node", "--gpus-per-node"} <= directives
    words = run_sbatch_with_fake_srun(tmp_path)
    assert "--kill-on-bad-exit=1" in words and "--cpus-per-task=8" in words
    assert words[words.index("python"):][:3] == ["python", "-m", "megamu.train"]


def test_slurm_example_megamu_command_line_loads(tmp_path, monkeypatch):
    from megamu.train import parse_args

    words = run_sbatch_with_fake_srun(tmp_path, RUN_DIR="/shared/runs/x", TP="4")
    args = parse_args(words[words.index("megamu.train") + 1:])
    monkeypatch.chdir(REPO)  # the script's default config path is relative to a checkout
    cfg = load_config(resolve_config(args.config), [*args.overrides, f"train.deepspeed_config={args.deepspeed_config}"])
    assert (cfg.train.resume, cfg.parallel.tensor, cfg.train.out_dir) == (True, 4, "/shared/runs/x")
    assert cfg.data.path == "/shared/data/corpus_text_document" and cfg.train.deepspeed_config == "zero1"
