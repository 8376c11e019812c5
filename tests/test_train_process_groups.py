"""Process-group layout: Megatron rank order (TP fastest, then DP, then PP), groups partition the world."""
from __future__ import annotations

import pytest

from megamu.parallel.state import ParallelLayout


def test_megatron_rank_order_tp_fastest_then_dp_then_pp():
    layout = ParallelLayout(world_size=8, tensor=2, pipeline=2)
    assert layout.data == 2
    assert layout.tensor_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.data_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.pipeline_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.model_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [layout.coords(r) for r in (0, 1, 2, 5, 7)] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 0, 1), (1, 1, 1)]
    for rank in range(8):
        assert layout.rank_of(*layout.coords(rank)) == rank


@pytest.mark.parametrize("tensor,pipeline", [(1, 1), (2, 1), (1, 4), (2, 2)])
def test_each_kind_of_group_partitions_the_world(tensor, pipeline):
    layout = ParallelLayout(world_size=8, tensor=tensor, pipeline=pipeline)
    for groups, size in ((layout.tensor_groups(), tensor), (layout.data_groups(), layout.data),
                         (layout.pipeline_groups(), pipeline)):
        assert sorted(r for g in groups for r in g) == list(range(8))
        assert {len(g) for g in groups} == {size}


def test_world_not_divisible_by_model_parallel_size_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        ParallelLayout(world_size=6, tensor=4)
