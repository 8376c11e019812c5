"""The parallel layout a checkpoint was saved with, and which changes a resume can absorb.

DeepSpeed writes one model file per TP (and PP) rank and, under ZeRO ≥ 1, one optimizer-state partition
per DP rank, so the layout decides what a checkpoint can be loaded into:

- another TP or PP size: refused (the weights can be merged with `megamu-merge`, the optimizer state not);
- another DP size at ZeRO 0: fine, the optimizer state is whole in each TP rank's model file;
- another DP size at ZeRO 1 or 2 (any TP and PP), under the stage it was saved with: through DeepSpeed's
  universal checkpoint (universal.py), as DeepSpeed's ordinary load cannot repartition the optimizer state;
- another DP size otherwise: refused. ZeRO 3 and a change of stage are conversions megamu does not make;
- another ZeRO stage at the same DP size: refused, but for 1 ↔ 2, which save the same files.

Each checkpoint carries `layout.json`, written by rank 0 before the ranks vote on the save.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

from megamu.errors import CheckpointError
from megamu.fileio import atomic_write
from megamu.parallel.state import ParallelLayout

LAYOUT_FILE = "layout.json"


@dataclass(frozen=True)
class CheckpointLayout:
    tensor: int
    pipeline: int
    data: int
    zero_stage: int

    @property
    def grid(self) -> ParallelLayout:
        return ParallelLayout(self.tensor * self.pipeline * self.data, self.tensor, self.pipeline)


def layout_path(ckpt_dir: str, tag: str) -> str:
    return os.path.join(ckpt_dir, tag, LAYOUT_FILE)


def save_layout(ckpt_dir: str, tag: str, layout: CheckpointLayout) -> None:
    with atomic_write(layout_path(ckpt_dir, tag)) as f:
        json.dump(asdict(layout), f)


def read_layout(ckpt_dir: str, tag: str) -> Optional[CheckpointLayout]:
    """The saved layout, or None for a checkpoint written before megamu recorded it."""
    path = layout_path(ckpt_dir, tag)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return CheckpointLayout(**json.load(f))


def check_resumable(saved: CheckpointLayout, current: CheckpointLayout, where: str) -> None:
    """Raise CheckpointError, naming the fix, when checkpoint `where` cannot resume in `current`."""
    if (saved.tensor, saved.pipeline) != (current.tensor, current.pipeline):
        raise CheckpointError(
            f"{where} was saved with parallel.tensor={saved.tensor} parallel.pipeline={saved.pipeline}, but this "
            f"run has parallel.tensor={current.tensor} parallel.pipeline={current.pipeline}; resuming changes only "
            f"the data-parallel size. Resume with the saved tensor and pipeline sizes, or merge the weights into "
            f"one state dict with `megamu-merge RUN_DIR --output merged.pt` (weights only: the optimizer state "
            f"and data position are not carried over)")
    partitioned = saved.zero_stage or current.zero_stage
    if saved.data != current.data and partitioned and not needs_universal(saved, current):
        raise CheckpointError(
            f"{where} was saved with {saved.data} data-parallel rank(s) under ZeRO stage {saved.zero_stage}, and "
            f"this run has {current.data} under ZeRO stage {current.zero_stage}; the data-parallel size can change "
            f"only under ZeRO 0, or under the ZeRO 1 or 2 stage it was saved with (through DeepSpeed's universal "
            f"checkpoint): {_dp_change_fix(saved)}")
    # ZeRO 1 and 2 keep the same files (optimizer partitions by DP rank); other stages keep other ones.
    if saved.zero_stage != current.zero_stage and {saved.zero_stage, current.zero_stage} != {1, 2}:
        raise CheckpointError(
            f"{where} was saved under ZeRO stage {saved.zero_stage}, and this run uses stage {current.zero_stage}, "
            f"whose checkpoint files differ; pass --deepspeed_config zero{saved.zero_stage} (or the json the run "
            f"was started with; without it the stage is 0 on one data-parallel rank and 1 otherwise)")


def needs_universal(saved: CheckpointLayout, current: CheckpointLayout) -> bool:
    """Whether resuming `saved` in `current` goes through a universal checkpoint: a DP-size change with ZeRO 1/2
    optimizer partitions (every save carries the patterns the converter merges TP slices by)."""
    return saved.data != current.data and saved.zero_stage in (1, 2) and current.zero_stage == saved.zero_stage


def _dp_change_fix(saved: CheckpointLayout) -> str:
    same_dp = (f"resume with {saved.data} data-parallel rank(s) (world size "
               f"{saved.tensor * saved.pipeline * saved.data})")
    if saved.zero_stage == 0:
        return ("pass --deepspeed_config zero0, the stage it was saved with (without it the stage is 1 on more "
                "than one data-parallel rank)")
    if saved.zero_stage in (1, 2):
        return (f"pass --deepspeed_config zero{saved.zero_stage}, the stage it was saved with (without it the "
                f"stage is 0 on one data-parallel rank and 1 otherwise), or {same_dp}")
    return same_dp


def rng_source_rank(saved: CheckpointLayout, tp_rank: int, pp_rank: int) -> int:
    """The saved rank whose RNG file a rank at (tp_rank, pp_rank) restores after a change of DP size.

    DP rank 0 at the same (TP, PP) position: the DP ranks of one position are seeded alike and draw alike
    (Python, NumPy, torch and the TP tracker), so any of their files is the right one.
    """
    return saved.grid.rank_of(tp_rank, 0, pp_rank)
