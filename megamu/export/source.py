"""A run directory's trained weights as one full TP=1 state dict, whatever layout saved them.

TP and PP shards, and ZeRO stages 0-2 (whose mp_rank files hold the whole module), go through megamu's
merge (`megamu.checkpoint.merge_run_checkpoint`). ZeRO 3 keeps the parameters partitioned in its
optimizer files: DeepSpeed's own zero-to-fp32 conversion gathers them (TP=1 only, as that conversion
knows nothing of tensor-parallel shards). The checkpoint is the newest complete one unless a tag is given.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import torch

from megamu.checkpoint import POINTER, merge_run_checkpoint, read_pointer, run_config
from megamu.config import Config, ConfigError
from megamu.errors import CheckpointError
from megamu.model import build_model
from megamu.model.transformer import Transformer
from megamu.runtime import device

_ZERO3_FILES = "zero_pp_rank_*_mp_rank_*_model_states.pt"
_MODEL_FILES = "mp_rank_*_model_states.pt"


def checkpoint_tag(run_dir: str, tag: Optional[str]) -> str:
    """`tag`, or the run's newest complete checkpoint; CheckpointError if that does not exist."""
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    tag = tag or read_pointer(checkpoint_dir)
    if tag is None:
        raise CheckpointError(f"{os.path.join(checkpoint_dir, POINTER)} not found: {run_dir} holds no complete "
                              f"checkpoint; train until a checkpoint is saved, or pass --tag to pick one")
    if not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        raise CheckpointError(f"checkpoint {os.path.join(checkpoint_dir, tag)} does not exist; pick a tag that "
                              f"is in {checkpoint_dir}")
    return tag


def is_zero3(folder: str) -> bool:
    """Whether a checkpoint folder was saved by ZeRO stage 3 (partitioned parameters, no mp_rank model files)."""
    return bool(glob.glob(os.path.join(folder, _ZERO3_FILES))) and not glob.glob(os.path.join(folder, _MODEL_FILES))


def load_run_weights(run_dir: str, tag: Optional[str] = None) -> tuple[Config, dict[str, torch.Tensor], str]:
    """(the run's config, its full state dict at TP=1 in megamu's names, the checkpoint tag)."""
    cfg = run_config(run_dir)
    tag = checkpoint_tag(run_dir, tag)
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    if not is_zero3(os.path.join(checkpoint_dir, tag)):
        state = merge_run_checkpoint(run_dir, tag)
    elif cfg.parallel.tensor > 1:
        raise CheckpointError(f"{checkpoint_dir}/{tag} is a ZeRO 3 checkpoint with parallel.tensor="
                              f"{cfg.parallel.tensor}: DeepSpeed's zero-to-fp32 conversion cannot merge TP shards; "
                              f"export a TP=1 ZeRO 3 run, or train with ZeRO 0-2 under TP")
    else:
        state = _zero3_state(checkpoint_dir, tag)
    cfg.parallel.tensor, cfg.parallel.pipeline = 1, 1
    return cfg, state, tag


def load_run_model(run_dir: str, tag: Optional[str] = None) -> tuple[Config, Transformer, str]:
    """(config, megamu's single-process model holding the checkpoint's weights in eval mode on this machine's
    device (megamu.runtime), tag), for inference: no activation checkpointing, no compilation."""
    cfg, state, tag = load_run_weights(run_dir, tag)
    if cfg.model.arch in ("bert", "t5"):  # generation and bits per byte read text left to right: decoders only
        what = "a masked-LM encoder" if cfg.model.arch == "bert" else "a span-corruption encoder-decoder"
        raise ConfigError(f"{run_dir}: a model.arch={cfg.model.arch} run is {what}; megamu-generate and megamu-eval "
                          f"need a decoder (llama or gpt2) run")
    cfg.train.activation_checkpointing, cfg.train.compile = "none", False
    model = build_model(cfg)
    model.load_state_dict(state)
    return cfg, model.to(device()).eval(), tag


def tokenizer_model(cfg: Config, run_dir: str, given: Optional[str] = None) -> str:
    """The SentencePiece model of a run: `given`, else its data.tokenizer_model; ConfigError when neither."""
    path = given or cfg.data.tokenizer_model
    if not path:
        raise ConfigError(f"{run_dir}/config.yaml names no data.tokenizer_model; pass --tokenizer-model M.model")
    return path


def _zero3_state(checkpoint_dir: str, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag))
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise CheckpointError(f"{checkpoint_dir}/{tag}: DeepSpeed's zero-to-fp32 conversion failed ({err}); is every "
                              f"rank's zero_pp_rank_*_optim_states.pt file present?") from err
