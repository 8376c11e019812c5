"""Layers that tensor parallelism swaps: column/row-parallel linears, vocab-parallel embedding, readout.

These are the TP=1 implementations (plain matmul / F.embedding). The constructor arguments are the ones
the TP versions need (`tp_size`, `tp_rank`, `input_is_parallel`, `gather_output`), so adding TP changes
these classes and nothing in `megamu.model`.

Each parameter is tagged where it is created:
- `param.mup_role`: what μP does with it ("hidden_in", "query", "hidden_out", "embedding", "readout",
  "bias"); `megamu.model.mup` reads only this tag, never parameter names.
- `param.partition_dim` (None = replicated) and `param.tensor_model_parallel` (DeepSpeed's tag for
  counting a sharded parameter's gradient norm on every TP rank).
`local_shard(full, param)` cuts this rank's piece out of the full (unsharded) tensor, so initialisation
can draw the full tensor from a seeded generator and stay identical for every TP size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

def tag_parameter(param: nn.Parameter, role: str, partition_dim: Optional[int], tp_size: int) -> nn.Parameter:
    """Attach the μP role and the TP partitioning of `param` (see module docstring)."""
    param.mup_role = role
    param.partition_dim = partition_dim
    param.tensor_model_parallel = partition_dim is not None and tp_size > 1
    return param


class TensorParallelLayer(nn.Module):
    """Base of the TP-swappable layers: knows its TP rank/size and how to cut a shard from a full tensor."""

    def __init__(self, tp_size: int = 1, tp_rank: int = 0) -> None:
        super().__init__()
        if tp_size != 1 or tp_rank != 0:
            raise NotImplementedError(
                f"tensor parallelism (tp_size={tp_size}) is not implemented yet; set parallel.tensor=1")
        self.tp_size = tp_size
        self.tp_rank = tp_rank

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


class ColumnParallelLinear(TensorParallelLayer):
    """y = x Wᵀ + b with W split by output rows across TP ranks (Megatron's column-parallel linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, role: str = "hidden_in",
                 gather_output: bool = False, tp_size: int = 1, tp_rank: int = 0) -> None:
        super().__init__(tp_size, tp_rank)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        local_out = out_features // tp_size
        self.weight = tag_parameter(nn.Parameter(torch.empty(local_out, in_features)), role, 0, tp_size)
        self.bias = (tag_parameter(nn.Parameter(torch.empty(local_out)), "bias", 0, tp_size) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(TensorParallelLayer):
    """y = x Wᵀ + b with W split by input columns across TP ranks (Megatron's row-parallel linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, role: str = "hidden_out",
                 input_is_parallel: bool = True, tp_size: int = 1, tp_rank: int = 0) -> None:
        super().__init__(tp_size, tp_rank)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        self.weight = tag_parameter(nn.Parameter(torch.empty(out_features, in_features // tp_size)), role, 1,
                                    tp_size)
        # The bias is added once, after the (future) all-reduce, so it is replicated.
        self.bias = tag_parameter(nn.Parameter(torch.empty(out_features)), "bias", None, tp_size) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class VocabParallelEmbedding(TensorParallelLayer):
    """Token embedding with the (padded) vocabulary split across TP ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, role: str = "embedding",
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        super().__init__(tp_size, tp_rank)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = tag_parameter(nn.Parameter(torch.empty(num_embeddings // tp_size, embedding_dim)), role, 0,
                                    tp_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class ParallelReadout(TensorParallelLayer):
    """Vocabulary projection (column-parallel over the vocab): hidden [.., H] → logits [.., V_padded] × scale.

    `logit_scale` is μP's α_out/m (1 under SP); it lives here so every logit the model emits carries it.
    """

    def __init__(self, in_features: int, vocab_size: int, *, logit_scale: float = 1.0, gather_output: bool = True,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        super().__init__(tp_size, tp_rank)
        self.in_features, self.vocab_size = in_features, vocab_size
        self.logit_scale = logit_scale
        self.gather_output = gather_output
        self.weight = tag_parameter(nn.Parameter(torch.empty(vocab_size // tp_size, in_features)), "readout", 0,
                                    tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, vocab_size={self.vocab_size}, logit_scale={self.logit_scale:g}"
