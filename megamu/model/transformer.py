"""The transformer as an ordered list of stage-able layers, plus its size and FLOP formulas.

`model.layers` = [EmbeddingLayer, Block × n_layers, final norm, ParallelReadout]; each maps one tensor to
one tensor, and `forward` is a loop over them, so pipeline parallelism can hand the same layers to
DeepSpeed's PipelineModule. Decoders (llama, gpt2) attend causally; bert attends both ways and puts its
masked-LM transform (final norm, dense, GELU, norm) in the final norm's place, its labels the masked tokens.
t5 (`encoder_decoder.py`) builds its encoder and decoder stacks from the same `layer_builders`.

Padded vocabulary: the readout emits V_padded logits (cfg.padded_vocab_size(), for fast and TP-divisible
matmuls). The loss excludes padded entries from the softmax, so they never receive probability; callers
sampling from the returned logits must slice `[..., :cfg.model.vocab_size]` too.

Tensor parallelism: `build_model(cfg, tp_group)` builds this rank's shard (heads, MLP columns and vocab
rows split across the group; sequence parallelism when cfg.parallel.sequence_parallel). The loss is the
vocab-parallel cross entropy on the sharded logits, so full logits are never gathered for training; with
cfg.train.fused_cross_entropy (the default) the readout and the loss run together over chunks of tokens,
so the [tokens, vocab] logits are not even computed whole.

Regional compilation (`compile_blocks`, cfg.train.compile): each transformer block is compiled in place,
rather than the whole model, so the blocks share one compiled graph (they have the same code and shapes),
compile time does not grow with depth, and parameter names are unchanged.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import nn
from torch.distributed import ProcessGroup

from megamu.config import Config, ConfigError, pipeline_blocks, rms_swiglu, span_layout
from megamu.model import mup
from megamu.model.layers import (Attention, Block, CrossAttention, DecoderBlock, EmbeddingLayer, GeluMLP, LayerNorm,
                                 MaskedLMTransform, Readout, RMSNorm, RELATIVE_BUCKETS, SwiGLU, make_norm)
from megamu.parallel.layers import register_partial_grad_allreduce
from megamu.parallel.mappings import group_size


def _attention(cfg: Config, group: Optional[ProcessGroup], sequence_parallel: bool, *, causal: bool,
               kind: type[Attention] = Attention) -> Attention:
    m = cfg.model
    return kind(arch=m.arch, hidden_size=m.hidden_size, n_heads=m.n_heads, n_kv_heads=cfg.kv_heads,
                scale=mup.attention_scale(cfg), qk_norm=m.qk_norm, norm_eps=m.norm_eps, rotary=cfg.rotary,
                rope_theta=m.rope_theta, max_seq_len=m.seq_len, dropout=m.dropout, causal=causal,
                recompute_core=cfg.train.activation_checkpointing == "selective", group=group,
                sequence_parallel=sequence_parallel)


def _mlp(cfg: Config, group: Optional[ProcessGroup], sequence_parallel: bool) -> nn.Module:
    m, tp = cfg.model, dict(group=group, sequence_parallel=sequence_parallel)
    if rms_swiglu(m.arch):
        return SwiGLU(m.hidden_size, cfg.ffn_hidden_size,
                      recompute_activation=cfg.train.activation_checkpointing == "selective", **tp)
    return GeluMLP(m.hidden_size, cfg.ffn_hidden_size, **tp)


def _recompute(cfg: Config) -> dict[str, bool]:
    checkpointing = cfg.train.activation_checkpointing
    return dict(recompute_block=checkpointing == "full", recompute_norms=checkpointing == "selective")


def build_block(cfg: Config, group: Optional[ProcessGroup], sequence_parallel: bool) -> Block:
    """One transformer block of this TP rank, with cfg.train.activation_checkpointing applied: every builder
    of blocks (this model, pipeline stages) calls this, so they recompute the same regions. Causal for the
    decoders, bidirectional for bert and t5's encoder."""
    m = cfg.model
    norm = partial(make_norm, m.arch, m.hidden_size, m.norm_eps, sequence_parallel)
    return Block(_attention(cfg, group, sequence_parallel, causal=m.arch not in ("bert", "t5")),
                 _mlp(cfg, group, sequence_parallel), attn_norm=norm(), mlp_norm=norm(), dropout=m.dropout,
                 sequence_sharded=sequence_parallel, **_recompute(cfg))


def build_decoder_block(cfg: Config, group: Optional[ProcessGroup], sequence_parallel: bool) -> DecoderBlock:
    """One block of t5's decoder: causal self-attention, cross-attention over the encoder, MLP."""
    m = cfg.model
    norm = partial(make_norm, m.arch, m.hidden_size, m.norm_eps, sequence_parallel)
    return DecoderBlock(_attention(cfg, group, sequence_parallel, causal=True),
                        _attention(cfg, group, sequence_parallel, causal=False, kind=CrossAttention),
                        _mlp(cfg, group, sequence_parallel), attn_norm=norm(), cross_norm=norm(), mlp_norm=norm(),
                        dropout=m.dropout, sequence_sharded=sequence_parallel, **_recompute(cfg))


