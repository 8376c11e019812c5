"""Faults on loopback (2 ranks, gloo, CPU): a rank killed (kill -9) or hung (SIGSTOP) ends the other rank
within the heartbeat timeout, with one `error:` line naming it, and a restart resumes from the last
complete checkpoint; SIGTERM on one rank stops both after the same step with a complete checkpoint and
exit 0, and the resumed run is bitwise the uninterrupted one; past train.preempt_grace_s the rank exits
143 without a new checkpoint. Every process group, DeepSpeed's own included, has the configured timeout."""
from __future__ import annotations

import json
import os
import re

import pytest

from dist import run_script
from megamu.config import load_config, validate
from megamu.errors import ConfigError
from megamu.parallel.watchdog import EXIT_PEER_LOST
from megamu.scaling.launch import FINAL_STATUSES, MetricRule, RunSpec, classify
from megamu.training.preemption import EXIT_GRACE_EXPIRED
# The trainer tests' tiny config and run-directory fixtures (pytest makes one of each for this module).
from test_train_e2e import MAX_STEPS, config, losses, read_records, runs  # noqa: F401

HEARTBEAT_S = 3.0
# Detection takes the timeout plus up to one beat (0.75 s); the rest is slack for a loaded 2-core machine
# (runs took 3x longer with other jobs on the cores): the claim is a bound, not a latency.
SLACK_S = 15.0
EXIT_BOUND_S = HEARTBEAT_S + SLACK_S

# Before step FAULT_STEP (0-based), each rank in FAULT_RANKS records the time and sends itself
# FAULT_SIGNAL; a rank that stops itself (a hung node) is killed FAULT_HANG_S later by a detached shell.
# FAULT_SLOW_SAVE_S makes every checkpoint save that long first.
FAULTY_TRAINER = """
import os, signal, subprocess, sys, time
from megamu.training import loop, step
ranks = [int(r) for r in os.environ.get("FAULT_RANKS", "").split(",") if r]
sig = getattr(signal, os.environ.get("FAULT_SIGNAL", "SIGTERM"))
at_step = int(os.environ.get("FAULT_STEP", "-1"))
call = step.OptimizerStep.__call__
def faulty_step(self, index, batches):
    if index == at_step and int(os.environ["RANK"]) in ranks:
        with open(os.environ["FAULT_STAMP"], "w") as stamp:
            stamp.write(repr(time.time()))
        if sig == signal.SIGSTOP:
            subprocess.Popen(["sh", "-c", f"sleep {os.environ['FAULT_HANG_S']}; kill -9 {os.getpid()}"],
                             start_new_session=True)
        os.kill(os.getpid(), sig)
    return call(self, index, batches)
step.OptimizerStep.__call__ = faulty_step
save = loop.save_checkpoint
def slow_save(*args, **kwargs):
    time.sleep(float(os.environ.get("FAULT_SLOW_SAVE_S", "0")))
    return save(*args, **kwargs)
loop.save_checkpoint = slow_save
from megamu.train import main
sys.exit(main(sys.argv[1:]))
"""


def faulty_run(config: str, out_dir, *overrides: str, nprocs: int = 2, **fault: str):
    stamp = os.path.join(str(out_dir) + ".stamp")
    env = {"FAULT_STAMP": stamp, **{f"FAULT_{k.upper()}": v for k, v in fault.items()}}
    result = run_script(FAULTY_TRAINER, ["--config", config, f"train.out_dir={out_dir}", *overrides,
                                         "--deepspeed_config", "ds_configs/zero1.json"], nprocs, extra_env=env)
    fault_time = float(open(stamp).read()) if os.path.exists(stamp) else None
    return result, fault_time


@pytest.fixture(scope="module")
def reference(config, runs) -> str:
    """The uninterrupted 2-rank run that interrupted-and-resumed runs must reproduce bitwise."""
    result, _ = faulty_run(config, runs / "reference")
    assert result.ok, result.describe()
    return str(runs / "reference")


def pointer(run_dir) -> str:
    return open(os.path.join(run_dir, "checkpoints", "latest_complete")).read().strip()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ---- node loss ------------------------------------------------------------------------------

@pytest.mark.parametrize("victim", [1, 0])  # 0 also hosts the rendezvous store
def test_killed_rank_ends_the_other_naming_it_and_restart_resumes(config, runs, reference, victim):
    run = runs / f"killed{victim}"
    result, killed_at = faulty_run(config, run, f"parallel.heartbeat_timeout_s={HEARTBEAT_S}",
                                   "train.save_interval=2", ranks=str(victim), signal="SIGKILL", step="4")
    dead, survivor = result.ranks[victim], result.ranks[1 - victim]
    assert dead.returncode == -9, result.describe()
    assert survivor.returncode == EXIT_PEER_LOST, result.describe()
    took = survivor.ended_at - killed_at
    print(f"rank {survivor.rank} exited {took:.1f}s after rank {victim} was killed")
    assert took < EXIT_BOUND_S, result.describe()
    [line] = error_lines(survivor.output)
    assert re.fullmatch(rf"error: rank {victim} \(host .+\) stopped sending heartbeats [0-9.]+s ago.*; stopping", line)
    assert pointer(run) == "global_step4"
    restarted, _ = faulty_run(config, run, "train.resume=true", "train.save_interval=2")
    assert restarted.ok, restarted.describe()
    assert "resumed from global_step4" in restarted.ranks[0].output
    assert losses(str(run)) == losses(reference)


