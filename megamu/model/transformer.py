"""The decoder-only transformer as an ordered list of stage-able layers, plus its size and FLOP formulas.

`model.layers` = [EmbeddingLayer, Block × n_layers, final norm, ParallelReadout]; each maps one tensor to
one tensor, and `forward` is a loop over them, so pipeline parallelism can hand the same layers to
DeepSpeed's PipelineModule.

Padded vocabulary: the readout emits V_padded logits (cfg.padded_vocab_size(), for fast and TP-divisible
matmuls). The loss slices them to the true vocabulary before the softmax, so padded entries never receive
probability; callers sampling from the returned logits must slice `[..., :cfg.model.vocab_size]` too.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megamu.config import Config, ConfigError
from megamu.model import mup
from megamu.model.layers import Attention, Block, EmbeddingLayer, GeluMLP, SwiGLU, make_norm
from megamu.parallel.layers import ParallelReadout


def _build_block(cfg: Config) -> Block:
    m = cfg.model
    attention = Attention(arch=m.arch, hidden_size=m.hidden_size, n_heads=m.n_heads, n_kv_heads=cfg.kv_heads,
                          scale=mup.attention_scale(cfg), qk_norm=m.qk_norm,
                          norm_eps=m.norm_eps, rope_theta=m.rope_theta, dropout=m.dropout)
    mlp_class = GeluMLP if m.arch == "gpt2" else SwiGLU
    return Block(attention, mlp_class(m.hidden_size, cfg.ffn_hidden_size),
                 attn_norm=make_norm(m.arch, m.hidden_size, m.norm_eps),
                 mlp_norm=make_norm(m.arch, m.hidden_size, m.norm_eps), dropout=m.dropout)


class Transformer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        self.vocab_size = m.vocab_size
        self.seq_len = m.seq_len
        embedding = EmbeddingLayer(cfg.padded_vocab_size(), m.hidden_size,
                                   max_seq_len=m.seq_len if m.arch == "gpt2" else None,
                                   input_mult=mup.input_multiplier(cfg), dropout=m.dropout)
        blocks = [_build_block(cfg) for _ in range(m.n_layers)]
        readout = ParallelReadout(m.hidden_size, cfg.padded_vocab_size(), logit_scale=mup.output_multiplier(cfg))
        self.layers = nn.ModuleList([embedding, *blocks, make_norm(m.arch, m.hidden_size, m.norm_eps), readout])

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, V_padded], or with `labels` [B, T] the mean fp32 cross-entropy (labels -100 ignored)."""
        if input_ids.shape[-1] > self.seq_len:
            raise ValueError(f"input has {input_ids.shape[-1]} tokens but model.seq_len is {self.seq_len}")
        x = input_ids
        for layer in self.layers:
            x = layer(x)
        return x if labels is None else lm_loss(x, labels, self.vocab_size)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over the true vocabulary (padded logits sliced off)."""
    true_logits = logits[..., :vocab_size].float()
    return F.cross_entropy(true_logits.reshape(-1, vocab_size), labels.reshape(-1), ignore_index=-100)


def _check_buildable(cfg: Config) -> None:
    if cfg.model.vocab_size is None:
        raise ConfigError("model.vocab_size is unset: set it, or let the trainer fill it from data.tokenizer_model")
    if cfg.model.arch == "llama" and cfg.head_dim % 2:
        raise ConfigError(f"RoPE needs an even head dimension, got hidden_size/n_heads = {cfg.head_dim}; "
                          f"change model.n_heads or model.hidden_size")
    if cfg.parallel.tensor != 1:
        raise ConfigError(f"parallel.tensor={cfg.parallel.tensor}: tensor-parallel layers are not implemented "
                          f"yet; set parallel.tensor=1")


def build_model(cfg: Config) -> Transformer:
    """The transformer on CPU in fp32, initialised by μP's rules (mup.init_weights) from cfg.train.seed."""
    _check_buildable(cfg)
    model = Transformer(cfg)
    mup.init_weights(model, cfg)
    return model


def param_counts(cfg: Config) -> dict[str, int]:
    """{"total", "non_embedding"} from the config; non-embedding excludes token and position embeddings only."""
    m = cfg.model
    h, hd, ffn = m.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    kv = cfg.kv_heads * hd
    gpt2 = m.arch == "gpt2"
    norm = 2 * h if gpt2 else h  # LayerNorm has a bias
    head_norm = (2 * hd if gpt2 else hd) if m.qk_norm else 0
    attention = 2 * h * h + 2 * h * kv + 2 * head_norm + ((2 * h + 2 * kv) if gpt2 else 0)
    mlp = (2 * h * ffn + ffn + h) if gpt2 else 3 * h * ffn
    per_block = attention + mlp + 2 * norm
    vocab = cfg.padded_vocab_size()
    readout = vocab * h
    embedding = vocab * h + (m.seq_len * h if gpt2 else 0)
    non_embedding = m.n_layers * per_block + norm + readout
    return {"total": non_embedding + embedding, "non_embedding": non_embedding}


def flops_per_token(cfg: Config) -> int:
    """Training FLOPs per token: 6·N_non_embedding + 12·L·heads·head_dim·seq_len (attention scores)."""
    m = cfg.model
    return 6 * param_counts(cfg)["non_embedding"] + 12 * m.n_layers * m.n_heads * cfg.head_dim * m.seq_len
