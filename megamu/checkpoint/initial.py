"""Start training from given weights instead of μP's init: `train.init_from` names a full TP=1 state dict
(.pt, megamu's names), as `megamu-merge` and `megamu-import-hf` write.

Every rank cuts its own tensor-parallel slice out of each full tensor (`local_shard`, as μP's init does),
so the file fits any TP size, and a pipeline stage takes only its layers (by logical name), so any PP size;
under ZeRO 3 each partitioned parameter is gathered alone, set, and re-partitioned. The vocabulary rows are
padded or trimmed to this run's padded vocabulary (the rows past the true vocabulary are never used).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from megamu.config import Config
from megamu.checkpoint.merge import VOCAB_ROLES, resize_vocab_rows
from megamu.errors import CheckpointError
from megamu.model.mup import whole_parameter


def read_initial_weights(cfg: Config) -> dict[str, torch.Tensor]:
    """The state dict cfg.train.init_from names; CheckpointError naming the file when it cannot be read."""
    path = cfg.train.init_from
    if not os.path.isfile(path):
        raise CheckpointError(f"train.init_from={path} does not exist; give a state dict written by megamu-merge "
                              f"or megamu-import-hf")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for an unreadable or foreign file
        raise CheckpointError(f"train.init_from={path} is not a readable state dict ({err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"train.init_from={path} holds a {type(state).__name__}, not a state dict")
    return state


@torch.no_grad()
def load_initial_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, prefix: str = "") -> None:
    """Set every parameter of `model` (the Transformer, or one pipeline layer under logical `prefix`) from
    its full tensor in `state`; CheckpointError naming `source` when a parameter is missing or misshapen."""
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = ".".join(part for part in (prefix, module_name, param_name) if part)
            if name not in state:
                raise CheckpointError(f"{source} has no tensor {name}; it was written for another model config")
            with whole_parameter(param):
                want = module.full_shape(param) if hasattr(module, "full_shape") else param.shape
                full = state[name]
                if getattr(param, "mup_role", None) in VOCAB_ROLES and full.shape[1:] == want[1:]:
                    full = resize_vocab_rows(full, want[0])
                if full.shape != want:
                    raise CheckpointError(f"{source}: {name} has shape {tuple(full.shape)} but the model's is "
                                          f"{tuple(want)}; it was written for another model config")
                local = module.local_shard(full, param) if hasattr(module, "local_shard") else full
                param.copy_(local)

