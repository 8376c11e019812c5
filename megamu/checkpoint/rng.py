"""Every random stream a rank draws from, and its per-rank file in a checkpoint.

Exact resume needs them all: Python, NumPy and torch (data order, init), CUDA, and the
tensor-parallel tracker's streams (dropout inside TP regions).
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from megamu import runtime
from megamu.errors import RankCheckpointError
from megamu.fileio import atomic_write
from megamu.parallel.random import get_rng_tracker


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tensor_parallel": get_rng_tracker().get_states()}
    if runtime.on_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "tensor_parallel" in state:
        get_rng_tracker().set_states(state["tensor_parallel"])
    if "cuda" in state and runtime.on_cuda():
        torch.cuda.set_rng_state(state["cuda"])


def rng_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{rank:05d}.pt")


def save_rng_state(ckpt_dir: str, tag: str, rank: int) -> None:
    with atomic_write(rng_path(ckpt_dir, tag, rank), "wb") as f:
        torch.save(rng_state(), f)


def load_rng_state(ckpt_dir: str, tag: str, rank: int) -> None:
    """Restore this rank's streams from checkpoint `tag` (saved by `rank`)."""
    path = rng_path(ckpt_dir, tag, rank)
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # missing, truncated or overwritten: torch names the symptom, not the file
        cause = "it does not exist" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
        raise RankCheckpointError(f"{path}, the random state of rank {rank} in checkpoint {tag}, is missing or "
                                  f"corrupt ({cause}); restore the file, or resume from an earlier checkpoint "
                                  f"(delete the folder {os.path.join(ckpt_dir, tag)})") from e
    set_rng_state(state)
