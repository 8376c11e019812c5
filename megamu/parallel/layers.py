"""Megatron-style tensor-parallel (TP) layers: column/row-parallel linears, vocab-parallel embedding and
readout, learned positions, and the region entry shared by several column-parallel linears.

Every layer takes the TP process group (`None` = no tensor parallelism: plain matmul / F.embedding, and
the mappings cost nothing) and `sequence_parallel`. With sequence parallelism (SP) the activations
between TP regions are split along the sequence (dim 1 of [batch, seq, hidden]): a region is entered
by all-gathering the sequence (reduce-scatter backward) instead of the identity (all-reduce backward),
and left by reduce-scattering instead of all-reducing.

Each parameter is tagged with its parallel layout where it is created (and with nothing else: what a
parameter means to the model, e.g. its μP role, is the model's business):
- `param.partition_dim` (None = replicated) and `param.tensor_model_parallel` (DeepSpeed's tag: the
  gradient norm counts a tagged parameter on every TP rank, a replicated one only on TP rank 0).
- `param.needs_tp_grad_allreduce`: replicated, but every TP rank computes only part of its gradient (it
  sees a sequence shard, or only its own heads); `register_partial_grad_allreduce` sums those over TP.
`local_shard(full, param)` cuts this rank's piece out of the full (unsharded) tensor, so initialisation
can draw the full tensor from a seeded generator and stay identical for every TP size.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megamu.parallel import mappings
from megamu.parallel.cross_entropy import vocab_parallel_cross_entropy
from megamu.parallel.fused_cross_entropy import fused_readout_cross_entropy
from megamu.parallel.mappings import group_rank, group_size

# y = x Wᵀ (+ b) of a column/row-parallel linear: F.linear, or an FP8 kernel (megamu.model.fp8) swapped in.
LinearFunction = Callable[..., torch.Tensor]

IGNORE_INDEX = -100  # labels that take no part in the loss (F.cross_entropy's default ignore_index)


def tag_parameter(param: nn.Parameter, partition_dim: Optional[int], tp_size: int,
                  partial_grad: bool = False) -> nn.Parameter:
    """Attach the TP partitioning and the partial-gradient flag (see module docstring)."""
    param.partition_dim = partition_dim
    param.tensor_model_parallel = partition_dim is not None and tp_size > 1
    param.needs_tp_grad_allreduce = partial_grad
    return param


def register_partial_grad_allreduce(model: nn.Module, group: Optional[ProcessGroup]) -> int:
    """Sum the gradient of every `needs_tp_grad_allreduce` parameter over the TP group, in backward.

    A tensor hook runs before the gradient is accumulated into `.grad`, so DeepSpeed's own hooks (which
    reduce gradients over data parallelism at every ZeRO stage) already see the full gradient. Returns
    the number of parameters hooked.
    """
    if group_size(group) == 1:
        return 0
    hooked = 0
    for param in model.parameters():
        if getattr(param, "needs_tp_grad_allreduce", False):
            param.register_hook(lambda grad: mappings.reduce_from_tp_region(grad, group))
            hooked += 1
    return hooked


class TensorParallelLayer(nn.Module):
    """Base of the TP layers: its group, TP rank/size, SP flag, and shard cutting for initialisation."""

    def __init__(self, group: Optional[ProcessGroup], sequence_parallel: bool) -> None:
        super().__init__()
        self.group = group
        self.tp_size = group_size(group)
        self.tp_rank = group_rank(group)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1

    def full_shape(self, param: nn.Parameter) -> torch.Size:
        """Shape of the unsharded tensor that `param` is this rank's slice of."""
        shape = list(param.shape)
        if param.partition_dim is not None:
            shape[param.partition_dim] *= self.tp_size
        return torch.Size(shape)

    def local_shard(self, full: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """This rank's contiguous slice of `full` along `param.partition_dim` (all of it if replicated)."""
        if param.partition_dim is None:
            return full
        return full.chunk(self.tp_size, dim=param.partition_dim)[self.tp_rank]

    def _shard_size(self, size: int, what: str) -> int:
        if size % self.tp_size:
            raise ValueError(f"{type(self).__name__}: {what}={size} is not divisible by the tensor-parallel size "
                             f"{self.tp_size}; choose parallel.tensor dividing it")
        return size // self.tp_size

    def _enter_region(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated (or sequence-sharded) activations → the full input every TP rank's shard needs."""
        if self.sequence_parallel:
            return mappings.gather_from_sequence_parallel_region(x, self.group, seq_dim=1, grad_is_partial=True)
        return mappings.copy_to_tp_region(x, self.group)

    def _leave_region(self, partial_sums: torch.Tensor) -> torch.Tensor:
        """Per-rank partial sums → their total, replicated (or sequence-sharded under SP)."""
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(partial_sums, self.group, seq_dim=1)
        return mappings.reduce_from_tp_region(partial_sums, self.group)

    def extra_repr(self) -> str:
        return f"tp_size={self.tp_size}, sequence_parallel={self.sequence_parallel}"


class TensorParallelInput(TensorParallelLayer):
    """Enters a TP region once for several column-parallel linears that read the same input (q/k/v,
    SwiGLU gate/up): one all-gather under SP, and one gradient all-reduce (or reduce-scatter) backward,
    instead of one per linear. Those linears are built with `input_is_parallel=True`."""

    def __init__(self, *, group: Optional[ProcessGroup] = None, sequence_parallel: bool = False) -> None:
        super().__init__(group, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._enter_region(x)


class ColumnParallelLinear(TensorParallelLayer):
    """y = x Wᵀ + b with W split by output rows: rank r computes output columns r·out/tp ... (Megatron's
    column-parallel linear). The output stays split along its last dim unless `gather_output`.

    `input_is_parallel`: the input already went through a TensorParallelInput (shared with other linears).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, gather_output: bool = False, input_is_parallel: bool = False, group: Optional[ProcessGroup] = None,
                 sequence_parallel: bool = False) -> None:
        super().__init__(group, sequence_parallel)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.input_is_parallel = gather_output, input_is_parallel
        local_out = self._shard_size(out_features, "out_features")
        self.weight = tag_parameter(nn.Parameter(torch.empty(local_out, in_features)), 0, self.tp_size)
        self.bias = tag_parameter(nn.Parameter(torch.empty(local_out)), 0, self.tp_size) if bias else None
        self.matmul: LinearFunction = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = self._enter_region(x)
        y = self.matmul(x, self.weight, self.bias)
        return mappings.gather_from_tp_region(y, self.group) if self.gather_output else y


class RowParallelLinear(TensorParallelLayer):
    """y = x Wᵀ + b with W split by input columns (Megatron's row-parallel linear): each rank multiplies its
    slice of the input and the partial products are summed (all-reduce, or reduce-scatter under SP)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, input_is_parallel: bool = True, group: Optional[ProcessGroup] = None,
                 sequence_parallel: bool = False) -> None:
        super().__init__(group, sequence_parallel)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        local_in = self._shard_size(in_features, "in_features")
        self.weight = tag_parameter(nn.Parameter(torch.empty(out_features, local_in)), 1, self.tp_size)
        self.matmul: LinearFunction = F.linear
        # Added once, after the reduction: replicated; under SP each rank adds it to its sequence shard only.
        self.bias = (tag_parameter(nn.Parameter(torch.empty(out_features)), None, self.tp_size,
                                   partial_grad=self.sequence_parallel) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = mappings.scatter_to_tp_region(x, self.group)
        y = self._leave_region(self.matmul(x, self.weight))
        return y + self.bias if self.bias is not None else y


class ReplicatedLinear(TensorParallelLayer):
    """y = x Wᵀ + b with the whole W on every TP rank, applied to replicated (or, under SP, sequence-sharded)
    activations outside any TP region: for a small matrix whose output a norm must see whole. Under SP each
    rank sees only its sequence shard, so its gradients are partial and summed over TP."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 group: Optional[ProcessGroup] = None, sequence_parallel: bool = False) -> None:
        super().__init__(group, sequence_parallel)
        self.in_features, self.out_features = in_features, out_features
        partial = self.sequence_parallel
        self.weight = tag_parameter(nn.Parameter(torch.empty(out_features, in_features)), None, self.tp_size,
                                    partial_grad=partial)
        self.bias = (tag_parameter(nn.Parameter(torch.empty(out_features)), None, self.tp_size, partial_grad=partial)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class VocabParallelEmbedding(TensorParallelLayer):
    """Token embedding with the (padded) vocabulary split across TP ranks: each rank looks up the ids in its
    slice (zeros elsewhere) and the ranks' rows are summed (all-reduce, or reduce-scatter under SP, which
    leaves every rank its sequence shard)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group: Optional[ProcessGroup] = None,
                 sequence_parallel: bool = False) -> None:
        super().__init__(group, sequence_parallel)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local_rows = self._shard_size(num_embeddings, "num_embeddings (the padded vocabulary)")
        self.vocab_start = self.tp_rank * local_rows
        self.weight = tag_parameter(nn.Parameter(torch.empty(local_rows, embedding_dim)), 0, self.tp_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        elsewhere = (local_ids < 0) | (local_ids >= self.weight.size(0))
        rows = F.embedding(local_ids.masked_fill(elsewhere, 0), self.weight)
        rows = rows.masked_fill(elsewhere.unsqueeze(-1), 0.0)
        return self._leave_region(rows)


class ParallelPositionEmbedding(TensorParallelLayer):
    """Learned positions [seq, hidden], replicated; under SP each rank adds only its sequence shard's rows
    (the split's backward all-gathers the row gradients, so every rank gets the full gradient)."""

    def __init__(self, max_seq_len: int, embedding_dim: int, *, group: Optional[ProcessGroup] = None,
                 sequence_parallel: bool = False) -> None:
        super().__init__(group, sequence_parallel)
        self.weight = tag_parameter(nn.Parameter(torch.empty(max_seq_len, embedding_dim)), None, self.tp_size)

    def forward(self, seq_len: int) -> torch.Tensor:
        """Rows for positions 0 .. seq_len-1 ([seq_len or seq_len/tp, hidden])."""
        rows = self.weight[:seq_len]
        if self.sequence_parallel:
            return mappings.scatter_to_sequence_parallel_region(rows, self.group, seq_dim=0)
        return rows


class ParallelReadout(TensorParallelLayer):
    """Vocabulary projection, column-parallel over the vocab: hidden [B, T(/tp under SP), H] → this rank's
    logits [B, T, V_padded/tp], the full sequence.

    `loss` takes these sharded logits to the cross entropy (plain at TP=1, vocab-parallel otherwise);
    `fused_loss` computes projection and loss together from the hidden states, chunk by chunk, without
    the full logits; `gather_logits` assembles the full vocabulary for sampling or inspection.
    """

    def __init__(self, in_features: int, vocab_size: int, *, group: Optional[ProcessGroup] = None,
                 sequence_parallel: bool = False) -> None:
        super().__init__(group, sequence_parallel)
        self.in_features, self.vocab_size = in_features, vocab_size
        local_rows = self._shard_size(vocab_size, "vocab_size (the padded vocabulary)")
        self.weight = tag_parameter(nn.Parameter(torch.empty(local_rows, in_features)), 0, self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._enter_region(x), self.weight)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """This rank's vocab shard of the logits → all V_padded logits (identity at TP=1)."""
        return mappings.gather_from_tp_region(logits, self.group)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Mean fp32 next-token cross entropy over labels != -100 (0 if there are none), from the
        vocab-sharded logits; padded vocabulary entries (≥ vocab_size) get no probability."""
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
        if self.tp_size == 1:
            real = logits[..., :vocab_size].float()
            return F.cross_entropy(real.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum") / n_valid
        per_token = vocab_parallel_cross_entropy(logits, labels, self.group, vocab_size=vocab_size,
                                                 ignore_index=IGNORE_INDEX)
        return per_token.sum() / n_valid

    def fused_loss(self, x: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   logit_mult: float = 1.0) -> torch.Tensor:
        """`loss(forward(x) · logit_mult, ...)` with the projection fused into the loss over chunks of tokens,
        so the [tokens, vocab] logits never exist (`megamu.parallel.fused_cross_entropy`)."""
        return fused_readout_cross_entropy(self._enter_region(x), self.weight, labels, self.group,
                                           logit_mult=logit_mult, vocab_size=vocab_size, ignore_index=IGNORE_INDEX)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, vocab_size={self.vocab_size}, {super().extra_repr()}"


__all__ = ["ColumnParallelLinear", "ParallelPositionEmbedding", "ParallelReadout", "ReplicatedLinear",
           "RowParallelLinear",
           "TensorParallelInput", "TensorParallelLayer", "VocabParallelEmbedding",
           "register_partial_grad_allreduce", "tag_parameter"]
