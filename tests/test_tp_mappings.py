"""The TP autograd mappings equal the single-process math, forward and backward, at TP=2 and TP=4.

Every rank of a TP group builds the same "global" tensors from fixed seeds (different for each group),
so it can compute the dense reference locally and compare its own shard of the result and gradients.
Layouts: TP over the whole world of 2 or 4 ranks, and two strided TP=2 groups in a world of 4.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from megamu.parallel import mappings
from tp_utils import run_distributed, tensor_parallel_group

BATCH, SEQ, HIDDEN, FFN = 2, 8, 12, 16  # SEQ, HIDDEN and FFN divide by 2 and 4
TIGHT = dict(rtol=1e-6, atol=1e-6)  # fp32; only the summation order differs from the reference


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _setup(tp: int) -> tuple[dist.ProcessGroup, int, int]:
    """This rank's TP group, its rank in it, and a seed base private to the group."""
    group, index = tensor_parallel_group(tp)
    return group, dist.get_rank(group), 1000 * index


def _per_rank_upstream_grads(seed: int, tp: int, *shape: int) -> list[torch.Tensor]:
    return [_randn(seed + 100 + r, *shape) for r in range(tp)]


# ---- one mapping at a time ---------------------------------------------------------------------

def _check_copy_to(tp: int) -> None:
    group, rank, seed = _setup(tp)
    x = _randn(seed, BATCH, SEQ, HIDDEN).requires_grad_()
    y = mappings.copy_to_tp_region(x, group)
    assert torch.equal(y, x)
    upstream = _per_rank_upstream_grads(seed, tp, BATCH, SEQ, HIDDEN)
    (y * upstream[rank]).sum().backward()
    assert_close(x.grad, sum(upstream), **TIGHT)  # each rank's branch contributes its gradient


def _check_reduce_from(tp: int) -> None:
    group, rank, seed = _setup(tp)
    parts = [_randn(seed + r, BATCH, SEQ, HIDDEN) for r in range(tp)]
    x = parts[rank].clone().requires_grad_()
    y = mappings.reduce_from_tp_region(x, group)
    assert_close(y, sum(parts), **TIGHT)
    upstream = _randn(seed + 100, BATCH, SEQ, HIDDEN)  # after the reduction every rank computes the same loss
    (y * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)


