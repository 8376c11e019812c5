"""Heartbeats through the rendezvous store, so that losing a rank ends every other rank quickly, naming it.

Survivors of a lost rank otherwise learn of it only from a collective: gloo notices at once a process killed
on a machine that is still up (its sockets close), but a node that loses power or network leaves them
blocked until the collective timeout, and no error says which rank is missing. `dist.monitored_barrier`
names the missing ranks, but it is a collective of its own: every rank must call it at the same point, so
it cannot run while the main thread waits inside another collective, only rank 0 learns the names, and it
is gloo-only. The store needs none of that.

Every rank runs two daemon threads. The beater adds 1 to this rank's counter in the store and reads every
rank's counter and status, each `interval`; a store call can block (a hung store host answers nothing),
so it never judges. The judge looks at what the beater saw: a peer whose counter has not moved for
`timeout_s` (on this rank's monotonic clock, so host clocks need not agree), a store that has not answered
for that long (rank 0 hosts it under the deepspeed launcher and our tests), or a peer that reported a
failure, ends this process with one `error:` line and `os._exit(EXIT_PEER_LOST)`: nothing else gets a
thread out of a blocked collective.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist
from torch.distributed import distributed_c10d

EXIT_PEER_LOST = 4
STORE_HOST_RANK = 0
_PREFIX = "megamu/heartbeat"
_RUNNING, _FAILED = b"running", b"failed"


def _count_key(rank: int) -> str:
    return f"{_PREFIX}/count/{rank}"


def _status_key(rank: int) -> str:
    return f"{_PREFIX}/status/{rank}"


@dataclass
class _Seen:
    count: int = -1
    status: bytes = _RUNNING
    changed_at: float = 0.0  # monotonic time this rank last saw the count move


class Watchdog:
    """This rank's heartbeat and its judgement of every peer's; `start_watchdog` builds one."""

    def __init__(self, rank: int, hosts: list[str], timeout_s: float) -> None:
        self.rank = rank
        self.hosts = hosts
        self.timeout_s = timeout_s
        # Several beats per timeout, so a live peer is never mistaken for a silent one; at most 5 s apart,
        # so a long timeout still detects within timeout + 5 s.
        self.interval = min(5.0, timeout_s / 4)
        self._peers = [r for r in range(len(hosts)) if r != rank]
        now = time.monotonic()
        self._seen = {r: _Seen(changed_at=now) for r in self._peers}
        self._store_ok_at = now
        self._read_started_at = 0.0  # when the newest completed store round began
        self._store_error = ""
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._explaining = False
        # A clone is a connection of its own: the main thread's store calls never queue behind the beater's.
        self._store = distributed_c10d._get_default_store().clone()
        self._store.set_timeout(datetime.timedelta(seconds=max(1.0, self.interval)))
        for target, name in ((self._beat, "megamu-heartbeat"), (self._judge, "megamu-watchdog")):
            threading.Thread(target=target, name=name, daemon=True).start()

    # ---- the two threads ----------------------------------------------------------------
    def _beat(self) -> None:
        keys = [k for r in self._peers for k in (_count_key(r), _status_key(r))]
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                self._store.add(_count_key(self.rank), 1)
                values = self._store.multi_get(keys)
            except Exception as e:  # the store is gone or broken: the judge decides when that is fatal
                with self._lock:
                    self._store_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                return  # a broken client stays broken; retrying would only repeat torch's warnings
            now = time.monotonic()
            with self._lock:
                self._store_ok_at, self._read_started_at = now, started
                for i, peer in enumerate(self._peers):
                    seen = self._seen[peer]
                    count, seen.status = int(values[2 * i]), values[2 * i + 1]
                    if count != seen.count:
                        seen.count, seen.changed_at = count, now
            self._stopped.wait(self.interval)

    def _judge(self) -> None:
        while not self._stopped.wait(self.interval):
            verdict = self._verdict()
            if verdict is not None:
                self._die(verdict)

    def _verdict(self) -> Optional[str]:
        """Why this rank must stop, or None."""
        now = time.monotonic()
        with self._lock:
            store_age = now - self._store_ok_at
            if store_age > self.timeout_s:
                why = f" ({self._store_error})" if self._store_error else ""
                return (f"{self._name(STORE_HOST_RANK)} stopped sending heartbeats {store_age:.1f}s ago: the "
                        f"rendezvous store it hosts stopped answering{why}")
            for peer, seen in self._seen.items():
                if seen.status == _FAILED and not self._explaining:
                    return f"{self._name(peer)} failed (its log has the cause)"
                age = now - seen.changed_at
                if seen.status == _RUNNING and age > self.timeout_s:
                    return f"{self._name(peer)} stopped sending heartbeats {age:.1f}s ago"
        return None

    def _name(self, rank: int) -> str:
        return f"rank {rank} (host {self.hosts[rank]})"

    def _die(self, verdict: str) -> None:
        sys.stdout.flush()
        print(f"error: {verdict}; stopping", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    # ---- called by the main thread --------------------------------------------------------
    def stop(self) -> None:
        """Stop judging and beating. Call only once every rank is known to be done (after a barrier):
        a rank that simply stops beating is taken for lost by the others."""
        self._stopped.set()

    def fail(self, maybe_peer_loss: bool) -> None:
        """This rank is ending with an error: tell the peers, after giving a lost peer the blame it is due.

        `maybe_peer_loss`: the error may be a collective failing because a peer died. Then wait until every
        peer has shown it is alive (its count moved, or it reported a failure too); if one stays silent,
        the judge ends this process naming it, instead of the caller printing the collective's echo, and if
        one reported a failure, this process ends naming that peer.
        """
        if maybe_peer_loss:
            self._wait_for_peers()
        self.stop()
        try:
            distributed_c10d._get_default_store().set(_status_key(self.rank), _FAILED)
        except Exception:  # the store may be what failed; the peers then judge by silence
            pass
        with self._lock:
            failed = [peer for peer, seen in self._seen.items() if seen.status == _FAILED]
        if maybe_peer_loss and failed:
            # This rank's error is most likely the echo of a collective the failed peer broke off: the peer's
            # own log says why, so one line here rather than this rank's traceback.
            self._die(f"{self._name(failed[0])} failed (its log has the cause), and this rank with it")

    def _wait_for_peers(self) -> None:
        since = time.monotonic()
        with self._lock:
            self._explaining = True
        deadline = since + self.timeout_s + 3 * self.interval  # the judge has spoken by then
        counts: Optional[dict[int, int]] = None
        while time.monotonic() < deadline:
            with self._lock:
                # Counts from a read begun after the error: a beat a peer sent just before it died, and this
                # rank had not read yet, must not pass for a sign of life.
                if counts is None and self._read_started_at > since:
                    counts = {peer: seen.count for peer, seen in self._seen.items()}
                if counts is not None and all(seen.count > counts[p] or seen.status == _FAILED
                                              for p, seen in self._seen.items()):
                    return
            time.sleep(self.interval / 4)


def start_watchdog(timeout_s: float) -> Optional[Watchdog]:
    """Collective: start every rank's watchdog (None when `timeout_s` is 0 or the world is one rank)."""
    if timeout_s <= 0 or dist.get_world_size() == 1:
        return None
    rank = dist.get_rank()
    store = distributed_c10d._get_default_store()
    store.set(_status_key(rank), _RUNNING)
    store.add(_count_key(rank), 0)
    hosts: list[Optional[str]] = [None] * dist.get_world_size()
    # Also the barrier after which every rank's keys exist, so the beaters' reads never wait for one.
    dist.all_gather_object(hosts, socket.gethostname())
    return Watchdog(rank, [str(h) for h in hosts], timeout_s)
