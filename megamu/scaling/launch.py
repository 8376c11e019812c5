"""Run training jobs as subprocesses, a few at a time, and classify how each one ended.

Shared by the hyper-parameter sweep and the width ladder. Each job is one run directory; the
trainer is a command (default `python -m megamu.train`) given `--config BASE overrides...
train.out_dir=RUN_DIR train.resume=true`, so tests can substitute a small script.

A run's outcome is written to RUN_DIR/run_status.json when its process exits:
  done      the metrics reach the planned last step and the loss is finite and below the threshold
  diverged  non-finite loss, the trainer's non-finite guard stopped it (exit 3), or the final loss
            is above the divergence threshold (default: ln(vocab), no better than a uniform guess)
  failed    any other exit (crash, config error), with the tail of its log
"done" and "diverged" are final: a resumed sweep skips them. Anything else (failed, killed
half-way, preempted by SIGTERM (exit 0 before the last step), never started) is launched again with
train.resume=true, which continues from the run's newest checkpoint when it has one and starts afresh
otherwise.

Trainers never outlive the sweep: each starts in its own process group (so a trainer that is itself a
launcher, e.g. `deepspeed --module megamu.train`, is stopped with all its ranks), which gets SIGTERM when the
sweep ends by SIGTERM or Ctrl-C; and on Linux each trainer also gets SIGTERM from the kernel when the sweep
dies by any means, SIGKILL included (PR_SET_PDEATHSIG). SIGTERM is megamu.train's preemption: it stops after
the current step with a checkpoint, which the next launch resumes from.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Callable, Optional, Sequence

from megamu.errors import ConfigError
from megamu.fileio import atomic_write
from megamu.parallel.launch_env import without_launch_env
from megamu.scaling.fit import FitError
from megamu.scaling.runs import read_metrics, read_run_point
from megamu.training.run_lock import LOCK_FILE

STATUS_FILE = "run_status.json"
LOG_FILE = "train.log"
EXIT_DIVERGED = 3  # megamu.train's exit code when train.max_bad_steps non-finite steps stopped it
FINAL_STATUSES = ("done", "diverged")
LOG_TAIL_LINES = 25
DEFAULT_TRAINER = (sys.executable, "-m", "megamu.train")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class RunSpec:
    """One training run: where it lives, which config, and what it changes."""

    name: str
    run_dir: str
    config: Optional[str]
    overrides: list[str]  # section.key=value, applied after the config file
    max_steps: int  # the planned last step, to tell a finished run from a half-finished one
    labels: dict = field(default_factory=dict)  # what identifies it in tables (hyper-parameters, width)


@dataclass
class MetricRule:
    """How a run is scored and when it counts as diverged."""

    metric: str = "train"  # "train": mean of the last `smooth` train losses; "val": the final val_loss
    smooth: int = 10
    diverge_above: Optional[float] = None  # None: ln(vocab size), the loss of a uniform guess


@dataclass
class RunResult:
    name: str
    run_dir: str
    status: str  # done | diverged | failed | pending
    labels: dict
    value: Optional[float] = None  # the metric, for done runs
    params: Optional[float] = None
    tokens: Optional[float] = None
    last_step: Optional[int] = None
    returncode: Optional[int] = None
    reason: str = ""  # why diverged or failed
    log_tail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def trainer_command(spec: RunSpec, trainer: Sequence[str] = DEFAULT_TRAINER) -> list[str]:
    config = ["--config", spec.config] if spec.config else []
    return [*trainer, *config, *spec.overrides, f"train.out_dir={spec.run_dir}", "train.resume=true"]


def _child_env(threads: int) -> dict[str, str]:
    # A launcher's own variables must not leak: every run is a world of one with its own port.
    env = without_launch_env(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def read_status(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, STATUS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None  # a torn marker means the run did not finish cleanly: run it again


def _log_tail(run_dir: str, lines: int = LOG_TAIL_LINES) -> str:
    path = os.path.join(run_dir, LOG_FILE)
    if not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as handle:
        return "".join(handle.readlines()[-lines:])


def failed_run_logs(results: Sequence[RunResult]) -> list[str]:
    """Lines to print after a table of `results`: each failed run with a log, why it failed and its log's tail."""
    lines: list[str] = []
    for r in results:
        if r.status == "failed" and r.log_tail:
            lines += ["", f"--- {r.name} failed ({r.reason}); last lines of {r.run_dir}/{LOG_FILE} ---",
                      r.log_tail.rstrip()]
    return lines


