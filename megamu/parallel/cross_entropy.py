"""Cross entropy over logits sharded along the vocabulary, without ever gathering the full logits.

Each TP rank holds logits for a contiguous slice of the (padded) vocabulary. The softmax needs only
two numbers per token from the other ranks, the global max and the global sum of exponentials, and
the target's logit lives on exactly one rank; two all-reduces of per-token tensors (the max, then the
sum of exponentials and the target logit together) replace an all-gather of [tokens, vocab]. With no
group (TP=1) the same code is the plain fp32 cross entropy, so TP=1 and TP=k runs compute the loss
the same way.

Padded vocabulary entries (columns at or beyond `vocab_size`) are excluded from the softmax: they get
no probability and no gradient, so the loss does not depend on how much padding the TP size adds.

`sharded_softmax_cross_entropy` and `softmax_minus_one_hot_` are the per-row pieces, shared with the
chunked readout + loss of `megamu.parallel.fused_cross_entropy`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from megamu.parallel.mappings import group_rank, group_size


def _all_reduce_(x: Tensor, op: dist.ReduceOp, group: Optional[ProcessGroup]) -> None:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)


class ShardedSoftmax(NamedTuple):
    loss: Tensor  # [rows] fp32, 0 where the target is ignored
    probs: Tensor  # [rows, shard] fp32 softmax over the whole (real) vocabulary, this rank's columns
    local_target: Tensor  # [rows] the target's column in this shard (0 where it is not on this shard)
    on_shard: Tensor  # [rows] bool: the target is a valid id held by this shard


def sharded_softmax_cross_entropy(logits: Tensor, target: Tensor, group: Optional[ProcessGroup],
                                   vocab_size: int, ignore_index: int) -> ShardedSoftmax:
    """Per-row cross entropy and softmax of fp32 logits [rows, shard], this rank's vocab slice (left as it is:
    `probs` is one new [rows, shard] buffer, which the gradient then reuses)."""
    shard = logits.size(-1)
    vocab_start = group_rank(group) * shard
    real_columns = max(0, min(shard, vocab_size - vocab_start))  # the rest of this shard is padding

    # Subtract the global max for a stable exp; padding cannot be the max.
    if real_columns > 0:
        row_max = logits[:, :real_columns].max(dim=-1).values
    else:
        row_max = logits.new_full((logits.size(0),), float("-inf"))
    _all_reduce_(row_max, dist.ReduceOp.MAX, group)
    shifted = logits - row_max.unsqueeze(-1)
    shifted[:, real_columns:] = float("-inf")

    # The target's logit, from the one rank whose shard holds it (0 from every other rank).
    valid = target != ignore_index
    on_shard = valid & (target >= vocab_start) & (target < vocab_start + shard)
    local_target = torch.where(on_shard, target - vocab_start, torch.zeros_like(target))
    target_logit = torch.where(on_shard, shifted.gather(1, local_target.unsqueeze(-1)).squeeze(-1),
                               torch.zeros_like(row_max))

    probs = shifted.exp_()
    # One all-reduce for both sums: they are ready at the same time.
    sums = torch.stack((probs.sum(dim=-1), target_logit))
    _all_reduce_(sums, dist.ReduceOp.SUM, group)
    sum_exp, target_logit = sums.unbind()
    probs.div_(sum_exp.unsqueeze(-1))
    loss = torch.where(valid, sum_exp.log() - target_logit, torch.zeros_like(sum_exp))
    return ShardedSoftmax(loss, probs, local_target, on_shard)


def softmax_minus_one_hot_(softmax: ShardedSoftmax, row_scale: Tensor) -> Tensor:
    """d loss / d logits = (softmax − one_hot(target)) · row_scale, in place of `softmax.probs`; the one-hot
    is subtracted only on the shard that owns the target. row_scale: [rows] fp32 (0 for ignored rows)."""
    grad = softmax.probs
    rows = torch.arange(grad.size(0), device=grad.device)
    grad[rows, softmax.local_target] -= softmax.on_shard.to(grad.dtype)
    return grad.mul_(row_scale.unsqueeze(-1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group: Optional[ProcessGroup], vocab_size: int,
                ignore_index: int) -> Tensor:
        target_1d = target.reshape(-1)
        softmax = sharded_softmax_cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target_1d, group,
                                                 vocab_size, ignore_index)
        ctx.save_for_backward(softmax.probs, softmax.local_target, softmax.on_shard, target_1d != ignore_index)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        ctx.backward_done = False
        return softmax.loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if ctx.backward_done:
            raise RuntimeError("vocab_parallel_cross_entropy's backward reuses its saved softmax buffer and can "
                               "run only once; recompute the loss instead of backward(retain_graph=True) twice")
        ctx.backward_done = True
        probs, local_target, on_shard, valid = ctx.saved_tensors
        row_scale = grad_loss.reshape(-1).float() * valid
        grad = softmax_minus_one_hot_(ShardedSoftmax(None, probs, local_target, on_shard), row_scale)
        return grad.view(ctx.logits_shape).to(ctx.logits_dtype), None, None, None, None


def check_vocab_size(vocab_size: Optional[int], columns: int, group: Optional[ProcessGroup]) -> int:
    """The true vocabulary size (all columns when None), checked against the padded one."""
    padded_vocab = columns * group_size(group)
    vocab_size = padded_vocab if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, {padded_vocab}] (the padded vocab: "
                         f"{columns} columns per rank × {group_size(group)} ranks)")
    return vocab_size


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, group: Optional[ProcessGroup], *,
                                 vocab_size: Optional[int] = None, ignore_index: int = -100) -> Tensor:
    """Per-token cross entropy (fp32, shape of `target`) of logits sharded along the vocabulary.

    logits: [..., V_padded / tp], this rank's contiguous vocab slice (rank r holds columns
            r·shard .. (r+1)·shard - 1), any float dtype; the math runs in fp32.
    target: [...] token ids in [0, vocab_size), or `ignore_index` (loss 0, no gradient).
    vocab_size: the true vocabulary size; columns beyond it are padding, excluded from the softmax.
            None: every column is a real token.
    Equals F.cross_entropy(full_logits[..., :vocab_size], target, reduction="none", ignore_index=...).
    Targets are not range-checked (that would sync the device every step); a target in the padding
    gives an infinite loss, which the trainer's non-finite guard reports.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: logits must be "
                         f"target's shape plus a trailing vocab dim")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    vocab_size = check_vocab_size(vocab_size, logits.size(-1), group)
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_size, ignore_index)
