"""The tensor-parallel transformer equals the single-process one.

- TP-invariant init (DESIGN.md invariant 1): gathered TP=2 and TP=4 weights equal the TP=1 weights,
  also when the TP size changes the vocabulary padding.
- One forward/backward at TP=2, with and without sequence parallelism, for Llama (GQA, QK-norm),
  GPT-2 (biases, LayerNorm, learned positions) and BERT (bidirectional, replicated MLM transform): same loss, and the gathered gradients equal the TP=1
  gradients (this checks the norms' partial-gradient all-reduce under SP and for QK-norm).
- Merging TP shards gives the TP=1 state dict; dropout in TP regions draws from the per-rank stream;
  config errors for TP sizes that cannot work.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from megamu.checkpoint import merge_tp_shards, rng_state, set_rng_state
from megamu.config import Config, ConfigError, load_config
from megamu.errors import CheckpointError
from megamu.model import build_model, parameter_layout
from megamu.parallel.random import MODEL_PARALLEL_RNG, get_rng_tracker, seed_tensor_parallel_rng
from tp_utils import run_distributed, tensor_parallel_group

TIGHT = dict(rtol=1e-5, atol=1e-6)  # fp32; only summation order differs from TP=1

LLAMA = ["model.n_kv_heads=2", "model.qk_norm=true"]
GPT2 = ["model.arch=gpt2"]
BERT = ["model.arch=bert"]  # bidirectional, with the masked-LM head's replicated transform
# encoder-decoder with cross-attention and relative-position tables split by heads; encoder 14 and decoder 6
# positions from seq_len 16, both even for SP
T5 = ["model.arch=t5", "data.span_noise_density=0.25", "data.span_mean_length=2"]


def tiny_cfg(*overrides: str) -> Config:
    base = ["model.hidden_size=32", "model.n_layers=2", "model.n_heads=4", "model.seq_len=16",
            "model.vocab_size=512", "mup.base_hidden_size=16", "mup.zero_readout=false", "train.seed=11"]
    return load_config(None, base + list(overrides))


def _gathered(tensor: torch.Tensor, dim, group: dist.ProcessGroup) -> torch.Tensor:
    if dim is None:
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


def _tp_model(tp: int, overrides: list[str]) -> tuple[torch.nn.Module, torch.nn.Module, dist.ProcessGroup]:
    """(this rank's TP=tp model, the TP=1 model of the same config, the TP group)."""
    group, _ = tensor_parallel_group(tp)
    dense = build_model(tiny_cfg(*overrides))
    sharded = build_model(tiny_cfg(*overrides, f"parallel.tensor={tp}"), group)
    return sharded, dense, group


# ---- initialisation -------------------------------------------------------------------------------

def _check_init(tp: int, overrides: list[str]) -> None:
    sharded, dense, group = _tp_model(tp, overrides)
    dense_params = dict(dense.named_parameters())
    vocab = dense.vocab_size
    for name, param in sharded.named_parameters():
        full = _gathered(param.detach(), param.partition_dim, group)
        want = dense_params[name].detach()
        if param.mup_role in ("embedding", "readout"):  # the padding rows depend on the TP size
            full, want = full[:vocab], want[:vocab]
        assert torch.equal(full, want), f"{name}: gathered TP={tp} init differs from TP=1"


@pytest.mark.parametrize("tp", [2, 4])
def test_gathered_init_equals_tp1(tp):
    run_distributed(4, _check_init, tp, LLAMA)


def test_gathered_init_equals_tp1_when_vocab_padding_differs():
    # vocab 300: padded to 384 at TP=1 but 512 at TP=2 (multiple of 128·TP); the real rows still agree.
    run_distributed(4, _check_init, 2, GPT2 + ["model.vocab_size=300"])


# ---- one training step ----------------------------------------------------------------------------

def _inputs_and_labels(vocab: int, t5: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random next-token inputs and labels, or for t5 (encoder ids, decoder ids) inputs and decoder labels."""
    generator = torch.Generator().manual_seed(5)
    if t5:
        inputs = torch.randint(0, vocab, (2, 2, 16), generator=generator)
        labels = torch.randint(0, vocab, (2, 16), generator=generator)
    else:
        tokens = torch.randint(0, vocab, (2, 17), generator=generator)
        inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[0, :3] = -100  # ignored positions must not count
    return inputs, labels


def _check_step(overrides: list[str]) -> None:
    sharded, dense, group = _tp_model(2, overrides)
    inputs, labels = _inputs_and_labels(dense.vocab_size, "model.arch=t5" in overrides)
    loss = sharded(inputs, labels=labels)
    want = dense(inputs, labels=labels)
    assert_close(loss, want, **TIGHT)
    loss.backward()
    want.backward()
    dense_params = dict(dense.named_parameters())
    for name, param in sharded.named_parameters():
        grad = _gathered(param.grad, param.partition_dim, group)
        assert_close(grad, dense_params[name].grad, **TIGHT, msg=lambda m: f"{name}: {m}")
    assert_close(sharded(inputs), dense(inputs), **TIGHT)  # gathered logits


@pytest.mark.parametrize("arch", [LLAMA, GPT2, BERT, T5, T5 + ["model.positions=rotary", "model.n_kv_heads=2"]],
                         ids=["llama-gqa-qknorm", "gpt2", "bert", "t5", "t5-rotary-gqa"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_tp2_loss_and_gradients_equal_tp1(arch, sp):
    run_distributed(2, _check_step, arch + [f"parallel.sequence_parallel={str(sp).lower()}"])


def _partial_grad_params(overrides: list[str]) -> list[str]:
    sharded, _, _ = _tp_model(2, overrides)
    return sorted(name for name, p in sharded.named_parameters() if p.needs_tp_grad_allreduce)


def test_sequence_parallel_tags_exactly_the_replicated_params_that_see_a_shard():
    no_sp, with_sp = run_distributed(2, _partial_grad_params, LLAMA)[0], \
        run_distributed(2, _partial_grad_params, LLAMA + ["parallel.sequence_parallel=true"])[0]
    assert all(".q_norm." in n or ".k_norm." in n for n in no_sp) and no_sp  # heads are split under TP
    assert set(with_sp) - set(no_sp) == {"layers.1.attn_norm.weight", "layers.1.mlp_norm.weight",
                                         "layers.2.attn_norm.weight", "layers.2.mlp_norm.weight",
                                         "layers.3.weight"}


# ---- checkpoint merge -----------------------------------------------------------------------------

def _state_dict(overrides: list[str]) -> dict[str, torch.Tensor]:
    sharded, _, _ = _tp_model(2, overrides)
    return {k: v.clone() for k, v in sharded.state_dict().items()}


def test_merged_tp2_shards_equal_the_tp1_state_dict():
    shards = run_distributed(2, _state_dict, LLAMA)
    cfg = tiny_cfg(*LLAMA, "parallel.tensor=2")
    merged = merge_tp_shards(shards, {name: dim for name, (dim, _) in parameter_layout(cfg).items()})
    dense = build_model(tiny_cfg(*LLAMA)).state_dict()
    assert merged.keys() == dense.keys()
    for name, tensor in dense.items():
        assert torch.equal(merged[name], tensor), name


def test_merge_refuses_inconsistent_replicas_and_wrong_names():
    shard = {"norm": torch.ones(3), "w": torch.zeros(2, 3)}
    other = {"norm": torch.full((3,), 2.0), "w": torch.zeros(2, 3)}
    with pytest.raises(CheckpointError, match="differs between TP rank 0 and TP rank 1"):
        merge_tp_shards([shard, other], {"norm": None, "w": 0})
    with pytest.raises(CheckpointError, match="missing \\['extra'\\]"):
        merge_tp_shards([shard], {"norm": None, "w": 0, "extra": None})


# ---- dropout RNG ----------------------------------------------------------------------------------

def _attention_dropout_uses_rank_stream() -> list[bool]:
    group, _ = tensor_parallel_group(2)
    seed_tensor_parallel_rng(3, group)
    model = build_model(tiny_cfg("model.dropout=0.5", "parallel.tensor=2"), group)
    attention = model.layers[1].attn
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    advanced = []
    for training in (False, True):
        attention.train(training)
        before = get_rng_tracker().get_states()[MODEL_PARALLEL_RNG]
        attention(x)
        advanced.append(not torch.equal(before, get_rng_tracker().get_states()[MODEL_PARALLEL_RNG]))
    return advanced


def test_attention_dropout_draws_from_the_tp_rank_stream_only_in_training():
    assert run_distributed(2, _attention_dropout_uses_rank_stream) == [[False, True], [False, True]]


def test_checkpoint_rng_state_restores_the_tp_stream():
    seed_tensor_parallel_rng(3, None)
    saved = rng_state()
    with get_rng_tracker().fork():
        first = torch.rand(4)
    set_rng_state(saved)
    with get_rng_tracker().fork():
        assert torch.equal(torch.rand(4), first)


# ---- config errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tensor=3", "model.n_heads=4"], None, "does not divide model.n_heads=4"),
    (["parallel.tensor=4", "model.n_heads=8", "model.n_kv_heads=2", "model.hidden_size=64"], None,
     "does not divide the kv heads"),
    (["parallel.tensor=2"], 3, "world size 3 is not divisible by parallel.tensor × parallel.pipeline = 2"),
    (["parallel.tensor=2", "parallel.pipeline=2"], 6, "world size 6 is not divisible by parallel.tensor × "
                                                        "parallel.pipeline = 4"),
])
def test_config_errors_for_tp_sizes_that_cannot_work(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(*overrides).validate(world, check_files=False)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_padded_vocab_divides_by_the_multiple_times_tp(tp):
    cfg = tiny_cfg("model.vocab_size=1000", f"parallel.tensor={tp}")
    padded = cfg.padded_vocab_size()
    assert padded % (128 * tp) == 0 and 1000 <= padded < 1000 + 128 * tp


def test_build_model_refuses_a_group_of_the_wrong_size():
    with pytest.raises(ConfigError, match="parallel.tensor=2 but the tensor-parallel group"):
        build_model(tiny_cfg("parallel.tensor=2"))