LayerBuilder = tuple[type[nn.Module], Callable[[], nn.Module]]


LOGICAL_PREFIX = "layers"


def logical_name(layer_index: int, name: str) -> str:
    """Parameter `name` of layer `layer_index` as the Transformer calls it (`layers.3.attn.q.weight`): the
    stable name that seeds init and names checkpoint tensors whatever stage holds the layer."""
    return f"{LOGICAL_PREFIX}.{layer_index}.{name}"


def stage_name(logical: str) -> str:
    """What a pipeline stage calls logical parameter `logical` (`3.attn.q.weight`): DeepSpeed's PipelineModule
    registers layer i as module "i"."""
    prefix = f"{LOGICAL_PREFIX}."
    if not logical.startswith(prefix):
        raise ValueError(f"{logical!r} is not a logical parameter name (`{prefix}<layer>.<name>`)")
    return logical[len(prefix):]


def stage_boundaries(cfg: Config) -> list[int]:
    """Pipeline stage s holds layers [bounds[s], bounds[s+1]) of [embedding, blocks..., final norm, readout]."""
    bounds, first_block = [0], 1
    for blocks in pipeline_blocks(cfg)[:-1]:
        first_block += blocks
        bounds.append(first_block)
    return bounds + [cfg.model.n_layers + 3]


def layer_builders(cfg: Config, tp_group: Optional[ProcessGroup] = None,
                   pipeline: bool = False) -> list[LayerBuilder]:
    """(class, builder) of every layer in order: embedding, blocks, final norm, readout. The Transformer
    builds them all; a pipeline stage builds only its own (`pipeline`: with the fused loss, the readout
    passes its input on to the pipeline's loss function). t5: embedding (shared by encoder and decoder),
    encoder blocks, encoder norm, decoder blocks, decoder norm, readout."""
    m = cfg.model
    sequence_parallel = cfg.parallel.sequence_parallel and group_size(tp_group) > 1
    tp = dict(group=tp_group, sequence_parallel=sequence_parallel)
    embedding = partial(EmbeddingLayer, cfg.padded_vocab_size(), m.hidden_size,
                        max_seq_len=None if cfg.rotary or m.arch == "t5" else m.seq_len,
                        input_mult=mup.input_multiplier(cfg), dropout=m.dropout, **tp)
    block = partial(build_block, cfg, tp_group, sequence_parallel)
    # bert: the masked-LM head's transform, which begins with the final norm, in the final norm's place
    final_class, final_norm = ((MaskedLMTransform, partial(MaskedLMTransform, m.hidden_size, m.norm_eps, **tp))
                               if m.arch == "bert" else
                               (RMSNorm if rms_swiglu(m.arch) else LayerNorm,
                                partial(make_norm, m.arch, m.hidden_size, m.norm_eps, sequence_parallel)))
    fused = cfg.train.fused_cross_entropy
    readout = partial(Readout, m.hidden_size, cfg.padded_vocab_size(), logit_mult=mup.output_multiplier(cfg),
                      fused=fused, pass_input=pipeline and fused, **tp)
    stack = [(EmbeddingLayer, embedding), *[(Block, block)] * m.n_layers, (final_class, final_norm)]
    if m.arch == "t5":
        decoder_block = partial(build_decoder_block, cfg, tp_group, sequence_parallel)
        stack += [*[(DecoderBlock, decoder_block)] * m.n_layers, (final_class, final_norm)]
    return stack + [(Readout, readout)]


class Transformer(nn.Module):
    def __init__(self, cfg: Config, tp_group: Optional[ProcessGroup] = None) -> None:
        super().__init__()
        self.vocab_size = cfg.model.vocab_size
        self.seq_len = cfg.model.seq_len
        self.layers = nn.ModuleList(build() for _, build in layer_builders(cfg, tp_group))

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, V_padded] (gathered over TP), or with `labels` [B, T] the mean fp32 cross entropy
        over the true vocabulary (labels -100 ignored)."""
        if input_ids.shape[-1] > self.seq_len:
            raise ValueError(f"input has {input_ids.shape[-1]} tokens but model.seq_len is {self.seq_len}")
        *body, readout = self.layers
        x = input_ids
        for layer in body:
            x = layer(x)
        if labels is None:
            return readout.gather_logits(readout(x))
        return readout.loss_from_input(x, labels, self.vocab_size)


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every Block of `model` (a Transformer or a pipeline stage) in place; returns how many."""
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def parameter_layout(cfg: Config) -> dict[str, tuple[Optional[int], str]]:
    """Qualified name → (TP partition dim or None if replicated, μP role) of every parameter.

    Read from a model built on the meta device (no memory, no init), e.g. to merge TP checkpoint shards.
    """
    with torch.device("meta"):
        model = _new_model(cfg, None)
    return {name: (p.partition_dim, p.mup_role) for name, p in model.named_parameters()}


