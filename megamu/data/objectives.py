"""The training objective of each model.arch, as the trainer's loader, its step, the pipeline feed and the
coordinate check see it.

A micro batch is one LongTensor whatever the arch, so loaders, pinning and device transfer treat them alike:
- llama, gpt2: GPT samples as they are, [micro, seq_len + 1] tokens; the labels are the next tokens;
- bert: masked-LM samples (data/masking.py), [micro, 2, seq_len] (input ids, labels);
- t5: span-corruption samples (data/span_corruption.py), [micro, 3, seq_len] (encoder ids, decoder ids,
  labels), each row padded past the arch's fixed encoder / decoder length.
`inputs_and_labels` splits any of them. An objective turns GPT sample i of a split into its own sample with
a generator seeded by (seed, i), i its place in the split's shuffled order, so samples do not depend on
data-parallel size, loader workers or where a run resumed.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

import numpy as np
import torch

from megamu.config import Config
from megamu.data import EVAL_SEED
from megamu.data.masking import Masking
from megamu.data.span_corruption import SpanCorruption


class Objective(Protocol):
    def sample(self, tokens: np.ndarray, seed: int, index: int) -> np.ndarray:
        """The arch's sample of GPT sample `index` (`tokens`: its seq_len + 1 ids), drawn with (seed, index)."""


OBJECTIVES: dict[str, type] = {"bert": Masking, "t5": SpanCorruption}  # arch → objective; the decoders have none


def objective(cfg: Config) -> Optional[Objective]:
    """cfg's objective, or None for decoders, which learn from GPT samples as they are."""
    kind = OBJECTIVES.get(cfg.model.arch)
    return None if kind is None else kind.from_config(cfg)


class ObjectiveDataset:
    """A GPT-sample dataset whose sample i is `objective.sample(...)` of its sample i, seeded by `seed`."""

    def __init__(self, dataset: Any, objective: Objective, seed: int) -> None:
        self.dataset, self.objective, self.seed = dataset, objective, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"tokens": self.objective.sample(self.dataset[i]["tokens"], self.seed, i)}


def objective_datasets(cfg: Config, datasets: Mapping[str, Any]) -> dict[str, Any]:
    """The split datasets the trainer draws from: GPT samples as they are for decoders, else the arch's."""
    transform = objective(cfg)
    if transform is None:
        return dict(datasets)
    # Validation, like its samples, takes EVAL_SEED: runs differing only in seed score the same masks / spans.
    return {split: ObjectiveDataset(dataset, transform, cfg.train.seed if split == "train" else EVAL_SEED)
            for split, dataset in datasets.items()}


def objective_batch(cfg: Config, tokens: torch.Tensor, seed: int, first_index: int = 0) -> torch.Tensor:
    """GPT tokens [micro, seq_len + 1] as the trainer's loader gives them for cfg's arch: unchanged for decoders,
    else the arch's samples first_index, first_index + 1, ..."""
    transform = objective(cfg)
    if transform is None:
        return tokens
    return torch.from_numpy(np.stack([transform.sample(row.numpy(), seed, first_index + b)
                                      for b, row in enumerate(tokens)]))


def inputs_and_labels(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro batch → (inputs, labels). GPT tokens [micro, seq_len + 1] are shifted by one; in a sample
    batch [micro, rows, seq_len] the last row is the labels and the others the inputs: bert's one row of
    input ids [micro, seq_len], t5's encoder and decoder ids [micro, 2, seq_len]."""
    if batch.dim() == 2:
        return batch[:, :-1], batch[:, 1:]
    inputs = batch[:, :-1]
    return (inputs[:, 0] if inputs.shape[1] == 1 else inputs), batch[:, -1]
