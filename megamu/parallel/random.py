"""Random-number streams for tensor parallelism.

Outside TP regions every TP rank computes on the same replicated activations, so their random draws
(dropout masks) must match: the default generator is seeded identically on all TP ranks. Inside a TP
region each rank holds a different shard (its own heads or MLP columns), whose dropout masks must be
independent, as they would be for the different slices of the dense tensor. Code in a TP region
draws from a second, per-rank stream by entering `get_rng_tracker().fork()`, which swaps that stream
into the default generator of the compute device and swaps it back on exit, leaving the default
stream exactly where it was.

`activation_checkpoint` recomputes a function in backward instead of keeping its activations, with the
same dropout masks: torch restores the default generator for the recomputation, and the tracker's
streams are restored here, since torch does not know them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor
from torch.distributed import ProcessGroup

from megamu import runtime
from megamu.parallel.mappings import group_rank

MODEL_PARALLEL_RNG = "model-parallel"
# Offset between the shared seed and the per-rank TP seeds (Megatron's constant, so runs are comparable).
TP_SEED_OFFSET = 2718


def _default_device_type() -> str:
    return runtime.device().type


def _state_accessors(device_type: str) -> tuple[Callable[[], Tensor], Callable[[Tensor], None]]:
    """Get/set functions for the default generator that dropout on `device_type` draws from."""
    if device_type == "cuda":
        return torch.cuda.get_rng_state, torch.cuda.set_rng_state
    if device_type == "cpu":
        return torch.get_rng_state, torch.set_rng_state
    raise ValueError(f"unsupported device type {device_type!r} for the RNG tracker; use 'cpu' or 'cuda'")


class RngStateTracker:
    """Named generator states that `fork(name)` temporarily installs as the device's default generator."""

    def __init__(self, device_type: Optional[str] = None) -> None:
        self.device_type = device_type or _default_device_type()
        self._get_state, self._set_state = _state_accessors(self.device_type)
        self._states: dict[str, Tensor] = {}

    def reset(self) -> None:
        self._states.clear()

    def add(self, name: str, seed: int) -> None:
        """Register a stream `name` starting from `seed`; the default generator is left untouched."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists; call reset() before seeding it again")
        generator = torch.Generator(device=self.device_type)
        generator.manual_seed(seed)
        self._states[name] = generator.get_state()

    def get_states(self) -> dict[str, Tensor]:
        """Copies of every stream's state, for checkpoints (exact resume needs them)."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, Tensor]) -> None:
        """Restore streams saved by get_states()."""
        self._states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Draw from stream `name` inside the block; the default stream resumes unchanged afterwards."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never seeded; call "
                           f"megamu.parallel.random.seed_tensor_parallel_rng(seed, tp_group) first")
        outside_state = self._get_state()
        self._set_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._get_state()
            self._set_state(outside_state)

    def replay_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """torch.utils.checkpoint's `context_fn`: called at the forward, it snapshots every stream; its second
        context runs the recomputation from that snapshot."""
        # A shallow copy is a true snapshot: fork() replaces a stream's state tensor, never writes into it.
        return contextlib.nullcontext(), _Replay(self, dict(self._states))


class _Replay:
    """Streams at `states` inside the block, and as they were before it afterwards. A class, not a generator:
    each backward through a retained graph recomputes, so enters it, again."""

    def __init__(self, tracker: RngStateTracker, states: dict[str, Tensor]) -> None:
        self.tracker, self.states = tracker, states
        self.outside: dict[str, Tensor] = {}

    def __enter__(self) -> None:
        self.outside, self.tracker._states = self.tracker._states, dict(self.states)

    def __exit__(self, *exc: object) -> None:
        self.tracker._states = self.outside


_TRACKER: Optional[RngStateTracker] = None


def get_rng_tracker() -> RngStateTracker:
    """The process-wide tracker (created on first use, for CUDA when available, else CPU)."""
    global _TRACKER
    if _TRACKER is None:
        _TRACKER = RngStateTracker()
    return _TRACKER


def activation_checkpoint(function: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """function(*args) through torch's non-reentrant checkpoint: only `args` are kept for backward, which
    reruns `function` with the default generator and every tracker stream as they were at the forward, so
    dropout draws the same masks, and leaves them all where they were. Without grad it is a plain call."""
    if not torch.is_grad_enabled():
        return function(*args)
    if torch.compiler.is_compiling():
        # A compiled checkpoint replays the default generator itself but not the tracker's streams (its
        # context_fn must be a dispatch mode), so the config refuses compile with TP dropout here.
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                             context_fn=get_rng_tracker().replay_contexts)


def seed_tensor_parallel_rng(seed: int, group: Optional[ProcessGroup]) -> None:
    """Seed the default generators with `seed` (same on every TP rank) and the tracker's model-parallel
    stream with `seed + 2718 + tp_rank` (different on every TP rank).

    Callers that want different streams across pipeline stages or data-parallel ranks offset `seed`
    before calling (Megatron adds 100 · pipeline rank).
    """
    torch.manual_seed(seed)
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, seed + TP_SEED_OFFSET + group_rank(group))
