"""DeepSpeed's file layout inside a checkpoint tag, and reading its model files.

Without pipeline parallelism, ZeRO stages 0-2 save one model file per TP rank,
`<checkpoint_dir>/<tag>/mp_rank_XX_model_states.pt`, whose "module" entry is that rank's state
dict. ZeRO 3 keeps the parameters partitioned in `zero_pp_rank_*_mp_rank_*_model_states.pt` files.
With pipeline parallelism the mp_rank files hold no weights; every pipeline layer's state dict is in
`layer_LL-model_TT-model_states.pt` (layer LL of the PipelineModule, TP rank TT).
"""
from __future__ import annotations

import glob
import os
import re

import torch

from megamu.errors import CheckpointError

_MODEL_STATES = "mp_rank_*_model_states.pt"
_MODEL_STATES_RANK = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
_ZERO3_MODEL_STATES = "zero_pp_rank_*_mp_rank_*_model_states.pt"
_LAYER_STATES = "layer_*-model_*-model_states.pt"
_LAYER_STATES_RANK = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")


def model_shard_paths(checkpoint_dir: str, tag: str) -> list[str]:
    """DeepSpeed's per-TP-rank model files of checkpoint `tag`, in TP rank order."""
    folder = os.path.join(checkpoint_dir, tag)
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint {folder} does not exist; pick a tag that is in {checkpoint_dir}")
    found = {int(m.group(1)): path for path in glob.glob(os.path.join(folder, _MODEL_STATES))
             if (m := _MODEL_STATES_RANK.search(path))}
    if not found and glob.glob(os.path.join(folder, _ZERO3_MODEL_STATES)):
        raise CheckpointError(f"{folder} is a ZeRO stage 3 checkpoint: its parameters live partitioned in the "
                              f"optimizer files, and merging those across TP ranks is not supported; train with "
                              f"ZeRO 0-2 to merge")
    if not found:
        raise CheckpointError(f"{folder} holds no mp_rank_XX_model_states.pt files; is it a DeepSpeed checkpoint?")
    if sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{folder}: TP shard files for ranks {sorted(found)} found; ranks "
                              f"0..{max(found)} must all be present (copy the missing mp_rank_XX files)")
    return [found[rank] for rank in range(len(found))]


def load_model_shards(checkpoint_dir: str, tag: str) -> list[dict[str, torch.Tensor]]:
    """Every TP rank's module state dict from checkpoint `tag` (on CPU)."""
    shards = []
    for path in model_shard_paths(checkpoint_dir, tag):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if "module" not in saved:
            raise CheckpointError(f"{path} has no 'module' entry; not a DeepSpeed model-states file")
        shards.append(saved["module"])
    return shards


def load_pipeline_layers(checkpoint_dir: str, tag: str) -> list[dict[int, dict[str, torch.Tensor]]]:
    """Per TP rank (in order), every pipeline layer's state dict by layer index, from checkpoint `tag`."""
    folder = os.path.join(checkpoint_dir, tag)
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint {folder} does not exist; pick a tag that is in {checkpoint_dir}")
    by_rank: dict[int, dict[int, str]] = {}
    for path in glob.glob(os.path.join(folder, _LAYER_STATES)):
        if m := _LAYER_STATES_RANK.search(path):
            by_rank.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
    if not by_rank:
        raise CheckpointError(f"{folder} holds no layer_XX-model_XX-model_states.pt files; is it a pipeline-parallel "
                              f"DeepSpeed checkpoint?")
    if sorted(by_rank) != list(range(len(by_rank))):
        raise CheckpointError(f"{folder}: layer files for TP ranks {sorted(by_rank)} found; ranks "
                              f"0..{max(by_rank)} must all be present")
    return [{layer: torch.load(path, map_location="cpu", weights_only=False)
             for layer, path in sorted(by_rank[rank].items())} for rank in range(len(by_rank))]
