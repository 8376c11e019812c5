"""GPT-2-style megamu models as transformers' GPT2LMHeadModel.

GPT-2 has the same block as megamu's gpt2 arch (pre-norm LayerNorm with bias, biased q/k/v/o, tanh-GELU
MLP, learned positions added to the token embedding) once μP is folded (fold.py), with three differences
of form: its linears are Conv1D (weight stored [in, out], so ours are transposed), q, k and v are one
fused `c_attn`, and every head has its own k and v, so grouped-query k/v heads are repeated for the
query heads they serve (exact: the same numbers reach every score). Its readout is untied here
(tie_word_embeddings=False): megamu never ties it to the embedding.
"""
from __future__ import annotations

import torch

from megamu.config import Config
from megamu.export.fold import embedding_name, position_name, readout_name
from megamu.model.transformer import logical_name


def target_classes(cfg: Config) -> tuple[str, str]:
    """Names of the transformers model and config classes."""
    return "GPT2LMHeadModel", "GPT2Config"


def hf_config(cfg: Config, special_ids: dict[str, int]) -> dict:
    """GPT2Config keyword arguments."""
    m = cfg.model
    return dict(vocab_size=m.vocab_size, n_positions=m.seq_len, n_embd=m.hidden_size, n_layer=m.n_layers,
                n_head=m.n_heads, n_inner=cfg.ffn_hidden_size, activation_function="gelu_pytorch_tanh",
                layer_norm_epsilon=m.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                tie_word_embeddings=False, **special_ids)


def _repeat_kv_heads(tensor: torch.Tensor, cfg: Config) -> torch.Tensor:
    """k or v rows (weight or bias) of n_kv heads → n_heads heads, each kv head repeated for its query group."""
    group = cfg.model.n_heads // cfg.kv_heads
    heads = tensor.reshape(cfg.kv_heads, cfg.head_dim, *tensor.shape[1:])
    return heads.repeat_interleave(group, dim=0).reshape(cfg.model.hidden_size, *tensor.shape[1:])


def hf_state(cfg: Config, plain: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict from megamu's μP-folded one (fold.fold_mup)."""
    final_norm = cfg.model.n_layers + 1
    state = {"transformer.wte.weight": plain[embedding_name()], "transformer.wpe.weight": plain[position_name()],
             "transformer.ln_f.weight": plain[logical_name(final_norm, "weight")],
             "transformer.ln_f.bias": plain[logical_name(final_norm, "bias")],
             "lm_head.weight": plain[readout_name(cfg)]}
    for layer in range(cfg.model.n_layers):
        def mine(name: str) -> torch.Tensor:
            return plain[logical_name(layer + 1, name)]

        hf = f"transformer.h.{layer}."
        for part in ("weight", "bias"):
            state[hf + f"ln_1.{part}"] = mine(f"attn_norm.{part}")
            state[hf + f"ln_2.{part}"] = mine(f"mlp_norm.{part}")
        q, k, v = mine("attn.q.weight"), _repeat_kv_heads(mine("attn.k.weight"), cfg), \
            _repeat_kv_heads(mine("attn.v.weight"), cfg)
        state[hf + "attn.c_attn.weight"] = torch.cat([q, k, v]).t().contiguous()
        state[hf + "attn.c_attn.bias"] = torch.cat([mine("attn.q.bias"), _repeat_kv_heads(mine("attn.k.bias"), cfg),
                                                    _repeat_kv_heads(mine("attn.v.bias"), cfg)])
        state[hf + "attn.c_proj.weight"] = mine("attn.o.weight").t().contiguous()
        state[hf + "attn.c_proj.bias"] = mine("attn.o.bias")
        state[hf + "mlp.c_fc.weight"] = mine("mlp.up.weight").t().contiguous()
        state[hf + "mlp.c_fc.bias"] = mine("mlp.up.bias")
        state[hf + "mlp.c_proj.weight"] = mine("mlp.down.weight").t().contiguous()
        state[hf + "mlp.c_proj.bias"] = mine("mlp.down.bias")
    return state
