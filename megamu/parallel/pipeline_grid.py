"""DeepSpeed's pipeline topology for megamu's layout, and the start-up check that both agree.

DeepSpeed refuses an `mpu` next to a PipelineModule: its pipeline engine builds its own groups (data
parallel for gradient reduction, pipe for activations and the loss, model for gradient norms) from a
topology. Axes (pipe, data, model) with model fastest give rank = model + TP·(data + DP·pipe), megamu's
order, so the engine's groups hold the same ranks as megamu's, which the TP layers use.
"""
from __future__ import annotations

from typing import Any

from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megamu.parallel.state import ParallelLayout, ParallelState


def pipeline_topology(layout: ParallelLayout) -> PipeModelDataParallelTopology:
    """The topology of `layout`; RuntimeError when DeepSpeed would number the ranks differently."""
    topology = PipeModelDataParallelTopology(num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data)
    for rank in range(layout.world_size):
        coord = topology.get_coord(rank)
        if (coord.model, coord.data, coord.pipe) != layout.coords(rank):
            raise RuntimeError(f"DeepSpeed's pipeline topology puts rank {rank} at (tp, dp, pp) = "
                               f"{(coord.model, coord.data, coord.pipe)} but megamu's layout at "
                               f"{layout.coords(rank)}; the rank orders disagree")
    return topology


def check_pipeline_grid(grid: Any, state: ParallelState) -> None:
    """RuntimeError unless the pipeline engine's groups (`PipelineModule.mpu()`) hold megamu's ranks."""
    layout, rank = state.layout, state.rank

    def mine(groups: list[list[int]]) -> list[int]:
        return next(ranks for ranks in groups if rank in ranks)

    expected = {"tensor": mine(layout.tensor_groups()), "data": mine(layout.data_groups()),
                "pipeline": mine(layout.pipeline_groups())}
    found = {"tensor": sorted(grid.slice_group), "data": sorted(grid.dp_group), "pipeline": sorted(grid.pp_group)}
    for axis, ranks in expected.items():
        if sorted(ranks) != found[axis]:
            raise RuntimeError(f"rank {rank}: DeepSpeed's pipeline grid has {axis}-parallel ranks {found[axis]} "
                               f"but megamu's process groups have {sorted(ranks)}")