@pytest.mark.parametrize("heartbeat_s,timeout_minutes", [(HEARTBEAT_S, 10.0), (0.0, 0.1)])
def test_hung_rank_ends_the_other_within_the_heartbeat_or_the_collective_timeout(config, runs, heartbeat_s,
                                                                                  timeout_minutes):
    # SIGSTOP: the peer's sockets stay open, as when a node drops off the network, so gloo sees no error and
    # waits; only the heartbeat (on) or the collective timeout, applied to every group (heartbeat off), ends it.
    run = runs / f"hung{heartbeat_s:g}"
    bound = (heartbeat_s if heartbeat_s else timeout_minutes * 60) + SLACK_S
    result, stopped_at = faulty_run(config, run, f"parallel.heartbeat_timeout_s={heartbeat_s}",
                                    f"parallel.timeout_minutes={timeout_minutes}", ranks="1", signal="SIGSTOP",
                                    step="3", hang_s=str(bound + 5))
    survivor = result.ranks[0]
    took = survivor.ended_at - stopped_at
    print(f"rank 0 exited {took:.1f}s after rank 1 hung (heartbeat {heartbeat_s:g}s)")
    assert result.ranks[1].returncode == -9, result.describe()
    assert took < bound, result.describe()
    if heartbeat_s:
        assert survivor.returncode == EXIT_PEER_LOST, result.describe()
        [line] = error_lines(survivor.output)
        assert re.fullmatch(r"error: rank 1 \(host .+\) stopped sending heartbeats [0-9.]+s ago; stopping", line)
    else:
        assert survivor.returncode not in (0, EXIT_PEER_LOST), result.describe()
        assert "Timed out waiting 6000ms" in survivor.output, result.describe()


GROUP_TIMEOUTS = """
import json, sys
import torch
from torch.distributed import distributed_c10d
from megamu.config import load_config
from megamu.training.loop import Trainer
trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]))
import deepspeed.comm
deepspeed.comm.new_group([0, 1])  # how DeepSpeed makes its own groups (pipeline grid, ZeRO): no timeout given
timeouts = [pg._get_backend(torch.device("cpu")).options._timeout.total_seconds() for pg in distributed_c10d._world.pg_map]
print("TIMEOUTS", json.dumps(timeouts))
trainer.run()
"""


def test_every_process_group_deepspeeds_included_has_the_configured_timeout(config, runs):
    result = run_script(GROUP_TIMEOUTS, [config, f"train.out_dir={runs / 'timeouts'}", "train.max_steps=1",
                                         "parallel.timeout_minutes=0.5"], 2)
    assert result.ok, result.describe()
    timeouts = json.loads(result.ranks[0].output.split("TIMEOUTS ")[1].splitlines()[0])
    assert len(timeouts) == 6  # the default group, megamu's four kinds, and DeepSpeed's
    assert set(timeouts) == {30.0}


# ---- preemption -----------------------------------------------------------------------------

def test_sigterm_on_one_rank_stops_both_after_the_same_step_and_resume_is_exact(config, runs, reference):
    run = runs / "preempted"
    # Rank 1, not the writer: rank 0 learns of it only through the per-step agreement.
    result, _ = faulty_run(config, run, ranks="1", signal="SIGTERM", step="2")
    assert result.returncodes == [0, 0], result.describe()
    assert "SIGTERM received" in result.ranks[1].output
    assert re.search(r"stopped by SIGTERM after step 3 of 6; a resume \(train.resume=true\) continues from "
                     r"checkpoint global_step3 in ", result.ranks[0].output), result.describe()
    assert "preempted (SIGTERM) after 3 steps" in result.ranks[0].output
    assert pointer(run) == "global_step3"
    assert max(losses(str(run))) == 3
    # A sweep or ladder sees an unfinished run, to be launched again.
    spec = RunSpec("preempted", str(run), config, [], MAX_STEPS)
    status = classify(spec, 0, MetricRule())
    assert status.status not in FINAL_STATUSES and "stopped at step 3 of 6" in status.reason
    resumed, _ = faulty_run(config, run, "train.resume=true")
    assert resumed.ok, resumed.describe()
    assert losses(str(run)) == losses(reference)  # bitwise
    grad_norms = {r["step"]: r["grad_norm"] for r in read_records(str(run), "train")}
    assert grad_norms == {r["step"]: r["grad_norm"] for r in read_records(reference, "train")}


def test_sigterm_past_the_grace_time_exits_143_without_a_new_checkpoint(config, runs):
    run = runs / "grace"
    result, _ = faulty_run(config, run, "train.save_interval=2", "train.preempt_grace_s=1", nprocs=1,
                           ranks="0", signal="SIGTERM", step="3", slow_save_s="3")
    assert result.returncodes == [EXIT_GRACE_EXPIRED], result.describe()
    [line] = error_lines(result.ranks[0].output)
    assert "train.preempt_grace_s=1s passed since SIGTERM" in line
    assert line.endswith(f"A resume uses checkpoint global_step2 in {run / 'checkpoints'}")
    assert pointer(run) == "global_step2"


def test_fault_keys_are_validated():
    for key in ("parallel.heartbeat_timeout_s=-1", "train.preempt_grace_s=-5", "parallel.timeout_minutes=0"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            validate(load_config(None, ["model.vocab_size=512", key]), check_files=False)
