"""Run-directory safety (issue 13, item 5): one trainer per run directory, and no trainer outlives the sweep or
ladder that started it."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from megamu.errors import ConfigError
from megamu.training import run_lock
from scripts import script

# A one-layer model that trains a step in seconds (as tests/test_smoke_run.py).
SMALL = ["model.hidden_size=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.seq_len=32",
         "mup.base_hidden_size=32", "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_iters=0",
         "train.max_steps=1", "train.warmup_steps=1", "log.progress_bar=false"]

HOLDER = "import sys, time; from megamu.training.run_lock import lock_run_dir; lock_run_dir(sys.argv[1]); " \
         "print('locked', flush=True); time.sleep(600)"


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock on tmp_path/run; killed at the end if the test has not."""
    run_dir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    yield proc, run_dir
    proc.kill()
    proc.wait()


@pytest.fixture
def own_locks(monkeypatch):
    """This test's locks, released at its end (the module keeps a process's locks until it exits)."""
    held: dict = {}
    monkeypatch.setattr(run_lock, "_held", held)
    yield held
    for handle in held.values():
        handle.close()


def start_train(run_dir: str, tokenizer, prefix) -> subprocess.Popen:
    return subprocess.Popen([script("megamu-train"), "--config", "tiny", *SMALL, f"data.path={prefix}",
                             f"data.tokenizer_model={tokenizer.model_path}", f"train.out_dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_second_lock_names_the_holder(holder, own_locks):
    proc, run_dir = holder
    with pytest.raises(ConfigError, match=f"pid {proc.pid} on host {socket.gethostname()}"):
        run_lock.lock_run_dir(run_dir)
    assert not own_locks


def test_a_process_relocking_its_own_directory_is_not_refused(tmp_path, own_locks):
    run_lock.lock_run_dir(str(tmp_path))
    run_lock.lock_run_dir(str(tmp_path))  # a second Trainer in this process (an in-process resume)
    with open(tmp_path / ".lock") as handle:
        assert json.load(handle)["pid"] == os.getpid()


def test_a_filesystem_without_flock_warns_and_runs_unlocked(tmp_path, own_locks, monkeypatch):
    def no_flock(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="does not support flock"):
        run_lock.lock_run_dir(str(tmp_path))
    assert not own_locks


def test_a_trainer_on_a_locked_directory_is_refused_before_any_work(holder, tiny_tokenizer, tiny_dataset_prefix):
    proc, run_dir = holder
    out, err = start_train(run_dir, tiny_tokenizer, tiny_dataset_prefix).communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {proc.pid} on host {socket.gethostname()}" in errors[0], out + err
    assert "choose another train.out_dir" in errors[0]
    assert sorted(os.listdir(run_dir)) == [".lock"]  # no config.yaml, metrics or checkpoints written


def test_the_lock_goes_with_its_holder(holder, tiny_tokenizer, tiny_dataset_prefix):
    proc, run_dir = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    trainer = start_train(run_dir, tiny_tokenizer, tiny_dataset_prefix)
    out, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 0, out + err
    with open(os.path.join(run_dir, ".lock")) as handle:
        assert json.load(handle)["pid"] == trainer.pid  # the new trainer took the lock


# ---- trainers die with their launcher ------------------------------------------------------------------------

# A trainer that is itself a launcher (as `deepspeed --module megamu.train`): it starts a rank and waits.
TRAINER = textwrap.dedent("""
    import os, subprocess, sys, time
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.environ["PIDS_FILE"] + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {rank.pid}")
    os.rename(os.environ["PIDS_FILE"] + ".tmp", os.environ["PIDS_FILE"])
    time.sleep(600)
""")

# A sweep of one run, through launch.run_all.
LAUNCHER = textwrap.dedent("""
    import sys
    from megamu.scaling.launch import MetricRule, RunSpec, run_all
    run_all([RunSpec("r", sys.argv[1], None, [], 1)], MetricRule(), trainer=[sys.executable, sys.argv[2]],
            echo=False)
""")


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's reaper in a container may never collect it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """A running launcher and the pids of its trainer and the trainer's rank; all killed at the end."""
    (tmp_path / "trainer.py").write_text(TRAINER)
    pids_file = tmp_path / "pids"
    monkeypatch.setenv("PIDS_FILE", str(pids_file))
    # SIGINT as at a terminal: a test run started in the background inherits SIGINT ignored, and so would the
    # launcher, which could then never see the Ctrl-C the test sends.
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path / "run"), str(tmp_path / "trainer.py")],
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert wait_until(pids_file.exists, timeout=60), "the trainer did not start"
    trainer, rank = (int(p) for p in pids_file.read_text().split())
    yield launcher, trainer, rank
    for pid in (launcher.pid, trainer, rank):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    launcher.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_launcher_takes_its_trainer_with_it(sweep):
    launcher, trainer, _ = sweep
    launcher.send_signal(signal.SIGKILL)  # no handler runs: only the kernel can tell the trainer
    assert wait_until(lambda: not alive(trainer), timeout=5), "the trainer outlived its SIGKILLed launcher"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_launcher_stops_every_process_of_its_trainer(sweep, stop):
    launcher, trainer, rank = sweep
    launcher.send_signal(stop)
    assert launcher.wait(timeout=30) != 0
    # The rank too: SIGTERM goes to the trainer's process group, not only to the process the launcher started.
    assert wait_until(lambda: not alive(trainer) and not alive(rank), timeout=5), "a trainer process outlived it"
