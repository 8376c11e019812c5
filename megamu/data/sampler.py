"""Distributed, resumable batch sampler: step s sees the same samples whatever the data-parallel size.

Global batch s is dataset indices [s·G, (s+1)·G). It is consumed in G / (micro·dp)
accumulation steps; at accumulation step j, DP rank r takes the `micro` indices starting at
s·G + j·micro·dp + r·micro. Changing dp (or micro) changes who computes what, never which
samples make up a step, so runs at different scales and resumed runs see the same data.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from megamu import runtime
from megamu.config import batch_accumulation


class DistributedBatchSampler:
    """Yields this rank's micro batches (lists of `micro_batch_size` indices) in training order.

    Only whole global batches are used: a trailing partial one is dropped. The state counts
    the samples of every global batch whose last micro batch has been handed out.
    """

    def __init__(self, total_samples: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, consumed_samples: int = 0) -> None:
        accumulation_steps = batch_accumulation(global_batch_size, micro_batch_size, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if total_samples < 0:
            raise ValueError(f"total_samples must be non-negative, got {total_samples}")
        self.total_samples = total_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.accumulation_steps = accumulation_steps
        self._set_consumed(consumed_samples)

    def _set_consumed(self, consumed_samples: int) -> None:
        if consumed_samples < 0 or consumed_samples % self.global_batch_size:
            raise ValueError(f"consumed_samples={consumed_samples} must be a non-negative multiple of the global "
                             f"batch size {self.global_batch_size} (a resumed run restarts at a global batch)")
        if consumed_samples > self.total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} exceeds the dataset's {self.total_samples} samples")
        self.consumed_samples = consumed_samples

    @property
    def num_global_batches(self) -> int:
        """Global batches still to come."""
        return (self.total_samples - self.consumed_samples) // self.global_batch_size

    def micro_batch(self, step: int, accumulation_step: int) -> list[int]:
        """This rank's indices at accumulation step `accumulation_step` of global batch `step`."""
        start = (step * self.global_batch_size + accumulation_step * self.micro_batch_size * self.dp_size
                 + self.dp_rank * self.micro_batch_size)
        return list(range(start, start + self.micro_batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        while self.consumed_samples + self.global_batch_size <= self.total_samples:
            step = self.consumed_samples // self.global_batch_size
            for j in range(self.accumulation_steps - 1):
                yield self.micro_batch(step, j)
            # Count the step before its last micro batch leaves, so a checkpoint saved right
            # after training on it records it as consumed.
            self.consumed_samples += self.global_batch_size
            yield self.micro_batch(step, self.accumulation_steps - 1)

    def __len__(self) -> int:
        """Micro batches still to come on this rank."""
        return self.num_global_batches * self.accumulation_steps

    def state_dict(self) -> dict[str, int]:
        # A DataLoader with workers draws batches ahead of training, so this count runs ahead of the
        # steps done; the trainer counts consumed samples itself.
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._set_consumed(int(state["consumed_samples"]))


def collate_tokens(samples: Sequence[dict[str, np.ndarray]]) -> torch.Tensor:
    """Stack samples' "tokens" into a LongTensor [micro, seq_len + 1]."""
    return torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64, copy=False))


def make_dataloader(dataset: Any, sampler: DistributedBatchSampler, num_workers: int = 0) -> DataLoader:
    """torch DataLoader yielding LongTensor micro batches [micro, seq_len + 1] in the sampler's order."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_tokens,
                      pin_memory=runtime.pin_memory())
