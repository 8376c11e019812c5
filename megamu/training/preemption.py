"""Preemption: SIGTERM stops every rank after the same step, with a complete checkpoint, within a grace time.

SLURM sends SIGTERM to every task some time before it kills the job (KillWait, 30 s by default, or what
`--signal` asks for); a user's `kill` may reach only one rank. The handler only raises a flag. After each
optimizer step the loop asks `agreed()`, one all-reduce (MAX) of one number over the world, so every rank
sees the flag of any rank at the same step, and all of them stop there, save and exit 0.

If the step and the save have not finished `grace_s` after the signal, a timer thread ends the process
(exit 143, like a SIGTERM death) with one `error:` line naming the checkpoint a resume will use. The
checkpoint pointer moves only after a complete save, so an interrupted save is never resumed from.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Callable, Optional

import torch.distributed as dist

from megamu.parallel.state import any_rank

EXIT_GRACE_EXPIRED = 128 + signal.SIGTERM


class Preemption:
    """SIGTERM's handler while installed (a context manager), and the per-step agreement to stop."""

    def __init__(self, grace_s: float, resume_point: Callable[[], str]) -> None:
        """`resume_point()` says which checkpoint a resume would use now (for the grace-expiry message)."""
        self.grace_s = grace_s
        self.resume_point = resume_point
        self.requested = False
        self._timer: Optional[threading.Timer] = None
        self._previous: Optional[Callable] = None

    def __enter__(self) -> "Preemption":
        # Signals reach Python handlers on the main thread only; elsewhere (a test's worker thread) SIGTERM
        # keeps its default action.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._timer is not None:
            self._timer.cancel()

    def _on_sigterm(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.requested:
            return
        self.requested = True
        rank = dist.get_rank() if dist.is_initialized() else 0
        deadline = f"within train.preempt_grace_s={self.grace_s:g}s" if self.grace_s > 0 else "(no grace limit)"
        print(f"rank {rank}: SIGTERM received; stopping after the current step with a checkpoint {deadline}",
              file=sys.stderr, flush=True)
        if self.grace_s > 0:
            self._timer = threading.Timer(self.grace_s, self._grace_expired)
            self._timer.daemon = True
            self._timer.start()

    def _grace_expired(self) -> None:
        sys.stdout.flush()
        print(f"error: train.preempt_grace_s={self.grace_s:g}s passed since SIGTERM before the step and its "
              f"checkpoint were done; exiting without them. A resume uses {self.resume_point()}",
              file=sys.stderr, flush=True)
        os._exit(EXIT_GRACE_EXPIRED)

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank has received SIGTERM."""
        return any_rank(self.requested)
