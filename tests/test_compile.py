"""Regional compilation (`train.compile`): every transformer block compiled in place.

- torch._dynamo.explain on one block finds one graph and no graph break: Llama (GQA, QK-norm, RoPE) and
  GPT-2, activation checkpointing none and selective, dropout on (TP=1).
- `compile_blocks` compiles every block of a model and keeps its parameter names.
- Through the real trainer, compiled training losses and gradient norms equal eager ones to a relative 1e-4
  over 4 steps (fp32 on CPU; inductor fuses kernels and reorders float sums, so not bitwise).
Compiling is slow on a small CPU: the two trainer runs compile one shared block graph each, concurrently.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch._dynamo

from dist import run_train
from megamu.config import load_config
from megamu.model import build_model
from megamu.model.layers import Block
from megamu.model.transformer import compile_blocks
from test_train_e2e import read_records, write_config

STEPS = 4
REL_TOL = 1e-4
ARCHS = {"llama": ["model.n_kv_heads=2", "model.qk_norm=true"], "gpt2": ["model.arch=gpt2"]}


def tiny_cfg(*overrides: str):
    base = ["model.vocab_size=100", "model.hidden_size=64", "model.n_heads=4", "model.n_layers=2",
            "model.seq_len=16", "mup.base_hidden_size=32", "model.dropout=0.1"]
    return load_config(None, base + list(overrides))


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_block_compiles_to_one_graph_without_breaks(arch, checkpointing, one_torch_thread):
    block = build_model(tiny_cfg(*ARCHS[arch], f"train.activation_checkpointing={checkpointing}")).layers[1]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(torch.randn(2, 16, 64, requires_grad=True))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_compile_blocks_compiles_every_block_in_place_and_keeps_names():
    model = build_model(tiny_cfg())
    names = [name for name, _ in model.named_parameters()]
    assert compile_blocks(model) == 2  # lazy: nothing is compiled before the first call
    assert [name for name, _ in model.named_parameters()] == names
    assert all(module._compiled_call_impl is not None for module in model.modules() if isinstance(module, Block))
    assert model.layers[0]._compiled_call_impl is None  # only the blocks


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory, tiny_tokenizer, tiny_dataset_prefix) -> dict[bool, list[tuple]]:
    root = tmp_path_factory.mktemp("compile")
    config = write_config(str(root / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix, str(root / "runs"))

    def train(compiled: bool):
        out = root / f"compile-{compiled}"
        result = run_train(["--config", config, f"train.out_dir={out}", f"train.max_steps={STEPS}",
                            "train.eval_interval=0", "model.n_kv_heads=2", "train.activation_checkpointing=selective",
                            f"train.compile={str(compiled).lower()}", "--deepspeed_config", "ds_configs/zero1.json"],
                           timeout=600)
        assert result.ok, result.describe()
        return [(r["step"], r["loss"], r["grad_norm"]) for r in read_records(str(out), "train")]

    with ThreadPoolExecutor(2) as pool:
        return dict(zip((False, True), pool.map(train, (False, True))))


def test_compiled_training_matches_eager(trajectories):
    eager, compiled = trajectories[False], trajectories[True]
    assert [step for step, _, _ in compiled] == list(range(1, STEPS + 1))
    for (step, loss, norm), (_, want_loss, want_norm) in zip(compiled, eager):
        assert math.isclose(loss, want_loss, rel_tol=REL_TOL), (step, loss, want_loss)
        assert math.isclose(norm, want_norm, rel_tol=REL_TOL), (step, norm, want_norm)
    assert eager[-1][1] < eager[0][1]  # it trains: the comparison is not between two idle runs