def classify(spec: RunSpec, returncode: Optional[int], rule: MetricRule) -> RunResult:
    """Read the run's metrics and decide done / diverged / failed (returncode None: not run by us)."""
    result = RunResult(spec.name, spec.run_dir, "failed", spec.labels, returncode=returncode)
    try:
        meta, train, evals = read_metrics(spec.run_dir)
    except FitError as exc:
        result.reason, result.log_tail = str(exc), _log_tail(spec.run_dir)
        return result
    result.params = meta.get("params")
    result.last_step = max((r["step"] for r in train + evals), default=0)
    losses = [r.get("loss") for r in train]
    if returncode == EXIT_DIVERGED or any(v is None or not math.isfinite(v) for v in losses):
        result.status, result.reason = "diverged", "non-finite loss (the trainer's guard stopped it or it logged NaN)"
        return result
    if returncode not in (0, None) or result.last_step < spec.max_steps:
        result.reason = (f"exit code {returncode}" if returncode not in (0, None)
                         else f"stopped at step {result.last_step} of {spec.max_steps} (preempted or stopped early)")
        result.log_tail = _log_tail(spec.run_dir)
        return result
    try:
        point = read_run_point(spec.run_dir, rule.metric, smooth=rule.smooth, min_step=0)
    except FitError as exc:
        result.reason, result.log_tail = str(exc), _log_tail(spec.run_dir)
        return result
    first_loss = losses[0] if losses else math.inf
    threshold = rule.diverge_above if rule.diverge_above is not None else uniform_loss(meta, first_loss)
    result.value, result.tokens = point.loss, point.tokens
    if point.loss > threshold:
        result.status = "diverged"
        result.reason = f"final {rule.metric} loss {point.loss:.4g} above the divergence threshold {threshold:.4g}"
    else:
        result.status = "done"
    return result


def uniform_loss(meta: dict, first_loss: float) -> float:
    """ln(vocab): the loss of guessing uniformly, which a run that learned anything is below;
    without a vocab size in the meta line, the run's own first logged loss."""
    vocab = meta.get("vocab_size")
    return math.log(vocab) if vocab else first_loss


def _launch_settings(spec: RunSpec) -> dict:
    return {"config": spec.config, "overrides": list(spec.overrides)}


def _write_status(status: dict, spec: RunSpec) -> None:
    """Record `status` as the result of launching `spec` in its run directory."""
    # Atomic: a crash never leaves a half-written "done".
    with atomic_write(os.path.join(spec.run_dir, STATUS_FILE)) as handle:
        json.dump({**status, "run_dir": spec.run_dir, "launch": _launch_settings(spec)}, handle, indent=1)


def adopt_finished_run(source_dir: str, spec: RunSpec) -> None:
    """Copy a finished run (checkpoints left behind) to `spec.run_dir` and record it as launched by `spec`.

    Only for a run the caller has checked to train exactly as the spec's would (an identical resolved
    config reached through other overrides, or μP at m = 1 for SP): it then is this spec's run.
    """
    shutil.copytree(source_dir, spec.run_dir, ignore=shutil.ignore_patterns("checkpoints", LOCK_FILE))
    _write_status(read_status(spec.run_dir), spec)


