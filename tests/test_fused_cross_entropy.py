"""The fused readout + cross entropy equals the readout's matmul followed by F.cross_entropy.

- Values and gradients (hidden and readout weight) in fp32 (tight) and bf16 (loose), with ignored labels, a
  logit multiplier ≠ 1, a padded vocabulary, chunks that do not divide the tokens, and the chunk rule.
- TP=2, with and without sequence parallelism, equals the single-process plain loss (gathered gradients).
- Memory: no operation of the fused forward + backward outputs a [tokens, vocab] tensor (the plain path
  does, so the check can fail), and under no_grad it computes no gradient.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megamu.parallel.fused_cross_entropy import MIN_CHUNK_TOKENS, chunk_tokens, fused_readout_cross_entropy
from megamu.parallel.layers import ParallelReadout
from tp_utils import run_distributed, tensor_parallel_group

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH, SEQ, HIDDEN, PADDED_VOCAB = 2, 15, 16, 64  # 30 tokens
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def _problem(vocab: int, ignore_index: int = -100, dtype: torch.dtype = torch.float32, seq: int = SEQ):
    """Hidden states, a readout weight whose padded rows would dominate any softmax they took part in, and
    targets with ignored positions: the same on every rank."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, seq, HIDDEN, generator=generator)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=generator) * 0.5
    weight[vocab:] = 10.0
    target = torch.randint(0, vocab, (BATCH, seq), generator=generator)
    target[0, :4] = ignore_index
    return hidden.to(dtype), weight.to(dtype), target


def _plain(hidden, weight, target, vocab: int, logit_mult: float, ignore_index: int = -100):
    """Loss and gradients of the unfused readout: full logits, then F.cross_entropy over the real vocab."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = F.linear(hidden, weight) * logit_mult
    loss = F.cross_entropy(logits[..., :vocab].float().flatten(0, 1), target.flatten(), ignore_index=ignore_index)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _fused(hidden, weight, target, vocab: int, logit_mult: float, group=None, ignore_index: int = -100, **kwargs):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_readout_cross_entropy(hidden, weight, target, group, logit_mult=logit_mult, vocab_size=vocab,
                                       ignore_index=ignore_index, **kwargs)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


CASES = {  # name: (vocab, logit_mult, ignore_index, chunk)
    "one-chunk": (64, 1.0, -100, None),
    "uneven-chunks": (64, 1.0, -100, 7),
    "logit-mult": (64, 0.25, -100, 4),
    "padded-vocab": (50, 1.0, -100, 8),
    "ignore-a-real-id+mult+padding": (50, 3.0, 5, 11),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_fused_equals_plain_loss_and_gradients(case, dtype):
    vocab, logit_mult, ignore_index, chunk = CASES[case]
    hidden, weight, target = _problem(vocab, ignore_index, dtype)
    want = _plain(hidden, weight, target, vocab, logit_mult, ignore_index)
    got = _fused(hidden, weight, target, vocab, logit_mult, ignore_index=ignore_index, chunk=chunk)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    for name, g, w in zip(("loss", "d_hidden", "d_weight"), got, want):
        assert_close(g, w, **TOLERANCE[dtype], msg=lambda m: f"{name}: {m}")
    assert torch.count_nonzero(got[2][vocab:]) == 0, "padded rows must get no gradient"


def test_under_autocast_it_equals_the_plain_loss_autocast_computes():
    # fp32 inputs, bf16 autocast: the readout matmul runs in bf16 as autocast's F.linear would.
    hidden, weight, target = _problem(50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _plain(hidden, weight, target, 50, 1.0)
        got = _fused(hidden, weight, target, 50, 1.0, chunk=8)
    assert got[1].dtype == got[2].dtype == torch.float32
    for g, w in zip(got, want):
        assert_close(g, w, **TOLERANCE[torch.bfloat16])


def test_all_ignored_gives_zero_loss_and_gradients():
    hidden, weight, target = _problem(64)
    loss, d_hidden, d_weight = _fused(hidden, weight, torch.full_like(target, -100), 64, 1.0, chunk=8)
    assert loss == 0 and torch.count_nonzero(d_hidden) == 0 and torch.count_nonzero(d_weight) == 0


def test_the_upstream_gradient_scales_both_gradients():
    hidden, weight, target = _problem(64)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (fused_readout_cross_entropy(h, w, target, None, chunk=8) * 3.0).backward()
    _, want_h, want_w = _plain(hidden, weight, target, 64, 1.0)
    assert_close(h.grad, 3.0 * want_h, **TOLERANCE[torch.float32])
    assert_close(w.grad, 3.0 * want_w, **TOLERANCE[torch.float32])


def test_chunk_rule():
    # ceil(V/H) chunks so that a chunk's logits are about the size of the hidden states, with a floor.
    assert chunk_tokens(65536, shard=32768, hidden=2048) == 4096  # 16 chunks
    assert chunk_tokens(8192, shard=128256, hidden=4096) == MIN_CHUNK_TOKENS  # 32 chunks would be 256 tokens
    assert chunk_tokens(100, shard=32768, hidden=256) == 100  # fewer tokens than the floor: one chunk


# ---- tensor parallelism ---------------------------------------------------------------------------

def _tp2_fused(sequence_parallel: bool, vocab: int, logit_mult: float, chunk) -> None:
    group, _ = tensor_parallel_group(2)
    rank = dist.get_rank(group)
    hidden, weight, target = _problem(vocab, seq=16)  # the sequence splits in two under SP
    want_loss, want_hidden, want_weight = _plain(hidden, weight, target, vocab, logit_mult)

    readout = ParallelReadout(HIDDEN, PADDED_VOCAB, group=group, sequence_parallel=sequence_parallel)
    with torch.no_grad():
        readout.weight.copy_(weight.chunk(2)[rank])
    local = (hidden.chunk(2, dim=1)[rank] if sequence_parallel else hidden).clone().requires_grad_()
    loss = fused_readout_cross_entropy(readout._enter_region(local), readout.weight, target, group,
                                       logit_mult=logit_mult, vocab_size=vocab, chunk=chunk)
    loss.backward()
    assert_close(loss, want_loss, **TOLERANCE[torch.float32])
    assert_close(readout.weight.grad, want_weight.chunk(2)[rank], **TOLERANCE[torch.float32])
    expected_hidden = want_hidden.chunk(2, dim=1)[rank] if sequence_parallel else want_hidden
    assert_close(local.grad, expected_hidden, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2+sp"])
@pytest.mark.parametrize("vocab, logit_mult, chunk", [(64, 1.0, None), (20, 0.5, 5)],
                         ids=["unpadded", "padding-shard+mult+chunks"])  # vocab 20: rank 1 holds only padding
def test_tp2_fused_equals_tp1_plain(sp, vocab, logit_mult, chunk):
    run_distributed(2, _tp2_fused, sp, vocab, logit_mult, chunk)


# ---- memory and work --------------------------------------------------------------------------------

class _OpOutputs(TorchDispatchMode):
    """Records (op, number of elements) of every tensor an aten op returns, backward included."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs += [(str(func), t.numel()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _record(loss_fn, hidden, weight, target, backward: bool = True) -> list[tuple[str, int]]:
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _OpOutputs() as recorder:
        loss = loss_fn(hidden, weight, target)
        if backward:
            loss.backward()
    return recorder.outputs


