"""Vocab-parallel cross entropy equals F.cross_entropy on the full logits, loss and gradient, and never
communicates anything of vocabulary size: two all-reduces of per-token numbers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from megamu.parallel.cross_entropy import vocab_parallel_cross_entropy
from tp_utils import run_distributed, tensor_parallel_group

BATCH, SEQ, PADDED_VOCAB = 2, 16, 32  # PADDED_VOCAB divides by 2 and 4
TIGHT = dict(rtol=1e-6, atol=1e-6)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(vocab_size: int, ignore_index: int, logit_scale: float):
    """Full padded logits, targets (some ignored), per-token upstream gradient: the same on every rank."""
    logits = torch.randn(BATCH, SEQ, PADDED_VOCAB, generator=_generator(0)) * logit_scale
    target = torch.randint(0, vocab_size, (BATCH, SEQ), generator=_generator(1))
    target[0, :3] = ignore_index
    grad_loss = torch.rand(BATCH, SEQ, generator=_generator(2))
    return logits, target, grad_loss


def _reference(logits, target, grad_loss, vocab_size, ignore_index):
    """Dense F.cross_entropy over the real vocab; its gradient padded with zeros back to PADDED_VOCAB."""
    real = logits[..., :vocab_size].clone().requires_grad_()
    loss = F.cross_entropy(real.flatten(0, 1), target.flatten(), reduction="none",
                           ignore_index=ignore_index).view_as(target)
    (loss * grad_loss).sum().backward()
    return loss.detach(), F.pad(real.grad, (0, PADDED_VOCAB - vocab_size))


def _check_matches_dense(tp: int, vocab_size: int, ignore_index: int, logit_scale: float) -> None:
    group, _ = tensor_parallel_group(tp)
    rank = dist.get_rank(group)
    shard = PADDED_VOCAB // tp
    logits, target, grad_loss = _problem(vocab_size, ignore_index, logit_scale)
    owners = {int(t) // shard for t in target.flatten() if t != ignore_index}
    assert owners == set(range(math.ceil(vocab_size / shard))), "every shard with real tokens must own a target"
    expected_loss, expected_grad = _reference(logits, target, grad_loss, vocab_size, ignore_index)

    local = logits.chunk(tp, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, group, vocab_size=vocab_size, ignore_index=ignore_index)
    (loss * grad_loss).sum().backward()

    assert_close(loss, expected_loss, **TIGHT)
    assert_close(local.grad, expected_grad.chunk(tp, dim=-1)[rank], **TIGHT)


@pytest.mark.parametrize("world, tp", [(2, 2), (4, 4), (4, 2)], ids=["tp2", "tp4", "tp2-in-world4"])
@pytest.mark.parametrize("vocab_size, ignore_index, logit_scale", [
    (32, -100, 1.0),  # no padding
    (27, -100, 1.0),  # padding inside the last shard
    (20, 5, 1.0),  # at TP=4 the last shard is all padding; ignore_index is a real token id
    (27, -100, 1000.0),  # large logits: needs the max subtraction
], ids=["unpadded", "padded", "padding-shard+ignore-real-id", "large-logits"])
def test_matches_dense_cross_entropy(world, tp, vocab_size, ignore_index, logit_scale):
    run_distributed(world, _check_matches_dense, tp, vocab_size, ignore_index, logit_scale)


def _communicated_sizes() -> list[int]:
    """Run the loss with all-reduce recorded and every gather disabled; return the sizes all-reduced."""
    sizes: list[int] = []
    real_all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("vocab-parallel cross entropy must not gather logits")

    patched = {"all_reduce": recording_all_reduce, "all_gather": refuse, "all_gather_into_tensor": refuse,
               "all_gather_single": refuse}
    originals = {name: getattr(dist, name) for name in patched if hasattr(dist, name)}
    try:
        for name in originals:
            setattr(dist, name, patched[name])
        logits, target, _ = _problem(27, -100, 1.0)
        local = logits.chunk(dist.get_world_size(), dim=-1)[dist.get_rank()].clone().requires_grad_()
        vocab_parallel_cross_entropy(local, target, dist.group.WORLD, vocab_size=27).sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return sizes


def test_communicates_per_token_scalars_only():
    sizes = run_distributed(2, _communicated_sizes)[0]
    # The max, then the sum of exponentials and the target logit in one; the backward needs none.
    assert sizes == [BATCH * SEQ, 2 * BATCH * SEQ]


# ---- single process (no group: TP=1) ---------------------------------------------------------

def test_without_group_equals_dense_cross_entropy_in_bf16():
    logits, target, grad_loss = _problem(27, -100, 1.0)
    logits_bf16 = logits.bfloat16().requires_grad_()
    expected_loss, expected_grad = _reference(logits_bf16.detach().float(), target, grad_loss, 27, -100)
    loss = vocab_parallel_cross_entropy(logits_bf16, target, None, vocab_size=27)
    (loss * grad_loss).sum().backward()
    assert loss.dtype == torch.float32 and logits_bf16.grad.dtype == torch.bfloat16
    assert_close(loss, expected_loss, **TIGHT)  # computed in fp32 from the bf16 values
    assert_close(logits_bf16.grad, expected_grad.bfloat16())


def test_padding_gets_no_probability():
    # A zero-initialised readout (μP default) gives equal logits: the loss must be ln(real vocab),
    # whatever padding the TP size added.
    logits = torch.zeros(1, 4, 64, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([[0, 1, 2, 49]]), None, vocab_size=50)
    assert_close(loss, torch.full((1, 4), math.log(50)))
    loss.sum().backward()
    assert torch.count_nonzero(logits.grad[..., 50:]) == 0


def test_ignored_tokens_have_zero_loss_and_gradient():
    logits = torch.randn(1, 3, 8, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([[1, -100, 2]]), None)
    loss.sum().backward()
    assert loss[0, 1] == 0 and loss[0, 0] > 0
    assert torch.count_nonzero(logits.grad[0, 1]) == 0 and torch.count_nonzero(logits.grad[0, 0]) > 0


@pytest.mark.parametrize("logits_shape, target, kwargs, message", [
    ((2, 3, 8), torch.zeros(2, 4, dtype=torch.long), {}, "disagree"),
    ((2, 3, 8), torch.zeros(2, 3), {}, "integer token ids"),
    ((2, 3, 8), torch.zeros(2, 3, dtype=torch.long), {"vocab_size": 9}, r"vocab_size=9 must lie in \[1, 8\]"),
])
def test_bad_input_is_refused_with_the_reason(logits_shape, target, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vocab_parallel_cross_entropy(torch.zeros(logits_shape), target, None, **kwargs)


def test_second_backward_through_the_same_graph_is_refused():
    logits = torch.randn(2, 5, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([0, 3]), None).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can run only once"):
        loss.backward()
