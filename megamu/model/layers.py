"""Transformer building blocks: norms, rotary embedding, attention, MLPs, the block, the embedding layer.

The linear layers come from `megamu.parallel.layers`; this file picks their column/row roles, passes the
tensor-parallel (TP) group, and gives every parameter its μP role (`mup.assign_role`) once the layers
exist, since only the model knows what a weight is for. Under TP each rank holds n_heads/tp query heads, n_kv_heads/tp kv heads and
ffn/tp MLP columns; under sequence parallelism (SP) the residual stream, norms and dropout between the
TP regions hold seq_len/tp positions.
All multipliers (attention scale, embedding and logit multipliers) are passed in: their values come from
`megamu.model.mup`, the one place that knows μP's rules.

Activation checkpointing lives in these modules, so every path that builds blocks (the plain transformer
and the pipeline stages) gets it: a `full` block keeps only its input and is recomputed in backward; a
`selective` block recomputes only regions of elementwise work and attention that hold no linear layer and
no collective (its norms, the attention core and the SwiGLU product), so backward reruns no matmul of a
weight and no communication. Both replay dropout exactly (`megamu.parallel.random.activation_checkpoint`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megamu.config import rms_swiglu
from megamu.model.mup import Role, assign_linear_roles, assign_role
from megamu.parallel.layers import (ColumnParallelLinear, ParallelPositionEmbedding, ParallelReadout,
                                    ReplicatedLinear, RowParallelLinear, TensorParallelInput, TensorParallelLayer,
                                    VocabParallelEmbedding, tag_parameter)
from megamu.parallel.random import activation_checkpoint, get_rng_tracker


def _norm_param(shape: int, role: Role, partial_grad: bool) -> nn.Parameter:
    # Replicated over TP; `partial_grad`: each rank sees only a sequence shard (SP) or its own heads.
    param = tag_parameter(nn.Parameter(torch.empty(shape)), None, tp_size=1, partial_grad=partial_grad)
    assign_role(param, role)
    return param


def _rank_local_rng(active: bool) -> contextlib.AbstractContextManager:
    """Dropout on TP-sharded activations draws from the per-rank stream, so shards get independent masks."""
    return get_rng_tracker().fork() if active else contextlib.nullcontext()


def _maybe_recompute(recompute: bool, function: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    return activation_checkpoint(function, *args) if recompute else function(*args)


class ShardedDropout(nn.Dropout):
    """Dropout whose masks come from the per-TP-rank RNG stream when its input is sharded across ranks."""

    def __init__(self, p: float, sharded: bool) -> None:
        super().__init__(p)
        self.sharded = sharded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _rank_local_rng(self.sharded and self.training and self.p > 0):
            return super().forward(x)


class RMSNorm(nn.Module):
    """x / rms(x) · g, computed in fp32 whatever the input dtype (bf16 sums of squares lose precision)."""

    def __init__(self, dim: int, eps: float, partial_grad: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _norm_param(dim, Role.NORM, partial_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with gain and bias, computed in fp32 (GPT-2 and BERT style)."""

    def __init__(self, dim: int, eps: float, partial_grad: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _norm_param(dim, Role.NORM, partial_grad)
        self.bias = _norm_param(dim, Role.BIAS, partial_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.weight.shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


def make_norm(arch: str, dim: int, eps: float, partial_grad: bool = False) -> nn.Module:
    return RMSNorm(dim, eps, partial_grad) if rms_swiglu(arch) else LayerNorm(dim, eps, partial_grad)


class RotaryEmbedding(nn.Module):
    """RoPE on consecutive pairs (x[2i], x[2i+1]) with real arithmetic only, so torch.compile can trace it.

    Equivalent to multiplying the complex number x[2i] + i·x[2i+1] by exp(i·t·θ_i), θ_i = theta^(-2i/d).
    The cos/sin tables of positions 0 .. max_seq_len-1 are fp32 buffers, non-persistent (derived from the
    config, so never in a checkpoint) and rebuilt in fp32 after every `_apply` (`.to(dtype)`,
    `.bfloat16()`, `.to_empty(...)`): a bf16 cast would leave angles wrong by whole radians at long
    positions, and `to_empty` (from the meta device) would leave them uninitialised.
    """

    def __init__(self, head_dim: int, theta: float, max_seq_len: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_seq_len = head_dim, theta, max_seq_len
        cos, sin = self._tables(device=None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: Optional[torch.device]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin of t·θ_i, [max_seq_len, head_dim/2]; on the default device when `device` is None."""
        # Integer aranges made float: ZeRO 3's zero.Init casts every floating-point tensor a constructor
        # returns to the training dtype, and bf16 positions are not even exact integers beyond 256.
        exponents = torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim
        positions = torch.arange(self.max_seq_len, device=device).float()
        angles = torch.outer(positions, self.theta ** -exponents)
        return angles.cos(), angles.sin()

    def _apply(self, fn: Callable, recurse: bool = True) -> "RotaryEmbedding":
        super()._apply(fn, recurse)
        self.cos, self.sin = self._tables(self.cos.device)  # wherever fn moved them, in fp32 again
        return self

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: [B, T, heads, head_dim] at positions offset .. offset+T-1 (≤ max_seq_len) → same shape, rotated by
        position (`offset`: the tokens already decoded, when generating with a KV cache)."""
        seq_len = x.shape[1]
        cos, sin = self.cos[offset:offset + seq_len, None, :], self.sin[offset:offset + seq_len, None, :]
        x32 = x.float()
        even, odd = x32[..., 0::2], x32[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention (causal, or bidirectional for an encoder) with grouped-query heads, optional
    QK-norm and RoPE, through SDPA; biased q/k/v/o for every arch but llama.

    Heads are split across TP ranks: q/k/v column-parallel (rank r holds query heads r·n/tp ... and the kv
    heads they read), o row-parallel. Grouped-query heads go to SDPA as they are (`enable_gqa`): no
    expanded copy of k and v. `recompute_core`: keep only q, k, v for backward and recompute the core
    (QK-norm, RoPE, SDPA with its dropout), so its fp32 RoPE copies, the rotated q and k, the attention
    output and, without a flash kernel, the T×T probabilities and dropout mask are not kept.
    """

    def __init__(self, *, arch: str, hidden_size: int, n_heads: int, n_kv_heads: int, scale: float,
                 qk_norm: bool, norm_eps: float, rotary: bool, rope_theta: float, max_seq_len: int,
                 dropout: float, causal: bool = True, group: Optional[ProcessGroup] = None,
                 sequence_parallel: bool = False, recompute_core: bool = False) -> None:
        super().__init__()
        self.recompute_core = recompute_core
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = hidden_size // n_heads
        self.scale = scale
        self.dropout, self.causal = dropout, causal
        bias = not rms_swiglu(arch)
        kv_size = n_kv_heads * self.head_dim
        tp = dict(group=group, sequence_parallel=sequence_parallel)
        self.enter = TensorParallelInput(**tp)
        self.q = ColumnParallelLinear(hidden_size, hidden_size, bias, input_is_parallel=True, **tp)
        self.k = ColumnParallelLinear(hidden_size, kv_size, bias, input_is_parallel=True, **tp)
        self.v = ColumnParallelLinear(hidden_size, kv_size, bias, input_is_parallel=True, **tp)
        self.o = RowParallelLinear(hidden_size, hidden_size, bias, **tp)
        assign_linear_roles(self.q, Role.QUERY)
        for linear in (self.k, self.v):
            assign_linear_roles(linear, Role.HIDDEN_IN)
        assign_linear_roles(self.o, Role.HIDDEN_OUT)
        self.heads_are_sharded = self.enter.tp_size > 1
        # One gain shared by all heads, and each rank sees only its own heads: partial gradients under TP.
        self.q_norm = make_norm(arch, self.head_dim, norm_eps, self.heads_are_sharded) if qk_norm else None
        self.k_norm = make_norm(arch, self.head_dim, norm_eps, self.heads_are_sharded) if qk_norm else None
        self.rope = RotaryEmbedding(self.head_dim, rope_theta, max_seq_len) if rotary else None

    def forward(self, x: torch.Tensor, position_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`position_bias`: [1, this rank's heads, T, T] added to the scores (T5's relative positions)."""
        x = self.enter(x)  # under SP: the full sequence from here to o
        q, k, v = self._project(self.q, x), self._project(self.k, x), self._project(self.v, x)
        return self.o(_maybe_recompute(self.recompute_core, self._core, q, k, v, position_bias))

    def _project(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H] → [B, T, heads, head_dim] through one of q, k, v."""
        return linear(x).view(*x.shape[:2], -1, self.head_dim)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              position_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, T, heads, head_dim] q, k, v → attention output [B, T, heads·head_dim], the input of o."""
        batch, seq_len = q.shape[:2]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        dropout = self.dropout if self.training else 0.0
        mask, causal = None, self.causal
        if position_bias is not None:  # SDPA takes a mask or is_causal, not both: the causal part joins the mask
            mask = position_bias.to(q.dtype)
            if causal:
                mask = mask.masked_fill(_future(q.shape[2], k.shape[2], q.device), float("-inf"))
            causal = False
        with _rank_local_rng(self.heads_are_sharded and dropout > 0):
            # Grouped-query: every kv head serves q heads / kv heads consecutive query heads (each TP rank's
            # kv heads serve its own query heads, as the column-parallel q/k/v shards keep the ratio).
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                                 dropout_p=dropout, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).reshape(batch, seq_len, -1)


def _future(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """[queries, keys] bools: key j lies after query i (what causal attention hides)."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).triu(1)


class CrossAttention(Attention):
    """An encoder-decoder's cross-attention: queries from the decoder stream x, keys and values from the
    encoder's output (`memory`), no positions (none are shared between the two sequences) and no causal mask,
    so every decoder position sees the whole encoder and nothing of the decoder. μP roles as in self-attention
    (q query, k/v hidden_in, o hidden_out) with the same α_attn/d_head scale: the scores are still dot products
    of width-sized vectors that become correlated in training.

    Under TP the memory enters the TP region through its own entry (one all-gather of the encoder's sequence
    under SP, one gradient reduction backward); under SP the decoder's and the encoder's sequences are both split.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**{**kwargs, "rotary": False, "causal": False})
        self.enter_memory = TensorParallelInput(group=kwargs.get("group"),
                                                sequence_parallel=kwargs.get("sequence_parallel", False))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, memory = self.enter(x), self.enter_memory(memory)
        q, k, v = self._project(self.q, x), self._project(self.k, memory), self._project(self.v, memory)
        return self.o(_maybe_recompute(self.recompute_core, self._core, q, k, v))


RELATIVE_BUCKETS, RELATIVE_MAX_DISTANCE = 32, 128  # T5's: buckets per table, distance beyond which all share one


class RelativePositionBias(TensorParallelLayer):
    """T5's relative positions: one learned score per (distance bucket, head), added to every layer's attention
    scores (one table per stack, shared by its layers). Distances below half the buckets each get their own
    bucket; longer ones share buckets spaced logarithmically up to `max_distance`, beyond which all share the
    last. `bidirectional` (the encoder) gives keys before and after the query separate halves of the buckets;
    the causal decoder only looks back.

    μP: a lookup table whose size (buckets × heads) does not grow with the width and whose entries enter the
    scores directly, so its init and Adam LR stay width-independent: the `position` role (σ, η), like learned
    positions. Heads are split over TP, so its columns are too (partition dim 1).
    """

    def __init__(self, n_heads: int, bidirectional: bool, n_buckets: int = RELATIVE_BUCKETS,
                 max_distance: int = RELATIVE_MAX_DISTANCE, *,
                 group: Optional[ProcessGroup] = None) -> None:
        super().__init__(group, sequence_parallel=False)
        self.bidirectional, self.n_buckets, self.max_distance = bidirectional, n_buckets, max_distance
        self.weight = tag_parameter(nn.Parameter(torch.empty(n_buckets, self._shard_size(n_heads, "n_heads"))), 1,
                                    self.tp_size)
        assign_role(self.weight, Role.POSITION)

    def buckets(self, queries: int, keys: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """[queries, keys] bucket index of key j's offset from query i."""
        offset = torch.arange(keys, device=device)[None, :] - torch.arange(queries, device=device)[:, None]
        n, base = self.n_buckets, torch.zeros_like(offset)
        if self.bidirectional:
            n //= 2
            base = torch.where(offset > 0, n, 0)
            distance = offset.abs()
        else:
            distance = (-offset).clamp(min=0)
        exact = n // 2
        far = exact + (torch.log(distance.clamp(min=1).float() / exact) / math.log(self.max_distance / exact)
                       * (n - exact)).long()
        return base + torch.where(distance < exact, distance, far.clamp(max=n - 1))

    def forward(self, queries: int, keys: int) -> torch.Tensor:
        """[1, this rank's heads, queries, keys] scores to add."""
        table = self.weight[self.buckets(queries, keys, self.weight.device)]  # [queries, keys, heads]
        return table.permute(2, 0, 1).unsqueeze(0)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) · up(x)). `recompute_activation`: keep gate(x) and up(x) for backward
    and recompute the product, so silu(gate(x)) (ffn wide) is not kept."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, group: Optional[ProcessGroup] = None,
                 sequence_parallel: bool = False, recompute_activation: bool = False) -> None:
        super().__init__()
        self.recompute_activation = recompute_activation
        tp = dict(group=group, sequence_parallel=sequence_parallel)
        self.enter = TensorParallelInput(**tp)
        self.gate = ColumnParallelLinear(hidden_size, ffn_hidden_size, input_is_parallel=True, **tp)
        self.up = ColumnParallelLinear(hidden_size, ffn_hidden_size, input_is_parallel=True, **tp)
        self.down = RowParallelLinear(ffn_hidden_size, hidden_size, **tp)
        assign_linear_roles(self.gate, Role.HIDDEN_IN)
        assign_linear_roles(self.up, Role.HIDDEN_IN)
        assign_linear_roles(self.down, Role.HIDDEN_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enter(x)
        return self.down(_maybe_recompute(self.recompute_activation, _swiglu, self.gate(x), self.up(x)))


class GeluMLP(nn.Module):
    """GPT-2 MLP: down(gelu(up(x))) with biases. Nothing to recompute selectively: GELU's backward needs only
    its input, and its output is kept by `down` anyway."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, group: Optional[ProcessGroup] = None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        tp = dict(group=group, sequence_parallel=sequence_parallel)
        self.up = ColumnParallelLinear(hidden_size, ffn_hidden_size, bias=True, **tp)
        self.down = RowParallelLinear(ffn_hidden_size, hidden_size, bias=True, **tp)
        assign_linear_roles(self.up, Role.HIDDEN_IN)
        assign_linear_roles(self.down, Role.HIDDEN_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x)).

    `sequence_sharded`: x holds this TP rank's slice of the sequence (SP), so dropout masks are per rank.
    `recompute_block`: keep only the block's input for backward and recompute the whole block (its
    collectives included). `recompute_norms`: keep the norms' inputs and recompute them (their fp32
    intermediates are not kept).
    """

    def __init__(self, attention: Attention, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module,
                 dropout: float, sequence_sharded: bool = False, *, recompute_block: bool = False,
                 recompute_norms: bool = False) -> None:
        super().__init__()
        self.attn_norm, self.attn = attn_norm, attention
        self.mlp_norm, self.mlp = mlp_norm, mlp
        self.dropout = ShardedDropout(dropout, sequence_sharded)
        self.recompute_block, self.recompute_norms = recompute_block, recompute_norms

    def forward(self, x: torch.Tensor, position_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _maybe_recompute(self.recompute_block, self._forward, x, position_bias)

    def _forward(self, x: torch.Tensor, position_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._feed_forward(self._self_attend(x, position_bias))

    def _self_attend(self, x: torch.Tensor, position_bias: Optional[torch.Tensor]) -> torch.Tensor:
        return x + self.dropout(self.attn(self._norm(self.attn_norm, x), position_bias))

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.mlp(self._norm(self.mlp_norm, x)))

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _maybe_recompute(self.recompute_norms, norm, x)


class DecoderBlock(Block):
    """An encoder-decoder's decoder block: x + self_attn(norm(x)) (causal), then + cross_attn(norm(x), memory)
    over the encoder's output, then + mlp(norm(x)); pre-norm and recomputation as in `Block`."""

    def __init__(self, attention: Attention, cross_attention: CrossAttention, mlp: nn.Module, attn_norm: nn.Module,
                 cross_norm: nn.Module, mlp_norm: nn.Module, dropout: float, sequence_sharded: bool = False, *,
                 recompute_block: bool = False, recompute_norms: bool = False) -> None:
        super().__init__(attention, mlp, attn_norm, mlp_norm, dropout, sequence_sharded,
                         recompute_block=recompute_block, recompute_norms=recompute_norms)
        self.cross_norm, self.cross_attn = cross_norm, cross_attention

    def forward(self, x: torch.Tensor, memory: torch.Tensor,  # type: ignore[override]
                position_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _maybe_recompute(self.recompute_block, self._decode, x, memory, position_bias)

    def _decode(self, x: torch.Tensor, memory: torch.Tensor, position_bias: Optional[torch.Tensor]) -> torch.Tensor:
        x = self._self_attend(x, position_bias)
        return self._feed_forward(x + self.dropout(self.cross_attn(self._norm(self.cross_norm, x), memory)))


class EmbeddingLayer(nn.Module):
    """Token ids [B, T] → hidden [B, T, H] (under SP [B, T/tp, H], this rank's sequence shard): token
    embedding (+ learned positions for GPT-2) × α_in."""

    def __init__(self, vocab_size: int, hidden_size: int, *, max_seq_len: Optional[int], input_mult: float,
                 dropout: float, group: Optional[ProcessGroup] = None, sequence_parallel: bool = False) -> None:
        super().__init__()
        tp = dict(group=group, sequence_parallel=sequence_parallel)
        self.tokens = VocabParallelEmbedding(vocab_size, hidden_size, **tp)
        self.positions = ParallelPositionEmbedding(max_seq_len, hidden_size, **tp) if max_seq_len else None
        assign_role(self.tokens.weight, Role.EMBEDDING)
        if self.positions is not None:
            assign_role(self.positions.weight, Role.POSITION)
        self.input_mult = input_mult
        self.dropout = ShardedDropout(dropout, self.tokens.sequence_parallel)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(input_ids)
        if self.positions is not None:
            x = x + self.positions(input_ids.shape[1])
        if self.input_mult != 1.0:
            x = x * self.input_mult
        return self.dropout(x)


class MaskedLMTransform(nn.Module):
    """BERT's head before the vocabulary projection: final norm, then norm(gelu(dense(x))). It takes the final
    norm's place among the layers, so the layer list (and the readout's index) stays the decoders'.

    The dense matrix is width × width, a hidden matrix to μP (σ/√m, Adam LR η/m); it is replicated over TP
    (its output must be normalised whole) and under SP acts on this rank's sequence shard.
    """

    def __init__(self, hidden_size: int, eps: float, *, group: Optional[ProcessGroup] = None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.final_norm = LayerNorm(hidden_size, eps, sequence_parallel)
        self.dense = ReplicatedLinear(hidden_size, hidden_size, bias=True, group=group,
                                      sequence_parallel=sequence_parallel)
        self.norm = LayerNorm(hidden_size, eps, sequence_parallel)
        assign_linear_roles(self.dense, Role.HIDDEN_IN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(self.final_norm(x)), approximate="tanh"))


class Readout(ParallelReadout):
    """The vocabulary projection with μP's logit multiplier α_out/m (1 under SP): the vocab-parallel layer's
    logits, scaled before the loss or sampling sees them. A subclass (not a wrapper) so the readout keeps
    its parameter name, which seeds its init.

    `fused` (train.fused_cross_entropy): `loss_from_input` computes projection and loss together over
    chunks of tokens, so the full logits never exist. It does so in this module's forward, called with
    labels, since ZeRO 3 gathers a module's parameters only around its forward. `pass_input` (a
    pipeline's last stage with the fused loss): forward without labels returns its input unchanged, since
    DeepSpeed hands the last layer's output to the loss function, which then calls `loss_from_input` on it.
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, logit_mult: float, fused: bool,
                 pass_input: bool = False, group: Optional[ProcessGroup] = None,
                 sequence_parallel: bool = False) -> None:
        super().__init__(hidden_size, vocab_size, group=group, sequence_parallel=sequence_parallel)
        if pass_input and not fused:
            raise ValueError("Readout(pass_input=True) needs fused=True: only the fused loss starts from the input")
        self.logit_mult, self.fused, self.pass_input = logit_mult, fused, pass_input
        assign_role(self.weight, Role.READOUT)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None,
                vocab_size: Optional[int] = None) -> torch.Tensor:
        """The logits of x; with `labels` the fused loss over the first `vocab_size` columns instead."""
        if labels is not None:
            return self.fused_loss(x, labels, vocab_size, self.logit_mult)
        if self.pass_input:
            return x
        logits = super().forward(x)
        return logits * self.logit_mult if self.logit_mult != 1.0 else logits

    def loss_from_input(self, x: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Mean fp32 cross entropy of the next tokens `labels` (-100 ignored) over the true vocabulary, from
        the readout's input x."""
        if self.fused:
            return self(x, labels, vocab_size)
        return self.loss(self(x), labels, vocab_size)

    def extra_repr(self) -> str:
        return f"logit_mult={self.logit_mult:g}, fused={self.fused}, {super().extra_repr()}"
