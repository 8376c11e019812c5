"""Autograd-aware collectives that move activations into and out of the tensor-parallel (TP) region.

Each public function pairs a forward collective with its adjoint in the backward pass, so that a TP
model computes exactly the gradients of the dense model:

    function                                    forward                 backward
    copy_to_tp_region                           identity                all-reduce
    reduce_from_tp_region                       all-reduce              identity
    scatter_to_tp_region                        split last dim          all-gather last dim
    gather_from_tp_region                       all-gather last dim     split last dim
    scatter_to_sequence_parallel_region         split sequence dim      all-gather sequence dim
    gather_from_sequence_parallel_region        all-gather sequence     reduce-scatter sequence (or split)
    reduce_scatter_to_sequence_parallel_region  reduce-scatter seq      all-gather sequence dim

Every function takes the TP process group explicitly; `None` (or a group of one rank) means "no
tensor parallelism" and returns the input itself, so TP=1 runs pay nothing. Activations in megamu
are [batch, seq, hidden], hence the default `seq_dim=1`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

# torch 2.13 renamed the single-tensor collectives; setup.py still allows older torch.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: Optional[ProcessGroup]) -> int:
    """Number of ranks in `group`; 1 when there is no group."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    """This process's rank inside `group` (not its global rank); 0 when there is no group."""
    return 0 if group is None else dist.get_rank(group)


# ---- plain collectives (no autograd) ---------------------------------------------------------

def _all_reduce(x: Tensor, group: ProcessGroup) -> Tensor:
    # Out of place: the input may be saved for another op's backward, or be a grad autograd reuses.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _split(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    world = group_size(group)
    if x.size(dim) % world:
        raise ValueError(f"cannot split dim {dim} of shape {tuple(x.shape)} evenly across {world} "
                         f"tensor-parallel ranks; make that size a multiple of the TP size")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def _all_gather(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    world = group_size(group)
    # Gather into one buffer concatenated along dim 0 (the form every backend accepts), then regroup.
    buffer = torch.empty((world * x.size(0), *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(buffer, x.contiguous(), group=group)
    if dim % x.dim() == 0:
        return buffer
    return torch.cat(buffer.chunk(world, dim=0), dim=dim)


def _reduce_scatter(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    world = group_size(group)
    if x.size(dim) % world:
        raise ValueError(f"cannot reduce-scatter dim {dim} of shape {tuple(x.shape)} across {world} "
                         f"tensor-parallel ranks; make that size a multiple of the TP size")
    # The collective splits along dim 0, so bring `dim` to the front and back again.
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((front.size(0) // world, *front.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim).contiguous()


# ---- autograd functions ---------------------------------------------------------------------

class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: ProcessGroup, grad_is_partial: bool) -> Tensor:
        ctx.dim, ctx.group, ctx.grad_is_partial = dim, group, grad_is_partial
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.grad_is_partial:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


# ---- public API -----------------------------------------------------------------------------

def copy_to_tp_region(x: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce of the gradient backward."""
    if group_size(group) == 1:
        return x
    return _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    if group_size(group) == 1:
        return x
    return _ReduceFromRegion.apply(x, group)


def scatter_to_tp_region(x: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """Keep this rank's slice of the last dim: split forward, all-gather of the gradient backward."""
    if group_size(group) == 1:
        return x
    return _ScatterToRegion.apply(x, -1, group)


def gather_from_tp_region(x: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """Concatenate every rank's slice along the last dim: all-gather forward, split backward."""
    if group_size(group) == 1:
        return x
    return _GatherFromRegion.apply(x, -1, group, False)


def scatter_to_sequence_parallel_region(x: Tensor, group: Optional[ProcessGroup], seq_dim: int = 1) -> Tensor:
    """Keep this rank's slice of the sequence: split forward, all-gather of the gradient backward."""
    if group_size(group) == 1:
        return x
    return _ScatterToRegion.apply(x, seq_dim, group)


def gather_from_sequence_parallel_region(x: Tensor, group: Optional[ProcessGroup], seq_dim: int = 1,
                                         grad_is_partial: bool = True) -> Tensor:
    """All-gather sequence slices into the full sequence.

    Backward: when the gathered tensor feeds TP-sharded layers (the usual case before a column-parallel
    linear), each rank holds only a partial sum of the gradient, so it is reduce-scattered. Pass
    `grad_is_partial=False` when every rank computes the full gradient; it is then just split.
    """
    if group_size(group) == 1:
        return x
    return _GatherFromRegion.apply(x, seq_dim, group, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: Tensor, group: Optional[ProcessGroup],
                                               seq_dim: int = 1) -> Tensor:
    """Sum partial results and keep this rank's sequence slice: reduce-scatter forward, all-gather backward."""
    if group_size(group) == 1:
        return x
    return _ReduceScatterToRegion.apply(x, seq_dim, group)
