"""A run's tensor-parallel checkpoint as one full state dict, loadable by a TP=1 model.

Reads `<run_dir>/config.yaml` (the resolved config the run saved) for the model layout, the newest
complete checkpoint (or a given tag) from `<run_dir>/checkpoints`, merges the TP shards, and trims the
vocabulary padding that the TP size added (rows past the true vocabulary are padding, never used), so
`build_model(cfg with parallel.tensor=1).load_state_dict(merged)` works.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megamu.config import Config, ConfigError, load_config
from megamu.parallel.checkpoint_merge import load_model_shards, merge_tp_shards
from megamu.training.checkpoint import POINTER, read_pointer

VOCAB_ROLES = ("embedding", "readout")


def run_config(run_dir: str) -> Config:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: pass the run directory (train.out_dir) of a megamu run")
    return load_config(path)


def merge_run_checkpoint(run_dir: str, tag: Optional[str] = None, target_tp: int = 1) -> dict[str, torch.Tensor]:
    """Full state dict of checkpoint `tag` (default: the newest complete one) of the run in `run_dir`,
    with the vocabulary padded for `target_tp` (1: what a single-process model expects)."""
    from megamu.model import parameter_layout

    cfg = run_config(run_dir)
    if cfg.parallel.pipeline != 1:
        raise ConfigError(f"{run_dir}: parallel.pipeline={cfg.parallel.pipeline}; merging pipeline-parallel "
                          f"checkpoints is not supported")
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    tag = tag or read_pointer(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"{os.path.join(checkpoint_dir, POINTER)} not found: the run saved no complete "
                                f"checkpoint; pass --tag to pick one")
    shards = load_model_shards(checkpoint_dir, tag)
    if len(shards) != cfg.parallel.tensor:
        raise ValueError(f"{checkpoint_dir}/{tag} has {len(shards)} TP shard file(s) but the run's config says "
                         f"parallel.tensor={cfg.parallel.tensor}")
    layout = parameter_layout(cfg)
    merged = merge_tp_shards(shards, {name: dim for name, (dim, _role) in layout.items()})
    cfg.parallel.tensor = target_tp
    target_rows = cfg.padded_vocab_size()
    for name, (_dim, role) in layout.items():
        if role in VOCAB_ROLES:
            merged[name] = _resize_vocab_rows(merged[name], target_rows)
    return merged


def _resize_vocab_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Drop or add padding rows (all past the true vocabulary) so the vocabulary dim has `rows` rows."""
    if rows <= weight.size(0):
        return weight[:rows].clone()
    return torch.cat([weight, weight.new_zeros(rows - weight.size(0), *weight.shape[1:])])
