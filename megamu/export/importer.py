"""A transformers Llama (or Qwen3) checkpoint as megamu weights and config, to continue pretraining.

The inverse of the export's Llama mapping (llama.py): the same names, RoPE rows permuted back from halves
to consecutive pairs. The imported model runs under SP (mup.enabled=false): a pretrained model has no μP
base width, so there is no m to fold out, and SP's forward (multipliers 1, scores 1/√d_head) is exactly
the source's. A tied readout (tie_word_embeddings) becomes an untied copy of the embedding, since megamu
never ties them. Anything megamu's llama block does not compute is refused: biases, another activation,
RoPE scaling (e.g. Llama 3's "llama3" rope type), a head_dim other than hidden/heads, sliding windows.
"""
from __future__ import annotations

import os
import warnings

import torch

from megamu.checkpoint.merge import resize_vocab_rows
from megamu.config import Config, ConfigError
from megamu.errors import MegamuWarning
from megamu.export import llama
from megamu.export.fold import embedding_name, readout_name

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _rope_parameters(config) -> dict:  # type: ignore[no-untyped-def]
    return getattr(config, "rope_parameters", None) or {}


def _refusal(hf_dir: str, config) -> str:  # type: ignore[no-untyped-def]
    """Why megamu cannot compute this transformers model exactly ('' when it can)."""
    rope = _rope_parameters(config).get("rope_type", "default")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    problems = {
        f"model_type {config.model_type!r} (megamu imports {', '.join(SUPPORTED.values())})":
            config.model_type not in SUPPORTED,
        f"rope_type {rope!r} (megamu's RoPE has no scaling)": rope != "default",
        f"hidden_act {config.hidden_act!r} (megamu's MLP is SwiGLU)": config.hidden_act != "silu",
        "attention or MLP biases": getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False),
        f"head_dim {head_dim} != hidden_size/num_attention_heads": head_dim * config.num_attention_heads
        != config.hidden_size,
        "sliding-window attention": bool(getattr(config, "use_sliding_window", False)),
    }
    found = [what for what, present in problems.items() if present]
    return f"{hf_dir} cannot be imported exactly: it has {'; '.join(found)}" if found else ""


def import_hf(hf_dir: str, cfg: Config) -> tuple[Config, dict[str, torch.Tensor]]:
    """`cfg` with model.* taken from the transformers model in `hf_dir` and mup.enabled=false, and megamu's
    TP=1 state dict of it (vocabulary padded as build_model(cfg) expects)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConfigError(f"{os.path.join(hf_dir, 'config.json')} not found: pass a transformers model directory "
                          f"(save_pretrained's output)")
    config = AutoConfig.from_pretrained(hf_dir)
    if problem := _refusal(hf_dir, config):
        raise ConfigError(problem)
    m = cfg.model
    m.arch, m.hidden_size, m.n_layers = "llama", config.hidden_size, config.num_hidden_layers
    m.n_heads, m.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
    m.ffn_hidden_size, m.vocab_size, m.norm_eps = config.intermediate_size, config.vocab_size, config.rms_norm_eps
    m.rope_theta, m.qk_norm = float(_rope_parameters(config).get("rope_theta", 10000.0)), config.model_type == "qwen3"
    cfg.mup.enabled = False
    cfg.mup.base_hidden_size = m.hidden_size
    warnings.warn(f"{hf_dir} is imported under SP (mup.enabled=false): a pretrained model has no μP base width, so "
                  f"learning rates do not transfer across widths from it", MegamuWarning)
    hf_state = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    if config.tie_word_embeddings or "lm_head.weight" not in hf_state:
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]
    state = llama.megamu_state(cfg, hf_state)
    for name in (embedding_name(), readout_name(cfg)):
        state[name] = resize_vocab_rows(state[name], cfg.padded_vocab_size())
    return cfg, state