def previous_result(spec: RunSpec, rule: MetricRule) -> Optional[RunResult]:
    """A run that ended (done or diverged) in an earlier launch, scored again under `rule` (the metric
    may differ from last time); None if it must (re)run."""
    status = read_status(spec.run_dir)
    if status is None or status.get("status") not in FINAL_STATUSES:
        return None
    launched = status.get("launch")
    if launched is not None and launched != _launch_settings(spec):
        # Reusing it would report another model's loss under this run's name.
        changed = sorted(set(launched["overrides"]) ^ set(spec.overrides)) or [f"config {launched['config']}"]
        raise ConfigError(f"{spec.run_dir} holds a finished run launched with other settings (differences: "
                          f"{', '.join(changed)}); delete that directory or choose another output directory")
    return classify(spec, status.get("returncode"), rule)


def run_all(
    specs: Sequence[RunSpec],
    rule: MetricRule,
    parallel: int = 1,
    trainer: Sequence[str] = DEFAULT_TRAINER,
    threads: Optional[int] = None,
    echo: bool = True,
) -> list[RunResult]:
    """Launch every spec without a final outcome, `parallel` at a time; return results in spec order."""
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        shared = sorted(n for n in names if names.count(n) > 1)
        raise ConfigError(f"two runs would share a run directory name: {shared}; make the runs' values distinct")
    threads = threads or max(1, (os.cpu_count() or 1) // parallel)
    results: dict[str, RunResult] = {}
    todo = []
    for spec in specs:
        earlier = previous_result(spec, rule)
        if earlier is not None:
            results[spec.name] = earlier
            if echo:
                print(f"[skip] {spec.name}: {earlier.status} earlier", flush=True)
        else:
            todo.append(spec)
    running: list[tuple[RunSpec, subprocess.Popen, object, float]] = []
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:  # `kill` as well as Ctrl-C must reach the clean-up below
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _drive(todo, running, results, rule, parallel, trainer, threads, echo)
    finally:
        _stop(running)  # interrupted: leave no orphan trainers behind
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return [results[s.name] for s in specs]


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def start_trainer(cmd: Sequence[str], log: IO, env: dict[str, str]) -> subprocess.Popen:
    """Start `cmd` as the leader of a new process group that dies with this process (see the module doc)."""
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=_parent_death_hook())


def stop_trainer(proc: subprocess.Popen) -> None:
    """SIGTERM to the trainer's whole process group (its ranks too, when it is a launcher itself)."""
    with contextlib.suppress(ProcessLookupError):  # the group has already gone
        os.killpg(proc.pid, signal.SIGTERM)


def _stop(running: list) -> None:
    # Signal every group first, then wait: all trainers save their checkpoints at once, not one by one.
    for _, proc, _, _ in running:
        stop_trainer(proc)
    for _, proc, log, _ in running:
        proc.wait()
        log.close()


def _parent_death_hook() -> Optional[Callable[[], None]]:
    """A preexec_fn asking the kernel to SIGTERM the child when this launcher dies (Linux only; None elsewhere).

    The kernel tracks the thread that forked the child, so the thread calling this must outlive its trainers,
    as run_all's does.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: between fork and exec, only call it
    launcher = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != launcher:  # the launcher died before the prctl: no signal would come
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def _drive(todo: list, running: list, results: dict, rule: MetricRule, parallel: int, trainer: Sequence[str],
           threads: int, echo: bool) -> None:
    while todo or running:
        while todo and len(running) < parallel:
            spec = todo.pop(0)
            os.makedirs(spec.run_dir, exist_ok=True)
            log = open(os.path.join(spec.run_dir, LOG_FILE), "a")
            cmd = trainer_command(spec, trainer)
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = start_trainer(cmd, log, _child_env(threads))
            running.append((spec, proc, log, time.perf_counter()))
            if echo:
                print(f"[start] {spec.name}", flush=True)
        time.sleep(0.05)
        for item in list(running):
            spec, proc, log, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            result = classify(spec, proc.returncode, rule)
            _write_status(result.to_dict(), spec)
            results[spec.name] = result
            if echo:
                value = f" {rule.metric} loss {result.value:.4f}" if result.value is not None else ""
                why = f" ({result.reason})" if result.reason else ""
                print(f"[{result.status}] {spec.name}{value} in {time.perf_counter() - start:.0f}s{why}", flush=True)
