"""Merge tensor-parallel (TP) checkpoint shards into one full state dict.

DeepSpeed saves one model file per TP rank, `<checkpoint_dir>/<tag>/mp_rank_XX_model_states.pt`, each
holding that rank's module state dict under "module". A sharded parameter is the concatenation of its
shards along its partition dim (the layers' contiguous chunks, see `megamu.parallel.layers`); a
replicated one must be identical on every rank, which the merge checks rather than assumes.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Optional

import torch

_SHARD_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def model_shard_paths(checkpoint_dir: str, tag: str) -> list[str]:
    """DeepSpeed's per-TP-rank model files of checkpoint `tag`, in TP rank order."""
    folder = os.path.join(checkpoint_dir, tag)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint {folder} does not exist; pick a tag that is in {checkpoint_dir}")
    found = {int(m.group(1)): path for path in glob.glob(os.path.join(folder, "mp_rank_*_model_states.pt"))
             if (m := _SHARD_FILE.search(path))}
    if not found and glob.glob(os.path.join(folder, "zero_pp_rank_*_mp_rank_*_model_states.pt")):
        raise ValueError(f"{folder} is a ZeRO stage 3 checkpoint: its parameters live partitioned in the optimizer "
                         f"files, and merging those across TP ranks is not supported; train with ZeRO 0-2 to merge")
    if not found:
        raise FileNotFoundError(f"{folder} holds no mp_rank_XX_model_states.pt files; is it a DeepSpeed checkpoint "
                                f"(pipeline-parallel checkpoints keep per-layer files and are not supported)?")
    if sorted(found) != list(range(len(found))):
        raise FileNotFoundError(f"{folder}: TP shard files for ranks {sorted(found)} found; ranks "
                                f"0..{max(found)} must all be present")
    return [found[rank] for rank in range(len(found))]


def load_model_shards(checkpoint_dir: str, tag: str) -> list[dict[str, torch.Tensor]]:
    """Every TP rank's module state dict from checkpoint `tag` (on CPU)."""
    shards = []
    for path in model_shard_paths(checkpoint_dir, tag):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if "module" not in saved:
            raise ValueError(f"{path} has no 'module' entry; not a DeepSpeed model-states file")
        shards.append(saved["module"])
    return shards


def merge_tp_shards(shards: list[dict[str, torch.Tensor]],
                    partition_dims: dict[str, Optional[int]]) -> dict[str, torch.Tensor]:
    """One full state dict from the TP ranks' state dicts (in rank order).

    partition_dims: parameter name → the dim it is split along, or None if replicated. Every shard must
    have exactly these names; replicated tensors must agree across ranks.
    """
    if not shards:
        raise ValueError("no shards to merge")
    expected = set(partition_dims)
    merged: dict[str, torch.Tensor] = {}
    for rank, shard in enumerate(shards):
        if set(shard) != expected:
            missing, extra = sorted(expected - set(shard)), sorted(set(shard) - expected)
            raise ValueError(f"TP shard {rank} does not match the model: missing {missing}, unexpected {extra}; "
                             f"merge with the config the checkpoint was trained with")
    for name, dim in partition_dims.items():
        pieces = [shard[name] for shard in shards]
        if dim is None:
            for rank, piece in enumerate(pieces[1:], start=1):
                if not torch.equal(piece, pieces[0]):
                    raise ValueError(f"replicated parameter {name} differs between TP rank 0 and TP rank {rank}; "
                                     f"the checkpoint is inconsistent")
            merged[name] = pieces[0].clone()
        else:
            merged[name] = torch.cat(pieces, dim=dim)
    return merged
