"""Checkpoints that are complete or ignored.

DeepSpeed's `save_checkpoint` is not atomic (every rank writes into the final directory and rank
0 moves `latest` before the last rank is done), so megamu keeps its own pointer,
`checkpoints/latest_complete`: after DeepSpeed's save, every rank writes its RNG state, all
ranks agree that each of them succeeded, and only then rank 0 replaces the pointer atomically
(write a temporary file, fsync, rename). Resume reads only that pointer, so a crash mid-save
leaves the previous checkpoint in charge.
"""
from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megamu.parallel.random import get_rng_tracker

POINTER = "latest_complete"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tensor_parallel": get_rng_tracker().get_states()}  # dropout inside TP regions
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "tensor_parallel" in state:
        get_rng_tracker().set_states(state["tensor_parallel"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{rank:05d}.pt")


def read_pointer(ckpt_dir: str) -> Optional[str]:
    """The tag of the newest complete checkpoint, or None if there is none."""
    path = os.path.join(ckpt_dir, POINTER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag or None


def write_pointer(ckpt_dir: str, tag: str) -> None:
    """Atomically point `latest_complete` at `tag`."""
    path = os.path.join(ckpt_dir, POINTER)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(tag + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    rank = dist.get_rank() if dist.is_initialized() else 0
    error: Optional[BaseException] = None
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
        rng_file = _rng_path(ckpt_dir, tag, rank)
        torch.save(rng_state(), rng_file + ".tmp")
        os.replace(rng_file + ".tmp", rng_file)
    except Exception as e:  # reported after the vote, so no rank blocks waiting for a failed peer
        error = e
    if not _all_ranks_succeeded(error is None):
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
        raise RuntimeError(f"could not load checkpoint {tag} from {ckpt_dir} ({type(e).__name__}: {e}). A checkpoint "
                           f"resumes with the ZeRO stage, parallel layout and world size it was saved with; without "
                           f"--deepspeed_config the stage is 0 on one data-parallel rank and 1 otherwise, so pass the "
                           f"json the run was started with") from e
    if load_path is None:
        raise RuntimeError(f"{os.path.join(ckpt_dir, POINTER)} names {tag!r} but DeepSpeed could not load it; "
                           f"delete the pointer to start afresh or point it at another complete tag")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = _rng_path(ckpt_dir, tag, rank)
    if not os.path.isfile(rng_file):
        raise RuntimeError(f"{rng_file} is missing: checkpoint {tag} was saved with a different world size; "
                           f"resume with the same number of ranks")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
