"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism.

Rank order follows Megatron: TP varies fastest, then DP, then PP, so the ranks of a TP group
are neighbours (same node, fastest links) and

    rank = tp_rank + TP * (dp_rank + DP * pp_rank),   DP = world_size / (TP * PP).

Every group is created with the configured timeout, DeepSpeed's own included: a sub-group created
without one keeps the backend's default, and survivors of a dead rank would block that long.

Tensor-parallel layers use `get_tensor_model_parallel_group()` / `_rank()` / `_world_size()`;
`ParallelState` is also the `mpu` object `deepspeed.initialize(mpu=...)` expects.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from megamu import runtime
from megamu.parallel.launch_env import apply_launch_env


@dataclass(frozen=True)
class ParallelLayout:
    """Pure rank arithmetic for a (TP, DP, PP) grid; no process groups involved."""

    world_size: int
    tensor: int = 1
    pipeline: int = 1

    def __post_init__(self) -> None:
        if self.world_size % (self.tensor * self.pipeline):
            raise ValueError(f"world size {self.world_size} is not divisible by tensor ({self.tensor}) "
                             f"x pipeline ({self.pipeline})")

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)

    def rank_of(self, tp: int, dp: int, pp: int) -> int:
        return tp + self.tensor * (dp + self.data * pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        tp = rank % self.tensor
        dp = (rank // self.tensor) % self.data
        pp = rank // (self.tensor * self.data)
        return tp, dp, pp

    def tensor_groups(self) -> list[list[int]]:
        return [[self.rank_of(t, d, p) for t in range(self.tensor)]
                for p in range(self.pipeline) for d in range(self.data)]

    def data_groups(self) -> list[list[int]]:
        return [[self.rank_of(t, d, p) for d in range(self.data)]
                for p in range(self.pipeline) for t in range(self.tensor)]

    def pipeline_groups(self) -> list[list[int]]:
        return [[self.rank_of(t, d, p) for p in range(self.pipeline)]
                for d in range(self.data) for t in range(self.tensor)]

    def model_groups(self) -> list[list[int]]:
        """TP x PP ranks holding one full model replica (Megatron's "model parallel" group)."""
        return [[self.rank_of(t, d, p) for p in range(self.pipeline) for t in range(self.tensor)]
                for d in range(self.data)]


class ParallelState:
    """This rank's process groups; also DeepSpeed's `mpu` interface."""

    def __init__(self, layout: ParallelLayout, rank: int, timeout: datetime.timedelta) -> None:
        self.layout = layout
        self.rank = rank
        self.tp_rank, self.dp_rank, self.pp_rank = layout.coords(rank)
        # new_group is collective: every rank creates every group, in the same order.
        self.tensor_group = self._own_group(layout.tensor_groups(), timeout)
        self.data_group = self._own_group(layout.data_groups(), timeout)
        self.pipeline_group = self._own_group(layout.pipeline_groups(), timeout)
        self.model_group = self._own_group(layout.model_groups(), timeout)
        self.data_group_ranks = next(r for r in layout.data_groups() if rank in r)

    def _own_group(self, all_ranks: list[list[int]], timeout: datetime.timedelta) -> dist.ProcessGroup:
        mine = None
        for ranks in all_ranks:
            group = dist.new_group(ranks, timeout=timeout)
            if self.rank in ranks:
                mine = group
        if mine is None:
            raise RuntimeError(f"rank {self.rank} is in none of the groups {all_ranks}: the world has "
                               f"{self.layout.world_size} ranks, so RANK must be below that")
        return mine

    # ---- tensor parallel (used by TP layers) ---------------------------------------------
    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.tensor_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tensor

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group (the broadcast source)."""
        return self.rank - self.tp_rank

    # ---- pipeline parallel ---------------------------------------------------------------
    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self.pipeline_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.layout.pipeline

    # ---- data parallel -------------------------------------------------------------------
    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.data_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.data

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.data_group_ranks)

    # ---- model parallel = TP x PP (DeepSpeed sums gradient norms over this group) ----------
    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.model_group

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank + self.layout.tensor * self.pp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tensor * self.layout.pipeline


_STATE: Optional[ParallelState] = None


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` torch's default for groups created without one.

    DeepSpeed creates groups of its own without a timeout (its pipeline grid, ZeRO and sequence-parallel
    groups), and torch gives those its backend default, not the default group's: 30 minutes under gloo.
    torch reads these module globals each time such a group is created.
    """
    distributed_c10d.default_pg_timeout = timeout
    if distributed_c10d.default_pg_nccl_timeout is not None:  # None: torch built without NCCL
        distributed_c10d.default_pg_nccl_timeout = timeout


def initialize_parallel(tensor: int = 1, pipeline: int = 1, timeout_minutes: float = 10.0) -> ParallelState:
    """Start torch.distributed through DeepSpeed (nccl on CUDA, gloo on CPU) and build the groups.

    Safe to call again in the same process (tests do): the default group is reused and the
    sub-groups are rebuilt for the requested layout.
    """
    global _STATE
    import deepspeed  # deferred: importing deepspeed takes seconds

    timeout = datetime.timedelta(minutes=timeout_minutes)
    # A world of one, or the ranks srun / mpirun started; without these variables DeepSpeed would look for MPI.
    apply_launch_env()
    runtime.bind_device()
    _default_group_timeout(timeout)
    deepspeed.init_distributed(dist_backend=runtime.backend(), timeout=timeout, verbose=False)
    layout = ParallelLayout(dist.get_world_size(), tensor, pipeline)
    _STATE = ParallelState(layout, dist.get_rank(), timeout)
    return _STATE


def any_rank(flag: bool, group: Optional[dist.ProcessGroup] = None) -> bool:
    """Collective over `group` (default: the world): True on every rank when `flag` is true on at least one,
    so ranks take the same branch (skip a step, stop, refuse a checkpoint) whatever each saw alone."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return flag
    buf = torch.tensor([float(flag)], device=runtime.device())
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    return buf.item() > 0.0


def get_parallel_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("parallel state is not initialised: call megamu.parallel.initialize_parallel first")
    return _STATE


def is_initialized() -> bool:
    return _STATE is not None
