"""Saving and resuming through DeepSpeed so that a checkpoint is complete or ignored.

DeepSpeed's `save_checkpoint` is not atomic (every rank writes into the final directory), so
after it every rank writes its RNG state, all ranks vote on success, and only then rank 0 moves
megamu's pointer. Resume reads only that pointer, so a crash mid-save leaves the previous
checkpoint in charge. Every rank must read the same pointer (the checkpoint directory is shared), and
the saved layout must allow the current one (layout.py), before DeepSpeed loads anything.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Optional

import torch
import torch.distributed as dist

from megamu import runtime
from megamu.checkpoint.layout import CheckpointLayout, check_resumable, read_layout, rng_source_rank, save_layout
from megamu.checkpoint.pointer import POINTER, read_pointer, tag_for, write_pointer
from megamu.checkpoint.rng import load_rng_state, save_rng_state
from megamu.errors import CheckpointError
from megamu.parallel.state import get_parallel_state


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _all_ranks_succeeded(ok: bool) -> bool:
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=runtime.device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _current_layout(engine: Any) -> CheckpointLayout:
    layout = get_parallel_state().layout
    return CheckpointLayout(layout.tensor, layout.pipeline, layout.data, int(engine.zero_optimization_stage()))


def _shown(tag: Optional[str]) -> str:
    return repr(tag) if tag else "no pointer"


def _agreed_tag(ckpt_dir: str) -> Optional[str]:
    """The pointer's tag, once every rank has read the same one.

    Ranks on nodes that do not share the checkpoint directory read different pointers (or none); loading
    anyway would mix checkpoints or hang in DeepSpeed's collectives, so every rank raises instead.
    """
    tag = read_pointer(ckpt_dir)
    if not dist.is_initialized():
        return tag
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, (tag, socket.gethostname()))
    first_tag, first_host = views[0]
    differing = [rank for rank, (seen, _host) in enumerate(views) if seen != first_tag]
    if not differing:
        return tag
    path = os.path.join(ckpt_dir, POINTER)
    rank = dist.get_rank()
    if rank in differing:
        what = (f"rank {rank} on {socket.gethostname()} reads {_shown(tag)} at {path}, but rank 0 on {first_host} "
                f"reads {_shown(first_tag)}")
    else:
        hosts = sorted({views[r][1] for r in differing})
        what = f"rank(s) {differing} on {', '.join(hosts)} read another {path} than rank 0 ({_shown(first_tag)})"
    raise CheckpointError(f"{what}: the checkpoint directory must be on storage every node shares (a network or "
                          f"parallel file system mounted at the same path on every node); set train.out_dir to "
                          f"such a path")


def save_checkpoint(engine: Any, ckpt_dir: str, step: int, client_state: dict[str, Any]) -> str:
    """Save through DeepSpeed, then move megamu's pointer once every rank has written everything.

    Collective: every rank must call it. Returns the tag.
    """
    tag = tag_for(step)
    rank = _rank()
    error: Optional[BaseException] = None
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
        save_rng_state(ckpt_dir, tag, rank)
        if rank == 0:
            save_layout(ckpt_dir, tag, _current_layout(engine))
    except Exception as e:  # reported after the vote, so no rank blocks waiting for a failed peer
        error = e
    if not _all_ranks_succeeded(error is None):
        # Not a CheckpointError: the cause may be a bug, whose traceback must survive.
        raise RuntimeError(f"checkpoint {tag} in {ckpt_dir} failed on at least one rank; "
                           f"{POINTER} still names the previous complete checkpoint") from error
    if rank == 0:
        write_pointer(ckpt_dir, tag)
    if dist.is_initialized():
        dist.barrier()  # nobody reads the pointer (or exits) before it has moved
    return tag


def load_checkpoint(engine: Any, ckpt_dir: str) -> Optional[dict[str, Any]]:
    """Restore the newest complete checkpoint into `engine` and this rank's RNGs.

    Returns DeepSpeed's client state (step, sampler position, ...), or None when there is no
    complete checkpoint to resume from.
    """
    tag = _agreed_tag(ckpt_dir)
    if tag is None:
        return None
    saved, current = read_layout(ckpt_dir, tag), _current_layout(engine)
    if saved is not None:  # checkpoints from before layout records load as before
        check_resumable(saved, current, os.path.join(ckpt_dir, tag))
    try:
        load_path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    except Exception as e:  # DeepSpeed's own message names files, not the usual cause
        raise CheckpointError(f"could not load checkpoint {tag} from {ckpt_dir} ({type(e).__name__}: {e}). A "
                              f"checkpoint resumes with the ZeRO stage, parallel layout and world size it was saved "
                              f"with; without --deepspeed_config the stage is 0 on one data-parallel rank and 1 "
                              f"otherwise, so pass the json the run was started with") from e
    if load_path is None:
        raise CheckpointError(f"{os.path.join(ckpt_dir, POINTER)} names {tag!r} but DeepSpeed could not load it; "
                              f"delete the pointer to start afresh or point it at another complete tag")
    rng_rank = _rank()
    if saved is not None and saved.data != current.data:
        state = get_parallel_state()
        rng_rank = rng_source_rank(saved, state.tp_rank, state.pp_rank)
        if _rank() == 0:
            print(f"resuming {tag}, saved with {saved.data} data-parallel rank(s), on {current.data}: every rank "
                  f"restores the random state of data-parallel rank 0 at its tensor and pipeline position",
                  flush=True)
    load_rng_state(ckpt_dir, tag, rng_rank)
    return client_state
