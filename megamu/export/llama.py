"""Llama-style megamu models as transformers' LlamaForCausalLM, or Qwen3ForCausalLM with QK-norm.

Both targets compute what megamu's llama arch does (pre-norm RMSNorm blocks, SwiGLU, grouped-query heads
with kv head j serving query heads j·g .. j·g+g-1, RoPE with θ_i = theta^(-2i/d), untied readout, no
biases), once μP is folded (fold.py). Qwen3 is Llama plus one RMSNorm gain of d_head shared by all heads
on q and on k, before RoPE, with the model's norm eps: exactly megamu's QK-norm.

RoPE layout: megamu rotates consecutive pairs (x[2i], x[2i+1]); transformers rotates halves
(x[i], x[i + d/2]) with the same θ_i. Permuting every q and k head's output rows (and the QK-norm gains)
to [0, 2, 4, ..., 1, 3, 5, ...] turns one into the other, and q·k is unchanged since both get the same
permutation.
"""
from __future__ import annotations

import torch

from megamu.config import Config
from megamu.export.fold import embedding_name, readout_name
from megamu.model.transformer import logical_name


def target_classes(cfg: Config) -> tuple[str, str]:
    """Names of the transformers model and config classes."""
    return ("Qwen3ForCausalLM", "Qwen3Config") if cfg.model.qk_norm else ("LlamaForCausalLM", "LlamaConfig")


def hf_config(cfg: Config, special_ids: dict[str, int]) -> dict:
    """The transformers config fields (LlamaConfig or Qwen3Config keyword arguments)."""
    m = cfg.model
    config = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                  num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=cfg.kv_heads,
                  head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=m.seq_len,
                  rms_norm_eps=m.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                  attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False, **special_ids)
    if not m.qk_norm:
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    return config


def half_rotation_order(head_dim: int) -> torch.Tensor:
    """Index that takes a head's consecutive-pair RoPE layout to transformers' halves layout."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _per_head_rows(weight: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    heads = weight.reshape(-1, head_dim, *weight.shape[1:])
    return heads[:, order].reshape(weight.shape).contiguous()


def hf_state(cfg: Config, plain: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict from megamu's μP-folded one (fold.fold_mup)."""
    order = half_rotation_order(cfg.head_dim)
    state = {"model.embed_tokens.weight": plain[embedding_name()],
             "model.norm.weight": plain[logical_name(cfg.model.n_layers + 1, "weight")],
             "lm_head.weight": plain[readout_name(cfg)]}
    for layer in range(cfg.model.n_layers):
        def mine(name: str) -> torch.Tensor:
            return plain[logical_name(layer + 1, name)]

        hf = f"model.layers.{layer}."
        state[hf + "input_layernorm.weight"] = mine("attn_norm.weight")
        state[hf + "post_attention_layernorm.weight"] = mine("mlp_norm.weight")
        state[hf + "self_attn.q_proj.weight"] = _per_head_rows(mine("attn.q.weight"), cfg.head_dim, order)
        state[hf + "self_attn.k_proj.weight"] = _per_head_rows(mine("attn.k.weight"), cfg.head_dim, order)
        state[hf + "self_attn.v_proj.weight"] = mine("attn.v.weight")
        state[hf + "self_attn.o_proj.weight"] = mine("attn.o.weight")
        if cfg.model.qk_norm:
            state[hf + "self_attn.q_norm.weight"] = mine("attn.q_norm.weight")[order]
            state[hf + "self_attn.k_norm.weight"] = mine("attn.k_norm.weight")[order]
        for megamu_name, hf_name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            state[hf + f"mlp.{hf_name}.weight"] = mine(f"mlp.{megamu_name}.weight")
    return state
