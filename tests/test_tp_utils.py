"""The multi-process test helper reports results and failures instead of hanging."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tp_utils import DistributedTestError, run_distributed


def _rank_and_sum(offset: int) -> tuple[int, float]:
    total = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(total)
    return dist.get_rank(), total.item()


def _rank_one_fails_while_rank_zero_waits() -> None:
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # never completed: rank 1 does not join


def _rank_one_dies() -> None:
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def test_returns_each_ranks_result_in_rank_order():
    assert run_distributed(2, _rank_and_sum, 10) == [(0, 21.0), (1, 21.0)]


def test_failure_on_one_rank_is_raised_with_its_traceback_without_waiting_for_the_collective():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="rank 1 failed") as failure:
        run_distributed(2, _rank_one_fails_while_rank_zero_waits)
    assert "deliberate failure on rank 1" in str(failure.value)
    assert time.monotonic() - start < 20  # the grace period, not the 60 s collective timeout
    assert run_distributed(2, _rank_and_sum, 0) == [(0, 1.0), (1, 1.0)]  # a fresh pool serves the next call


def test_a_dead_worker_is_reported():
    with pytest.raises(DistributedTestError, match="rank 1 exit code 3"):
        run_distributed(2, _rank_one_dies)
    assert run_distributed(2, _rank_and_sum, 0)[1] == (1, 1.0)


def test_functions_that_cannot_be_sent_are_refused_up_front():
    with pytest.raises(TypeError, match="module-level function"):
        run_distributed(2, lambda: None)
