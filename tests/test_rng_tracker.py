"""RNG tracker: inside fork() TP ranks draw different numbers, outside they draw the same, and the
default stream is exactly where it was after a fork."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamu.parallel.random import (MODEL_PARALLEL_RNG, TP_SEED_OFFSET, RngStateTracker, get_rng_tracker,
                                    seed_tensor_parallel_rng)
from tp_utils import run_distributed, tensor_parallel_group

SEED = 1234


def _draws_inside_and_outside_fork(tp: int) -> dict:
    group, group_index = tensor_parallel_group(tp)
    seed_tensor_parallel_rng(SEED, group)
    tracker = get_rng_tracker()
    device = tracker.device_type
    before = torch.rand(8, device=device)
    with tracker.fork():
        inside = torch.rand(8, device=device)
        inside_dropout = F.dropout(torch.ones(64, device=device), p=0.5)
    after = torch.rand(8, device=device)
    outside_dropout = F.dropout(torch.ones(64, device=device), p=0.5)
    generator = torch.Generator(device=device).manual_seed(SEED + TP_SEED_OFFSET + dist.get_rank(group))
    return {"group": group_index,
            "outside": torch.cat([before, after, outside_dropout]).cpu(),
            "inside": torch.cat([inside, inside_dropout]).cpu(),
            "inside_equals_own_seed": torch.equal(inside, torch.rand(8, device=device, generator=generator))}


@pytest.mark.parametrize("world, tp", [(2, 2), (4, 2)], ids=["tp2", "tp2-in-world4"])
def test_streams_differ_across_tp_ranks_only_inside_fork(world, tp):
    ranks = run_distributed(world, _draws_inside_and_outside_fork, tp)
    assert all(rank["inside_equals_own_seed"] for rank in ranks)  # seed + 2718 + rank in the TP group
    for group in {rank["group"] for rank in ranks}:
        members = [rank for rank in ranks if rank["group"] == group]
        assert len(members) == tp
        for other in members[1:]:
            assert torch.equal(other["outside"], members[0]["outside"])
            assert not torch.equal(other["inside"], members[0]["inside"])


def test_fork_leaves_the_default_stream_untouched():
    tracker = RngStateTracker("cpu")
    tracker.add(MODEL_PARALLEL_RNG, 7)
    torch.manual_seed(0)
    expected = torch.rand(16)
    torch.manual_seed(0)
    first = torch.rand(8)
    with tracker.fork():
        torch.rand(100)
    assert torch.equal(torch.cat([first, torch.rand(8)]), expected)


def test_fork_restores_the_default_stream_when_the_block_raises():
    tracker = RngStateTracker("cpu")
    tracker.add(MODEL_PARALLEL_RNG, 7)
    state = torch.get_rng_state()
    with pytest.raises(ZeroDivisionError):
        with tracker.fork():
            torch.rand(3)
            1 / 0
    assert torch.equal(torch.get_rng_state(), state)


def test_successive_forks_continue_one_stream():
    tracker = RngStateTracker("cpu")
    tracker.add(MODEL_PARALLEL_RNG, 7)
    with tracker.fork():
        first = torch.rand(4)
    with tracker.fork():
        second = torch.rand(4)
    assert torch.equal(torch.cat([first, second]), torch.rand(8, generator=torch.Generator().manual_seed(7)))


def test_saved_states_replay_the_same_draws():
    tracker = RngStateTracker("cpu")
    tracker.add(MODEL_PARALLEL_RNG, 7)
    saved = tracker.get_states()
    with tracker.fork():
        draws = torch.rand(5)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(5), draws)


def test_unseeded_or_doubly_seeded_streams_are_refused():
    tracker = RngStateTracker("cpu")
    with pytest.raises(KeyError, match="seed_tensor_parallel_rng"):
        with tracker.fork():
            pass
    tracker.add("dropout", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("dropout", 2)
