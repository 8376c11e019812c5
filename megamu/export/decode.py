"""Incremental decoding of megamu's own (TP=1) Transformer with a key/value cache.

`forward_cached(model, ids, cache)` runs the model's layers on new tokens only: each attention appends
their keys and values (after QK-norm and RoPE, at their true positions) to the cache and attends over all
cached positions, so a generated token costs one token's work instead of the whole prefix's. It computes
exactly what `Transformer.forward` computes on the whole sequence (tests/test_export_hf.py), with the same
modules and multipliers, in eval mode (no dropout).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from megamu.model.layers import Attention, EmbeddingLayer
from megamu.model.transformer import Transformer


@dataclasses.dataclass
class KVCache:
    """Per block, the keys and values [B, kv heads, positions so far, head_dim] of every token decoded."""

    keys: list[torch.Tensor] = dataclasses.field(default_factory=list)
    values: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0


def _embed(layer: EmbeddingLayer, ids: torch.Tensor, offset: int) -> torch.Tensor:
    x = layer.tokens(ids)
    if layer.positions is not None:
        x = x + layer.positions.weight[offset:offset + ids.shape[1]]
    return x * layer.input_mult if layer.input_mult != 1.0 else x


def _attend(attn: Attention, x: torch.Tensor, cache: KVCache, index: int, offset: int) -> torch.Tensor:
    batch, new = x.shape[:2]
    q, k, v = (proj(x).view(batch, new, -1, attn.head_dim) for proj in (attn.q, attn.k, attn.v))
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rope is not None:
        q, k = attn.rope(q, offset), attn.rope(k, offset)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if index == len(cache.keys):
        cache.keys.append(k)
        cache.values.append(v)
    else:
        cache.keys[index] = k = torch.cat([cache.keys[index], k], dim=2)
        cache.values[index] = v = torch.cat([cache.values[index], v], dim=2)
    # new token i (position offset+i) sees cached positions 0 .. offset+i
    visible = torch.arange(new, device=x.device)[:, None] + offset >= torch.arange(k.shape[2], device=x.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=attn.scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return attn.o(out.transpose(1, 2).reshape(batch, new, -1))


@torch.no_grad()
def forward_cached(model: Transformer, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits [B, T, true vocab] of the new tokens `ids` [B, T] that follow the cache's, which grows by them."""
    offset = cache.length
    if offset + ids.shape[1] > model.seq_len:
        raise ValueError(f"{offset + ids.shape[1]} tokens exceed model.seq_len={model.seq_len}")
    embedding, *blocks, final_norm, readout = model.layers
    x = _embed(embedding, ids, offset)
    for index, block in enumerate(blocks):
        x = x + _attend(block.attn, block.attn_norm(x), cache, index, offset)
        x = x + block.mlp(block.mlp_norm(x))
    return readout(final_norm(x))[..., :model.vocab_size]