def _check_scatter_to(tp: int) -> None:
    group, rank, seed = _setup(tp)
    x = _randn(seed, BATCH, SEQ, HIDDEN).requires_grad_()
    y = mappings.scatter_to_tp_region(x, group)
    assert torch.equal(y, x.detach().chunk(tp, dim=-1)[rank])
    upstream = _per_rank_upstream_grads(seed, tp, BATCH, SEQ, HIDDEN // tp)
    (y * upstream[rank]).sum().backward()
    assert torch.equal(x.grad, torch.cat(upstream, dim=-1))


def _check_gather_from(tp: int) -> None:
    group, rank, seed = _setup(tp)
    full = _randn(seed, BATCH, SEQ, HIDDEN)
    x = full.chunk(tp, dim=-1)[rank].clone().requires_grad_()
    y = mappings.gather_from_tp_region(x, group)
    assert torch.equal(y, full)
    upstream = _randn(seed + 100, BATCH, SEQ, HIDDEN)
    (y * upstream).sum().backward()
    assert torch.equal(x.grad, upstream.chunk(tp, dim=-1)[rank])


def _check_scatter_to_sequence(tp: int) -> None:
    group, rank, seed = _setup(tp)
    x = _randn(seed, BATCH, SEQ, HIDDEN).requires_grad_()
    y = mappings.scatter_to_sequence_parallel_region(x, group)
    assert torch.equal(y, x.detach().chunk(tp, dim=1)[rank])
    upstream = _per_rank_upstream_grads(seed, tp, BATCH, SEQ // tp, HIDDEN)
    (y * upstream[rank]).sum().backward()
    assert torch.equal(x.grad, torch.cat(upstream, dim=1))


def _check_gather_from_sequence_partial_grad(tp: int) -> None:
    group, rank, seed = _setup(tp)
    full = _randn(seed, BATCH, SEQ, HIDDEN)
    x = full.chunk(tp, dim=1)[rank].clone().requires_grad_()
    y = mappings.gather_from_sequence_parallel_region(x, group)
    assert torch.equal(y, full)
    upstream = _per_rank_upstream_grads(seed, tp, BATCH, SEQ, HIDDEN)  # partial sums, as behind a TP layer
    (y * upstream[rank]).sum().backward()
    assert_close(x.grad, sum(upstream).chunk(tp, dim=1)[rank], **TIGHT)


def _check_gather_from_sequence_full_grad(tp: int) -> None:
    group, rank, seed = _setup(tp)
    full = _randn(seed, BATCH, SEQ, HIDDEN)
    x = full.chunk(tp, dim=1)[rank].clone().requires_grad_()
    y = mappings.gather_from_sequence_parallel_region(x, group, grad_is_partial=False)
    assert torch.equal(y, full)
    upstream = _randn(seed + 100, BATCH, SEQ, HIDDEN)  # every rank holds the whole gradient
    (y * upstream).sum().backward()
    assert torch.equal(x.grad, upstream.chunk(tp, dim=1)[rank])


def _check_reduce_scatter_to_sequence(tp: int) -> None:
    group, rank, seed = _setup(tp)
    parts = [_randn(seed + r, BATCH, SEQ, HIDDEN) for r in range(tp)]
    x = parts[rank].clone().requires_grad_()
    y = mappings.reduce_scatter_to_sequence_parallel_region(x, group)
    assert_close(y, sum(parts).chunk(tp, dim=1)[rank], **TIGHT)
    upstream = _per_rank_upstream_grads(seed, tp, BATCH, SEQ // tp, HIDDEN)
    (y * upstream[rank]).sum().backward()
    assert torch.equal(x.grad, torch.cat(upstream, dim=1))


def _check_sequence_first_layout(tp: int) -> None:
    """Megatron's [seq, batch, hidden] layout: gather and reduce-scatter along dim 0."""
    group, rank, seed = _setup(tp)
    full = _randn(seed, SEQ, BATCH, HIDDEN)
    x = full.chunk(tp, dim=0)[rank].clone().requires_grad_()
    y = mappings.gather_from_sequence_parallel_region(x, group, seq_dim=0)
    assert torch.equal(y, full)
    upstream = _per_rank_upstream_grads(seed, tp, SEQ, BATCH, HIDDEN)
    (y * upstream[rank]).sum().backward()
    assert_close(x.grad, sum(upstream).chunk(tp, dim=0)[rank], **TIGHT)

    parts = [_randn(seed + r, SEQ, BATCH, HIDDEN) for r in range(tp)]
    y = mappings.reduce_scatter_to_sequence_parallel_region(parts[rank], group, seq_dim=0)
    assert_close(y, sum(parts).chunk(tp, dim=0)[rank], **TIGHT)


MAPPING_CHECKS = [_check_copy_to, _check_reduce_from, _check_scatter_to, _check_gather_from,
                  _check_scatter_to_sequence, _check_gather_from_sequence_partial_grad,
                  _check_gather_from_sequence_full_grad, _check_reduce_scatter_to_sequence,
                  _check_sequence_first_layout]


# (world size, TP size): TP over the whole world, and strided TP=2 groups inside a world of 4.
LAYOUTS = [(2, 2), (4, 4), (4, 2)]
LAYOUT_IDS = ["tp2", "tp4", "tp2-in-world4"]


@pytest.mark.parametrize("world, tp", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("check", MAPPING_CHECKS, ids=lambda fn: fn.__name__.removeprefix("_check_"))
def test_mapping_matches_single_process_math(check, world, tp):
    run_distributed(world, check, tp)


# ---- the mappings composed as Megatron's MLP: column-parallel then row-parallel ------------------

def _check_tensor_parallel_mlp(tp: int, sequence_parallel: bool) -> None:
    group, rank, seed = _setup(tp)
    x_full, w_in, w_out = _randn(seed, BATCH, SEQ, HIDDEN), _randn(seed + 1, FFN, HIDDEN), _randn(seed + 2, HIDDEN, FFN)
    upstream = _randn(seed + 3, BATCH, SEQ, HIDDEN)

    x_ref, w_in_ref, w_out_ref = (t.clone().requires_grad_() for t in (x_full, w_in, w_out))
    y_ref = F.gelu(x_ref @ w_in_ref.T) @ w_out_ref.T
    (y_ref * upstream).sum().backward()

    # Column-parallel input projection owns output features; row-parallel output projection input features.
    w_in_shard = w_in.chunk(tp, dim=0)[rank].clone().requires_grad_()
    w_out_shard = w_out.chunk(tp, dim=1)[rank].clone().requires_grad_()
    if sequence_parallel:
        x = x_full.chunk(tp, dim=1)[rank].clone().requires_grad_()
        hidden = mappings.gather_from_sequence_parallel_region(x, group)
        y = mappings.reduce_scatter_to_sequence_parallel_region(F.gelu(hidden @ w_in_shard.T) @ w_out_shard.T, group)
        expected_y, upstream, expected_x_grad = (t.chunk(tp, dim=1)[rank] for t in (y_ref, upstream, x_ref.grad))
    else:
        x = x_full.clone().requires_grad_()
        hidden = mappings.copy_to_tp_region(x, group)
        y = mappings.reduce_from_tp_region(F.gelu(hidden @ w_in_shard.T) @ w_out_shard.T, group)
        expected_y, expected_x_grad = y_ref, x_ref.grad
    (y * upstream).sum().backward()

    assert_close(y, expected_y.detach(), rtol=1e-5, atol=1e-5)
    assert_close(x.grad, expected_x_grad, rtol=1e-5, atol=1e-5)
    assert_close(w_in_shard.grad, w_in_ref.grad.chunk(tp, dim=0)[rank], rtol=1e-5, atol=1e-5)
    assert_close(w_out_shard.grad, w_out_ref.grad.chunk(tp, dim=1)[rank], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("world, tp", LAYOUTS, ids=LAYOUT_IDS)
def test_tensor_parallel_mlp_equals_dense_mlp(world, tp, sequence_parallel):
    run_distributed(world, _check_tensor_parallel_mlp, tp, sequence_parallel)


# ---- edge cases ------------------------------------------------------------------------------

def _check_uneven_split_is_refused() -> None:
    group = dist.group.WORLD
    with pytest.raises(ValueError, match="evenly across 2 tensor-parallel ranks"):
        mappings.scatter_to_tp_region(torch.zeros(2, 3), group)
    with pytest.raises(ValueError, match="reduce-scatter dim 1"):
        mappings.reduce_scatter_to_sequence_parallel_region(torch.zeros(2, 3, 4), group)


def test_uneven_split_names_the_shape_and_tp_size():
    run_distributed(2, _check_uneven_split_is_refused)


@pytest.mark.parametrize("mapping", [mappings.copy_to_tp_region, mappings.reduce_from_tp_region,
                                     mappings.scatter_to_tp_region, mappings.gather_from_tp_region,
                                     mappings.scatter_to_sequence_parallel_region,
                                     mappings.gather_from_sequence_parallel_region,
                                     mappings.reduce_scatter_to_sequence_parallel_region],
                         ids=lambda fn: fn.__name__)
def test_no_group_is_the_identity(mapping):
    x = torch.randn(2, 4, 6, requires_grad=True)
    assert mapping(x, None) is x  # TP=1 adds no autograd node and no copy
