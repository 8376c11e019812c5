"""The readout projection and the cross entropy fused over chunks of tokens.

At vocabularies of 32k-128k the readout's logits are the largest activation of the model: [tokens, V] in
the compute dtype, another fp32 copy for the softmax and its gradient. Here the logits of one chunk of
tokens exist at a time: each chunk's logits (compute dtype, then fp32) give its loss and, in the same
pass, its gradient (softmax − one-hot, scaled by 1/n_valid), which is multiplied straight into the chunk's
d_hidden and accumulated into d_weight. Backward only scales the two saved gradients by the incoming
gradient of the loss.

Under tensor parallelism each rank multiplies by its vocab shard of the readout weight, and the softmax
statistics of each chunk are all-reduced over the TP group exactly as in the vocab-parallel cross entropy
(`megamu.parallel.cross_entropy`), so TP=k equals TP=1. Padded vocabulary columns are excluded from the
softmax there too.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from megamu.parallel.cross_entropy import check_vocab_size, sharded_softmax_cross_entropy, softmax_minus_one_hot_

# Below this many tokens a chunk's matmul no longer fills a GPU, and at TP>1 each chunk costs two
# all-reduces of latency: a floor that keeps chunks efficient, at worst 1024 × V fp32 logits live.
MIN_CHUNK_TOKENS = 1024


def chunk_tokens(n_tokens: int, shard: int, hidden: int) -> int:
    """Tokens per chunk: ceil(shard / hidden) chunks, so a chunk's logits hold about as many elements as
    the hidden states entering the readout (the loss then needs no more activation memory than its input,
    whatever the vocabulary), but no fewer than MIN_CHUNK_TOKENS tokens."""
    n_chunks = math.ceil(shard / hidden)
    return min(n_tokens, max(MIN_CHUNK_TOKENS, math.ceil(n_tokens / n_chunks)))


class _FusedReadoutCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, logit_mult: float, vocab_size: int,
                group: Optional[ProcessGroup], ignore_index: int, chunk: int, with_grad: bool) -> Tensor:
        hidden_2d, target_1d = hidden.reshape(-1, hidden.size(-1)), target.reshape(-1)
        n_valid = (target_1d != ignore_index).sum().clamp(min=1)
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden_2d) if with_grad else None
        # fp32 accumulation: a bf16 sum over many chunks would round at every chunk.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
        for begin in range(0, hidden_2d.size(0), chunk):
            rows = slice(begin, begin + chunk)
            logits = F.linear(hidden_2d[rows], weight)
            if logit_mult != 1.0:  # in the compute dtype, as the unfused readout scales its logits
                logits = logits * logit_mult
            softmax = sharded_softmax_cross_entropy(logits.float(), target_1d[rows], group, vocab_size, ignore_index)
            total += softmax.loss.sum()
            if with_grad:
                row_scale = (target_1d[rows] != ignore_index) * (logit_mult / n_valid)
                grad_logits = softmax_minus_one_hot_(softmax, row_scale).to(logits.dtype)
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
                grad_weight.add_(grad_logits.t() @ hidden_2d[rows])
        if with_grad:
            ctx.save_for_backward(grad_hidden.view(hidden.shape), grad_weight.to(weight.dtype))
        return total / n_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None, None, None, None


def fused_readout_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, group: Optional[ProcessGroup], *,
                                logit_mult: float = 1.0, vocab_size: Optional[int] = None,
                                ignore_index: int = -100, chunk: Optional[int] = None) -> Tensor:
    """Mean fp32 cross entropy over the tokens whose target is not `ignore_index` (0 when there are none) of
    the logits `(hidden @ weight.T) · logit_mult`, never holding more than one chunk's logits.

    hidden: [..., H] the full input of the readout on every TP rank (after entering the TP region), any
            float dtype; the matmuls run in it, the softmax in fp32.
    weight: [V_padded / tp, H], this rank's contiguous vocab slice of the readout weight.
    target: [...] token ids in [0, vocab_size) or ignore_index.
    vocab_size: the true vocabulary; columns beyond it are padding, excluded from the softmax (None: none).
    chunk: tokens per chunk; None picks `chunk_tokens`. Every TP rank must use the same.
    Equals F.cross_entropy on the full logits[..., :vocab_size] (mean over non-ignored tokens), values and
    gradients. Gradients are computed in the forward pass only when grad mode is on and an input needs one.
    """
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} disagree: hidden must be "
                         f"target's shape plus a trailing hidden dim")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    vocab_size = check_vocab_size(vocab_size, weight.size(0), group)
    n_tokens = target.numel()
    chunk = chunk or chunk_tokens(n_tokens, weight.size(0), hidden.size(-1))
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # The readout matmul autocast would run in its dtype; inside, the dtypes are explicit (the chunk
        # gradients are written into preallocated buffers, which autocast's casts would not match).
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return _FusedReadoutCrossEntropy.apply(hidden, weight, target, logit_mult, vocab_size, group, ignore_index,
                                               max(1, chunk), with_grad)
