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


def name_pairs(cfg: Config) -> list[tuple[str, str, bool]]:
    """(megamu name, transformers name, whether its rows are per-head RoPE dims) of every weight."""
    pairs = [(embedding_name(), "model.embed_tokens.weight", False),
             (logical_name(cfg.model.n_layers + 1, "weight"), "model.norm.weight", False),
             (readout_name(cfg), "lm_head.weight", False)]
    per_layer = [("attn_norm.weight", "input_layernorm.weight", False),
                 ("mlp_norm.weight", "post_attention_layernorm.weight", False),
                 ("attn.q.weight", "self_attn.q_proj.weight", True), ("attn.k.weight", "self_attn.k_proj.weight", True),
                 ("attn.v.weight", "self_attn.v_proj.weight", False), ("attn.o.weight", "self_attn.o_proj.weight", False),
                 ("mlp.gate.weight", "mlp.gate_proj.weight", False), ("mlp.up.weight", "mlp.up_proj.weight", False),
                 ("mlp.down.weight", "mlp.down_proj.weight", False)]
    if cfg.model.qk_norm:
        per_layer += [("attn.q_norm.weight", "self_attn.q_norm.weight", True),
                      ("attn.k_norm.weight", "self_attn.k_norm.weight", True)]
    for layer in range(cfg.model.n_layers):
        pairs += [(logical_name(layer + 1, mine), f"model.layers.{layer}.{hf}", rope) for mine, hf, rope in per_layer]
    return pairs


def hf_state(cfg: Config, plain: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict from megamu's μP-folded one (fold.fold_mup)."""
    order = half_rotation_order(cfg.head_dim)
    return {hf: _per_head_rows(plain[mine], cfg.head_dim, order) if rope else plain[mine]
            for mine, hf, rope in name_pairs(cfg)}


def megamu_state(cfg: Config, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megamu's state dict (SP, true vocabulary) from transformers' Llama or Qwen3 one: hf_state's inverse."""
    inverse = torch.argsort(half_rotation_order(cfg.head_dim))
    return {mine: _per_head_rows(hf[name], cfg.head_dim, inverse) if rope else hf[name].clone()
            for mine, name, rope in name_pairs(cfg)}
