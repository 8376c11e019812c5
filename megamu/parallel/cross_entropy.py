"""Cross entropy over logits sharded along the vocabulary, without ever gathering the full logits.

Each TP rank holds logits for a contiguous slice of the (padded) vocabulary. The softmax needs only
two numbers per token from the other ranks, the global max and the global sum of exponentials, and
the target's logit lives on exactly one rank; three all-reduces of [tokens] tensors replace an
all-gather of [tokens, vocab]. With no group (TP=1) the same code is the plain fp32 cross entropy,
so TP=1 and TP=k runs compute the loss the same way.

Padded vocabulary entries (columns at or beyond `vocab_size`) are excluded from the softmax: they get
no probability and no gradient, so the loss does not depend on how much padding the TP size adds.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from megamu.parallel.mappings import group_rank, group_size


def _all_reduce_(x: Tensor, op: dist.ReduceOp, group: Optional[ProcessGroup]) -> None:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group: Optional[ProcessGroup], vocab_size: int,
                ignore_index: int) -> Tensor:
        shard = logits.size(-1)
        vocab_start = group_rank(group) * shard
        real_columns = max(0, min(shard, vocab_size - vocab_start))  # the rest of this shard is padding
        logits_2d = logits.reshape(-1, shard).float()
        target_1d = target.reshape(-1)

        # Subtract the global max for a stable exp; padding cannot be the max.
        if real_columns > 0:
            local_max = logits_2d[:, :real_columns].max(dim=-1).values
        else:
            local_max = logits_2d.new_full((logits_2d.size(0),), float("-inf"))
        _all_reduce_(local_max, dist.ReduceOp.MAX, group)
        shifted = logits_2d - local_max.unsqueeze(-1)
        shifted[:, real_columns:] = float("-inf")

        # The target's logit, from the one rank whose shard holds it (0 from every other rank).
        valid = target_1d != ignore_index
        on_shard = valid & (target_1d >= vocab_start) & (target_1d < vocab_start + shard)
        local_target = torch.where(on_shard, target_1d - vocab_start, torch.zeros_like(target_1d))
        rows = torch.arange(target_1d.numel(), device=logits.device)
        target_logit = torch.where(on_shard, shifted[rows, local_target], torch.zeros_like(local_max))
        _all_reduce_(target_logit, dist.ReduceOp.SUM, group)

        probs = shifted.exp_()  # reuses the buffer: shifted is no longer needed
        sum_exp = probs.sum(dim=-1)
        _all_reduce_(sum_exp, dist.ReduceOp.SUM, group)
        probs.div_(sum_exp.unsqueeze(-1))

        loss = torch.where(valid, sum_exp.log() - target_logit, torch.zeros_like(sum_exp))
        ctx.save_for_backward(probs, local_target, on_shard, valid)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        ctx.backward_done = False
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if ctx.backward_done:
            raise RuntimeError("vocab_parallel_cross_entropy's backward reuses its saved softmax buffer and can "
                               "run only once; recompute the loss instead of backward(retain_graph=True) twice")
        ctx.backward_done = True
        probs, local_target, on_shard, valid = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(target), on the shard that owns the target.
        grad = probs
        rows = torch.arange(grad.size(0), device=grad.device)
        grad[rows, local_target] -= on_shard.to(grad.dtype)
        grad.mul_((grad_loss.reshape(-1).float() * valid).unsqueeze(-1))
        return grad.view(ctx.logits_shape).to(ctx.logits_dtype), None, None, None, None


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
    padded_vocab = logits.size(-1) * group_size(group)
    vocab_size = padded_vocab if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, {padded_vocab}] (the padded vocab: "
                         f"{logits.size(-1)} columns per rank × {group_size(group)} ranks)")
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_size, ignore_index)
