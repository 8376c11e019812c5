"""μP folded into the weights: a megamu state dict as the same model with every forward multiplier at 1.

megamu's forward multiplies the embedding output by α_in, the logits by α_out/m and the attention scores
by α_attn/d_head (their values come from `megamu.model.mup`). A standard architecture has none of these
and scales scores by 1/√d_head, so each multiplier moves into the weights it follows:

- α_in into the token (and learned position) embedding: the embedding output is linear in them;
- α_out/m into the readout;
- (α_attn/d_head)·√d_head into the query projection (weight and bias), or with QK-norm into the query
  norm's gain, since the norm would undo a scaled projection; RoPE is linear, so scaling before it is exact.

The padded vocabulary rows (never given probability) are dropped. Names stay megamu's; the per-family
modules (llama.py, gpt2.py) rename them.
"""
from __future__ import annotations

import math

import torch

from megamu.config import Config
from megamu.model import mup
from megamu.model.transformer import logical_name


def embedding_name() -> str:
    return logical_name(0, "tokens.weight")


def position_name() -> str:
    return logical_name(0, "positions.weight")


def readout_name(cfg: Config) -> str:
    return logical_name(cfg.model.n_layers + 2, "weight")


def query_scale(cfg: Config) -> float:
    """What the query must be multiplied by so that 1/√d_head scores equal megamu's α_attn/d_head ones."""
    return mup.attention_scale(cfg) * math.sqrt(cfg.head_dim)


@torch.no_grad()
def fold_mup(cfg: Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new fp32 state dict (megamu names, TP=1) whose model computes megamu's logits with all multipliers 1
    and the true vocabulary only."""
    vocab = cfg.model.vocab_size
    plain = {name: tensor.detach().float().clone() for name, tensor in state.items()}
    input_mult = mup.input_multiplier(cfg)
    plain[embedding_name()] = plain[embedding_name()][:vocab] * input_mult
    if position_name() in plain:
        plain[position_name()] *= input_mult
    plain[readout_name(cfg)] = plain[readout_name(cfg)][:vocab] * mup.output_multiplier(cfg)
    scale = query_scale(cfg)
    for block in range(1, cfg.model.n_layers + 1):
        target = "attn.q_norm" if cfg.model.qk_norm else "attn.q"
        for suffix in ("weight", "bias"):
            name = logical_name(block, f"{target}.{suffix}")
            if name in plain:
                plain[name] *= scale
    return plain