def check_buildable(cfg: Config, tp_group: Optional[ProcessGroup]) -> None:
    """ConfigError when the model cannot be built from `cfg` on a TP group of this size."""
    if cfg.model.vocab_size is None:
        raise ConfigError("model.vocab_size is unset: set it, or let the trainer fill it from data.tokenizer_model")
    if cfg.rotary and cfg.head_dim % 2:
        raise ConfigError(f"RoPE needs an even head dimension, got hidden_size/n_heads = {cfg.head_dim}; "
                          f"change model.n_heads or model.hidden_size")
    if group_size(tp_group) != cfg.parallel.tensor:
        raise ConfigError(f"parallel.tensor={cfg.parallel.tensor} but the tensor-parallel group passed to "
                          f"build_model has {group_size(tp_group)} rank(s); pass "
                          f"get_parallel_state().get_tensor_model_parallel_group()")


def _new_model(cfg: Config, tp_group: Optional[ProcessGroup]) -> nn.Module:
    """The uninitialised model of cfg.model.arch: a Transformer, or t5's EncoderDecoder."""
    if cfg.model.arch == "t5":
        from megamu.model.encoder_decoder import EncoderDecoder  # it imports this module's layer_builders

        return EncoderDecoder(cfg, tp_group)
    return Transformer(cfg, tp_group)


def build_model(cfg: Config, tp_group: Optional[ProcessGroup] = None) -> nn.Module:
    """This TP rank's transformer (t5: encoder-decoder) on CPU in fp32, initialised by μP's rules
    (mup.init_weights) from cfg.train.seed; the shards of a TP=k model gather to the TP=1 model's weights.

    tp_group: the tensor-parallel group of cfg.parallel.tensor ranks (None when it is 1). Gradients of
    replicated parameters that each rank sees only part of (norms under sequence parallelism) are summed
    over it in backward.
    """
    check_buildable(cfg, tp_group)
    model = _new_model(cfg, tp_group)
    mup.init_weights(model, cfg)
    register_partial_grad_allreduce(model, tp_group)
    return model


def _block_sizes(cfg: Config) -> dict[str, int]:
    """Parameters of one attention (self or cross), one MLP and one norm."""
    m = cfg.model
    h, hd, ffn = m.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    kv = cfg.kv_heads * hd
    gpt2 = not rms_swiglu(m.arch)  # gpt2 and bert: LayerNorm, biases, GELU MLP
    head_norm = (2 * hd if gpt2 else hd) if m.qk_norm else 0
    return {"attention": 2 * h * h + 2 * h * kv + 2 * head_norm + ((2 * h + 2 * kv) if gpt2 else 0),
            "mlp": (2 * h * ffn + ffn + h) if gpt2 else 3 * h * ffn,
            "norm": 2 * h if gpt2 else h,  # LayerNorm has a bias
            "cross_kv": 2 * h * kv}


def param_counts(cfg: Config) -> dict[str, int]:
    """{"total", "non_embedding"} from the config; non-embedding excludes token and position embeddings only
    (t5's relative-position tables count as position embeddings)."""
    m = cfg.model
    h, size = m.hidden_size, _block_sizes(cfg)
    norm = size["norm"]
    per_block = size["attention"] + size["mlp"] + 2 * norm
    vocab = cfg.padded_vocab_size()
    readout = vocab * h
    if m.arch == "t5":
        decoder_block = 2 * size["attention"] + size["mlp"] + 3 * norm
        non_embedding = m.n_layers * (per_block + decoder_block) + 2 * norm + readout
        positions = 2 * RELATIVE_BUCKETS * m.n_heads if cfg.relative_positions else 0
        return {"total": non_embedding + vocab * h + positions, "non_embedding": non_embedding}
    embedding = vocab * h + (0 if cfg.rotary else m.seq_len * h)
    head = h * h + h + norm if m.arch == "bert" else 0  # the masked-LM transform: dense and its norm
    non_embedding = m.n_layers * per_block + norm + head + readout
    return {"total": non_embedding + embedding, "non_embedding": non_embedding}


def flops_per_token(cfg: Config) -> int:
    """Training FLOPs per token: 6·N_non_embedding + 12·L·heads·head_dim·seq_len (attention scores).

    t5 counts FLOPs per sample over its seq_len text tokens: the encoder's parameters (and the decoder's
    cross-attention keys and values) act on encoder_len positions, the rest of the decoder's on decoder_len,
    and the scores are encoder², decoder² and decoder × encoder."""
    m = cfg.model
    attention = 12 * m.n_layers * m.n_heads * cfg.head_dim
    non_embedding = param_counts(cfg)["non_embedding"]
    if m.arch != "t5":
        return 6 * non_embedding + attention * m.seq_len
    layout, size = span_layout(cfg), _block_sizes(cfg)
    enc, dec = layout.encoder_len, layout.decoder_len
    on_encoder = m.n_layers * (size["attention"] + size["mlp"] + 2 * size["norm"] + size["cross_kv"]) + size["norm"]
    per_sample = (6 * (on_encoder * enc + (non_embedding - on_encoder) * dec)
                  + attention * (enc * enc + dec * dec + dec * enc))
    return round(per_sample / m.seq_len)
