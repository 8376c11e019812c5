"""Saving and resuming through DeepSpeed so that a checkpoint is complete or ignored.

DeepSpeed's `save_checkpoint` is not atomic (every rank writes into the final directory), so
after it every rank writes its RNG state, all ranks vote on success, and only then rank 0 moves
megamu's pointer. Resume reads only that pointer, so a crash mid-save leaves the previous
checkpoint in charge.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from megamu.checkpoint.pointer import POINTER, read_pointer, tag_for, write_pointer
from megamu.checkpoint.rng import load_rng_state, save_rng_state
from megamu.errors import CheckpointError


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _all_ranks_succeeded(ok: bool) -> bool:
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


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
    tag = read_pointer(ckpt_dir)
    if tag is None:
        return None
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
    load_rng_state(ckpt_dir, tag, _rank())
    return client_state
