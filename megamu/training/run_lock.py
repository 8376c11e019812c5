"""One job per run directory: while a trainer runs, its rank 0 holds an exclusive flock on OUT_DIR/.lock.

The lock is the kernel's, on an open file, so it goes when the process does, however it ends (a kill -9
included): there is never a stale lock to clean up. The file only names the holder (pid and host), for the
message a second trainer on the directory gets. Only rank 0 locks: the lock is about two jobs sharing a
directory, not about the ranks of one job, which all agree to stop when rank 0 is refused.

A filesystem without flock (some NFS and FUSE mounts) gets a warning and no lock, not a failed run.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import warnings
from typing import IO, Optional

from megamu.errors import ConfigError

LOCK_FILE = ".lock"

# Held until the process exits: a second Trainer on the same directory in this process (an in-process resume)
# reuses the lock instead of being refused by its own earlier one.
_held: dict[str, IO] = {}


def lock_run_dir(out_dir: str) -> None:
    """Lock `out_dir` for this process, or raise ConfigError naming the trainer that holds it."""
    path = os.path.realpath(os.path.join(out_dir, LOCK_FILE))
    if path in _held:
        return
    os.makedirs(out_dir, exist_ok=True)
    handle = open(path, "a+")  # not "w": truncating before the lock is ours would erase the holder's name
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ConfigError(_refusal(out_dir, path)) from None
        warnings.warn(f"cannot lock {path} ({error.strerror}): this filesystem does not support flock, so a "
                      f"second trainer on {out_dir} would not be refused")
        return
    handle.truncate(0)
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    handle.flush()
    _held[path] = handle


def _holder(path: str) -> str:
    """Who holds the lock at `path`, as the holder wrote it."""
    try:
        with open(path) as handle:
            owner = json.loads(handle.read())
        return f"pid {owner['pid']} on host {owner['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"  # it took the lock an instant ago


def _refusal(out_dir: str, path: str) -> str:
    return (f"{out_dir} is in use by another trainer ({_holder(path)}, lock {path}); wait for it to end or stop "
            f"it, or choose another train.out_dir")


def hold_run_lock(out_dir: str, rank: int) -> None:
    """Collective: rank 0 locks `out_dir`; if it is refused, every rank raises ConfigError."""
    from megamu.parallel.state import any_rank

    refusal: Optional[ConfigError] = None
    if rank == 0:
        try:
            lock_run_dir(out_dir)
        except ConfigError as error:
            refusal = error
    if any_rank(refusal is not None):
        raise refusal or ConfigError(f"rank 0 found {out_dir} in use by another trainer (its error line names it)")
