"""Tensor- and pipeline-parallel checkpoint shards as one full state dict, loadable by a TP=1 model.

A pipeline-parallel checkpoint keeps one file per pipeline layer and TP rank; its layers are first
renamed to the Transformer's names ("3.attn.q.weight" is "layers.3.attn.q.weight"), which gives each TP
rank one state dict, as without pipeline parallelism.

A sharded parameter is the concatenation of its shards along its partition dim (the layers'
contiguous chunks, see `megamu.parallel.layers`); a replicated one must be identical on every rank,
which the merge checks rather than assumes. For a run directory the layout comes from its saved
`config.yaml`, and the vocabulary padding the TP size added (rows past the true vocabulary, never
used) is trimmed, so `build_model(cfg with parallel.tensor=1).load_state_dict(merged)` works.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megamu.checkpoint.files import load_model_shards, load_pipeline_layers
from megamu.checkpoint.pointer import POINTER, read_pointer
from megamu.config import Config, load_config
from megamu.errors import CheckpointError, ConfigError
from megamu.model import parameter_layout

VOCAB_ROLES = ("embedding", "readout")


def merge_tp_shards(shards: list[dict[str, torch.Tensor]],
                    partition_dims: dict[str, Optional[int]]) -> dict[str, torch.Tensor]:
    """One full state dict from the TP ranks' state dicts (in rank order).

    partition_dims: parameter name → the dim it is split along, or None if replicated. Every shard must
    have exactly these names; replicated tensors must agree across ranks.
    """
    if not shards:
        raise ValueError("no shards to merge")
    expected = set(partition_dims)
    for rank, shard in enumerate(shards):
        if set(shard) != expected:
            missing, extra = sorted(expected - set(shard)), sorted(set(shard) - expected)
            raise CheckpointError(f"TP shard {rank} does not match the model: missing {missing}, unexpected "
                                  f"{extra}; merge with the config the checkpoint was trained with")
    merged: dict[str, torch.Tensor] = {}
    for name, dim in partition_dims.items():
        pieces = [shard[name] for shard in shards]
        if dim is None:
            for rank, piece in enumerate(pieces[1:], start=1):
                if not torch.equal(piece, pieces[0]):
                    raise CheckpointError(f"replicated parameter {name} differs between TP rank 0 and TP rank "
                                          f"{rank}; the checkpoint is inconsistent")
            merged[name] = pieces[0].clone()
        else:
            merged[name] = torch.cat(pieces, dim=dim)
    return merged


def run_config(run_dir: str) -> Config:
    """The resolved config a megamu run saved in its directory."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: pass the run directory (train.out_dir) of a megamu run")
    return load_config(path)


def merge_run_checkpoint(run_dir: str, tag: Optional[str] = None, target_tp: int = 1) -> dict[str, torch.Tensor]:
    """Full state dict of checkpoint `tag` (default: the newest complete one) of the run in `run_dir`,
    with the vocabulary padded for `target_tp` (1: what a single-process model expects)."""
    cfg = run_config(run_dir)
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    tag = tag or read_pointer(checkpoint_dir)
    if tag is None:
        raise CheckpointError(f"{os.path.join(checkpoint_dir, POINTER)} not found: the run saved no complete "
                              f"checkpoint; pass --tag to pick one")
    shards = _pipeline_shards(checkpoint_dir, tag) if cfg.parallel.pipeline > 1 else load_model_shards(checkpoint_dir,
                                                                                                       tag)
    if len(shards) != cfg.parallel.tensor:
        raise CheckpointError(f"{checkpoint_dir}/{tag} has {len(shards)} TP shard file(s) but the run's config "
                              f"says parallel.tensor={cfg.parallel.tensor}; merge the run directory the "
                              f"checkpoint belongs to")
    layout = parameter_layout(cfg)
    merged = merge_tp_shards(shards, {name: dim for name, (dim, _role) in layout.items()})
    cfg.parallel.tensor = target_tp
    target_rows = cfg.padded_vocab_size()
    for name, (_dim, role) in layout.items():
        if role in VOCAB_ROLES:
            merged[name] = resize_vocab_rows(merged[name], target_rows)
    return merged


def _pipeline_shards(checkpoint_dir: str, tag: str) -> list[dict[str, torch.Tensor]]:
    """Every TP rank's state dict of a pipeline-parallel checkpoint, under the Transformer's names."""
    from megamu.model.transformer import logical_name
    return [{logical_name(layer, name): tensor for layer, state in layers.items() for name, tensor in state.items()}
            for layers in load_pipeline_layers(checkpoint_dir, tag)]


def resize_vocab_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Drop or add padding rows (all past the true vocabulary) so the vocabulary dim has `rows` rows."""
    if rows <= weight.size(0):
        return weight[:rows].clone()
    return torch.cat([weight, weight.new_zeros(rows - weight.size(0), *weight.shape[1:])])