def _plain_loss(hidden, weight, target):
    return F.cross_entropy(F.linear(hidden, weight).float(), target)


def _fused_loss(hidden, weight, target):
    return fused_readout_cross_entropy(hidden, weight, target, None)


def test_fused_forward_and_backward_never_hold_the_full_logits():
    tokens, vocab = 4 * MIN_CHUNK_TOKENS, 2048  # the rule gives four chunks of MIN_CHUNK_TOKENS
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(tokens, 32, generator=generator), torch.randn(vocab, 32, generator=generator)
    target = torch.randint(0, vocab, (tokens,), generator=generator)
    largest = {name: max(n for _, n in _record(fn, hidden, weight, target))
               for name, fn in (("plain", _plain_loss), ("fused", _fused_loss))}
    assert largest["plain"] >= tokens * vocab, "the recorder must see the plain path's full logits"
    assert largest["fused"] <= MIN_CHUNK_TOKENS * vocab, largest


def test_no_gradient_work_without_grad_mode():
    hidden, weight, target = _problem(64)
    matmuls = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            ops = _record(lambda h, w, t: fused_readout_cross_entropy(h, w, t, None, chunk=8), hidden, weight,
                          target, backward=grad)
        matmuls[grad] = sum(1 for op, _ in ops if op.startswith("aten.mm") or op.startswith("aten.addmm"))
    n_chunks = math.ceil(BATCH * SEQ / 8)
    assert matmuls == {True: 3 * n_chunks, False: n_chunks}, matmuls  # logits; + d_hidden, d_weight per chunk
