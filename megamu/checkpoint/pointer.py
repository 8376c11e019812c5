"""Checkpoint tags and megamu's pointer to the newest complete one.

DeepSpeed's own `latest` moves before every rank has finished writing, so resume trusts only
`latest_complete`, which `store.save_checkpoint` moves after all ranks agree the save succeeded.
"""
from __future__ import annotations

import os
from typing import Optional

from megamu.fileio import atomic_write

POINTER = "latest_complete"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def diverged_tag(step: int) -> str:
    """The tag of the weights a diverged run stopped with: kept for inspection, never the pointer's target."""
    return f"{tag_for(step)}_diverged"


def read_pointer(ckpt_dir: str) -> Optional[str]:
    """The tag of the newest complete checkpoint, or None if there is none."""
    path = os.path.join(ckpt_dir, POINTER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag or None


def write_pointer(ckpt_dir: str, tag: str) -> None:
    """Point `latest_complete` at `tag`; a crash leaves the old pointer, never a torn one."""
    with atomic_write(os.path.join(ckpt_dir, POINTER)) as f:
        f.write(tag + "\n")
