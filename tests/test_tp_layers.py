"""Each tensor-parallel layer at TP=2 equals its dense op, forward and backward, with and without sequence
parallelism (SP): ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, the learned positions,
and the readout with its vocab-parallel loss.

Every rank builds the same global tensors from fixed seeds, computes the dense reference locally, and
compares its own shard. The upstream gradient is one global tensor G: a rank whose output is a shard
(of the features, or of the sequence under SP) receives that shard of G. TP groups are the whole world
of 2 and, in a world of 4, two strided groups ({0, 2}, {1, 3}), so code that confuses the global rank
with the rank in the group fails.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from megamu.parallel.layers import (ColumnParallelLinear, ParallelPositionEmbedding, ParallelReadout,
                                    RowParallelLinear, VocabParallelEmbedding, register_partial_grad_allreduce)
from tp_utils import run_distributed, tensor_parallel_group

BATCH, SEQ, IN, OUT, VOCAB = 2, 6, 8, 12, 20
TIGHT = dict(rtol=1e-5, atol=1e-6)  # fp32; only the summation order differs from the dense op
WORLDS = [2, 4]


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _seq_shard(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return t.chunk(dist.get_world_size(group), dim=1)[dist.get_rank(group)]


def _last_shard(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return t.chunk(dist.get_world_size(group), dim=-1)[dist.get_rank(group)]


def _load(layer: torch.nn.Module, **full: torch.Tensor) -> None:
    """Copy this rank's shard of each full tensor into the layer's parameter of that name."""
    with torch.no_grad():
        for name, tensor in full.items():
            param = getattr(layer, name)
            param.copy_(layer.local_shard(tensor, param))


def _dense_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_()


# ---- column-parallel ---------------------------------------------------------------------------

def _check_column(sp: bool, gather_output: bool) -> None:
    group, index = tensor_parallel_group(2)
    seed = 100 * index
    weight, bias, x, upstream = (_randn(seed, OUT, IN), _randn(seed + 1, OUT), _randn(seed + 2, BATCH, SEQ, IN),
                                 _randn(seed + 3, BATCH, SEQ, OUT))
    layer = ColumnParallelLinear(IN, OUT, bias=True, gather_output=gather_output, group=group, sequence_parallel=sp)
    _load(layer, weight=weight, bias=bias)
    local_x = (_seq_shard(x, group) if sp else x).clone().requires_grad_()
    y = layer(local_x)

    dense_w, dense_b, dense_x = _dense_leaf(weight), _dense_leaf(bias), _dense_leaf(x)
    dense_y = F.linear(dense_x, dense_w, dense_b)
    (dense_y * upstream).sum().backward()

    assert_close(y, dense_y if gather_output else _last_shard(dense_y, group), **TIGHT)
    (y * (upstream if gather_output else _last_shard(upstream, group))).sum().backward()
    assert_close(local_x.grad, _seq_shard(dense_x.grad, group) if sp else dense_x.grad, **TIGHT)
    assert_close(layer.weight.grad, layer.local_shard(dense_w.grad, layer.weight), **TIGHT)
    assert_close(layer.bias.grad, layer.local_shard(dense_b.grad, layer.bias), **TIGHT)
    assert layer.weight.tensor_model_parallel and not layer.weight.needs_tp_grad_allreduce


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("sp, gather_output", [(False, False), (False, True), (True, False)])
def test_column_parallel_linear_equals_dense(world, sp, gather_output):
    run_distributed(world, _check_column, sp, gather_output)


# ---- row-parallel ------------------------------------------------------------------------------

def _check_row(sp: bool, input_is_parallel: bool) -> None:
    group, index = tensor_parallel_group(2)
    seed = 100 * index
    weight, bias, x, upstream = (_randn(seed, OUT, IN), _randn(seed + 1, OUT), _randn(seed + 2, BATCH, SEQ, IN),
                                 _randn(seed + 3, BATCH, SEQ, OUT))
    layer = RowParallelLinear(IN, OUT, bias=True, input_is_parallel=input_is_parallel, group=group,
                              sequence_parallel=sp)
    _load(layer, weight=weight, bias=bias)
    register_partial_grad_allreduce(layer, group)  # under SP the replicated bias sees one sequence shard
    local_x = (_last_shard(x, group) if input_is_parallel else x).clone().requires_grad_()
    y = layer(local_x)

    dense_w, dense_b, dense_x = _dense_leaf(weight), _dense_leaf(bias), _dense_leaf(x)
    dense_y = F.linear(dense_x, dense_w, dense_b)
    (dense_y * upstream).sum().backward()

    assert_close(y, _seq_shard(dense_y, group) if sp else dense_y, **TIGHT)
    (y * (_seq_shard(upstream, group) if sp else upstream)).sum().backward()
    assert_close(local_x.grad, _last_shard(dense_x.grad, group) if input_is_parallel else dense_x.grad, **TIGHT)
    assert_close(layer.weight.grad, layer.local_shard(dense_w.grad, layer.weight), **TIGHT)
    assert_close(layer.bias.grad, dense_b.grad, **TIGHT)
    assert layer.bias.needs_tp_grad_allreduce == sp and not layer.bias.tensor_model_parallel


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("sp, input_is_parallel", [(False, True), (False, False), (True, True)])
def test_row_parallel_linear_equals_dense(world, sp, input_is_parallel):
    run_distributed(world, _check_row, sp, input_is_parallel)


# ---- embeddings --------------------------------------------------------------------------------

def _check_vocab_embedding(sp: bool) -> None:
    group, index = tensor_parallel_group(2)
    seed = 100 * index
    weight, upstream = _randn(seed, VOCAB, IN), _randn(seed + 1, BATCH, SEQ, IN)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed + 2))
    ids[0, :2] = torch.tensor([0, VOCAB - 1])  # both ends of the vocabulary, on different ranks
    layer = VocabParallelEmbedding(VOCAB, IN, group=group, sequence_parallel=sp)
    _load(layer, weight=weight)
    y = layer(ids)

    dense_w = _dense_leaf(weight)
    dense_y = F.embedding(ids, dense_w)
    (dense_y * upstream).sum().backward()

    assert_close(y, _seq_shard(dense_y, group) if sp else dense_y, **TIGHT)
    (y * (_seq_shard(upstream, group) if sp else upstream)).sum().backward()
    assert_close(layer.weight.grad, layer.local_shard(dense_w.grad, layer.weight), **TIGHT)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_vocab_parallel_embedding_equals_dense(world, sp):
    run_distributed(world, _check_vocab_embedding, sp)


def _check_positions(sp: bool) -> None:
    group, index = tensor_parallel_group(2)
    seed = 100 * index
    weight, upstream = _randn(seed, SEQ + 2, IN), _randn(seed + 1, SEQ, IN)
    layer = ParallelPositionEmbedding(SEQ + 2, IN, group=group, sequence_parallel=sp)
    _load(layer, weight=weight)
    rows = layer(SEQ)
    rank_upstream = upstream.chunk(2, dim=0)[dist.get_rank(group)] if sp else upstream
    assert_close(rows, weight[:SEQ].chunk(2, dim=0)[dist.get_rank(group)] if sp else weight[:SEQ], **TIGHT)
    (rows * rank_upstream).sum().backward()
    want = torch.cat([upstream, torch.zeros(2, IN)])  # every rank ends with the full gradient
    assert_close(layer.weight.grad, want, **TIGHT)


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_position_embedding_gives_every_rank_the_full_gradient(sp):
    run_distributed(2, _check_positions, sp)


# ---- readout + vocab-parallel loss -------------------------------------------------------------

def _check_readout_loss(sp: bool) -> None:
    group, index = tensor_parallel_group(2)
    seed = 100 * index
    true_vocab, scale = VOCAB - 3, 0.5  # the last 3 columns are padding
    weight, x = _randn(seed, VOCAB, IN), _randn(seed + 1, BATCH, SEQ, IN)
    labels = torch.randint(0, true_vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed + 2))
    labels[1, -2:] = -100
    layer = ParallelReadout(IN, VOCAB, group=group, sequence_parallel=sp)
    _load(layer, weight=weight)
    local_x = (_seq_shard(x, group) if sp else x).clone().requires_grad_()
    logits = layer(local_x) * scale  # a multiplier on the logits (μP's α_out/m) reaches the loss's gradients
    loss = layer.loss(logits, labels, true_vocab)

    dense_w, dense_x = _dense_leaf(weight), _dense_leaf(x)
    dense_logits = F.linear(dense_x, dense_w) * scale
    dense_loss = F.cross_entropy(dense_logits[..., :true_vocab].reshape(-1, true_vocab), labels.reshape(-1))
    dense_loss.backward()

    assert_close(logits, _last_shard(dense_logits, group), **TIGHT)  # the full sequence, this vocab shard
    assert_close(layer.gather_logits(logits), dense_logits, **TIGHT)
    assert_close(loss, dense_loss, **TIGHT)
    loss.backward()
    assert_close(local_x.grad, _seq_shard(dense_x.grad, group) if sp else dense_x.grad, **TIGHT)
    assert_close(layer.weight.grad, layer.local_shard(dense_w.grad, layer.weight), **TIGHT)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_readout_and_vocab_parallel_loss_equal_dense(world, sp):
    run_distributed(world, _check_readout_loss, sp)


def test_layers_refuse_sizes_the_tp_group_does_not_divide():
    run_distributed(2, _check_indivisible)


def _check_indivisible() -> None:
    group, _ = tensor_parallel_group(2)
    for build in (lambda: ColumnParallelLinear(IN, 7, group=group), lambda: RowParallelLinear(7, OUT, group=group),
                  lambda: VocabParallelEmbedding(7, IN, group=group)):
        with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 2"):
            build()
