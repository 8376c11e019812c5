"""Distributed batch sampler: the same samples per step whatever the DP size, disjoint rank slices,
exact resume from a state dict, clear errors, and the DataLoader helper."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megamu.config import ConfigError
from megamu.data.sampler import DistributedBatchSampler, make_dataloader


def per_step_batches(total: int, global_batch: int, micro: int, dp: int) -> list[list[list[int]]]:
    """For each global step, the micro batches of every rank (rank-major)."""
    samplers = [DistributedBatchSampler(total, global_batch, micro, r, dp) for r in range(dp)]
    streams = [list(s) for s in samplers]
    accumulation = global_batch // (micro * dp)
    steps = len(streams[0]) // accumulation
    return [[batch for stream in streams for batch in stream[s * accumulation:(s + 1) * accumulation]]
            for s in range(steps)]


def test_each_step_is_the_same_global_batch_for_dp_1_2_4():
    total, global_batch, micro = 100, 16, 2  # 100 is not a multiple of 16: the partial batch is dropped
    by_dp = {dp: per_step_batches(total, global_batch, micro, dp) for dp in (1, 2, 4)}
    for dp, steps in by_dp.items():
        assert len(steps) == total // global_batch
        for s, batches in enumerate(steps):
            flat = [i for batch in batches for i in batch]
            assert len(flat) == len(set(flat)) == global_batch  # rank slices are disjoint
            assert set(flat) == set(range(s * global_batch, (s + 1) * global_batch))
            assert all(len(batch) == micro for batch in batches)
    for s in range(total // global_batch):
        assert ({i for b in by_dp[1][s] for i in b} == {i for b in by_dp[2][s] for i in b}
                == {i for b in by_dp[4][s] for i in b})


def test_rank_slice_layout():
    sampler = DistributedBatchSampler(64, global_batch_size=16, micro_batch_size=2, dp_rank=1, dp_size=4)
    assert sampler.accumulation_steps == 2
    assert list(sampler)[:4] == [[2, 3], [10, 11], [18, 19], [26, 27]]


def test_resume_continues_with_the_next_global_batch():
    args = dict(total_samples=96, global_batch_size=12, micro_batch_size=3, dp_rank=1, dp_size=2)
    uninterrupted = list(DistributedBatchSampler(**args))
    first = DistributedBatchSampler(**args)
    stream = iter(first)
    accumulation = first.accumulation_steps
    seen = [next(stream) for _ in range(3 * accumulation)]  # three full steps
    state = first.state_dict()
    assert state == {"consumed_samples": 36}
    resumed = DistributedBatchSampler(**args)
    resumed.load_state_dict(state)
    assert len(resumed) == len(uninterrupted) - len(seen)
    assert seen + list(resumed) == uninterrupted
    assert list(DistributedBatchSampler(**args, consumed_samples=36)) == uninterrupted[len(seen):]


def test_state_counts_only_whole_global_batches():
    sampler = DistributedBatchSampler(40, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=2)
    stream = iter(sampler)
    next(stream)
    assert sampler.state_dict() == {"consumed_samples": 0}
    next(stream)  # the last micro batch of step 0
    assert sampler.state_dict() == {"consumed_samples": 8}
    with pytest.raises(ValueError, match="multiple of the global batch size"):
        sampler.load_state_dict({"consumed_samples": 12})


def test_global_batch_not_divisible_names_the_key():
    with pytest.raises(ConfigError, match="train.global_batch_size=12"):
        DistributedBatchSampler(100, global_batch_size=12, micro_batch_size=4, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank"):
        DistributedBatchSampler(100, global_batch_size=8, micro_batch_size=4, dp_rank=2, dp_size=2)


def test_dataloader_collates_long_tensors_in_sampler_order():
    seq_len = 5
    dataset = [{"tokens": np.arange(i, i + seq_len + 1, dtype=np.int64)} for i in range(24)]
    sampler = DistributedBatchSampler(24, global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2)
    expected = list(DistributedBatchSampler(24, global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2))
    batches = list(make_dataloader(dataset, sampler))
    assert len(batches) == len(expected) == 6
    for batch, indices in zip(batches, expected):
        assert batch.dtype == torch.long and batch.shape == (2, seq_len + 1)
        assert batch[:, 0].tolist() == indices
