"""Activation checkpointing (`train.activation_checkpointing`) changes memory, never results.

With dropout on, `selective` and `full` give the losses and gradients of `none` bitwise, and leave the
default generator and the TP tracker's per-rank stream where `none` leaves them: at TP=1 (Llama with GQA
and QK-norm, GPT-2), at TP=2 with sequence parallelism (where dropout draws from the per-rank stream, which
torch's checkpoint alone would not replay: the test shows that it then fails), and through the real
trainer on two processes at TP=2 + SP and at PP=2 (whose stages are built from the same
blocks). Each mode keeps fewer bytes for backward than the one before it.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.utils.checkpoint

from dist import run_train
from megamu.config import Config, ConfigError, load_config
from megamu.model import build_model
from megamu.parallel.random import get_rng_tracker, seed_tensor_parallel_rng
from test_train_e2e import read_records, write_config
from tp_utils import run_distributed, tensor_parallel_group

MODES = ("none", "selective", "full")
LLAMA = ["model.n_kv_heads=2", "model.qk_norm=true"]
GPT2 = ["model.arch=gpt2"]


def tiny_cfg(mode: str, *overrides: str) -> Config:
    base = ["model.hidden_size=32", "model.n_layers=2", "model.n_heads=4", "model.seq_len=16",
            "model.vocab_size=512", "mup.base_hidden_size=16", "mup.zero_readout=false", "model.dropout=0.3",
            "train.seed=11", f"train.activation_checkpointing={mode}"]
    return load_config(None, base + list(overrides))


def _saved_bytes_hook(model: torch.nn.Module, counter: dict[int, int]) -> torch.autograd.graph.saved_tensors_hooks:
    """Records every activation storage autograd keeps for backward (parameters excluded) into `counter`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            counter[storage.data_ptr()] = storage.nbytes()
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def _train_step(mode: str, overrides: list[str], group=None) -> dict:
    """One forward/backward with dropout; the loss, gradients, bytes kept for backward and the next draws."""
    seed_tensor_parallel_rng(3, group)
    model = build_model(tiny_cfg(mode, *overrides), group)
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(5))
    saved: dict[int, int] = {}
    with _saved_bytes_hook(model, saved):
        loss = model(tokens[:, :-1], labels=tokens[:, 1:])
    loss.backward()
    with get_rng_tracker().fork():
        rank_stream = torch.rand(4)
    return {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "saved_bytes": sum(saved.values()), "next_draws": torch.cat([torch.rand(4), rank_stream])}


def _assert_same_step(got: dict, want: dict, what: str) -> None:
    assert torch.equal(got["loss"], want["loss"]), (what, got["loss"], want["loss"])
    for name, grad in want["grads"].items():
        assert torch.equal(got["grads"][name], grad), f"{what}: gradient of {name} differs"
    assert torch.equal(got["next_draws"], want["next_draws"]), f"{what}: the RNG streams moved differently"


@pytest.mark.parametrize("arch", [LLAMA, GPT2], ids=["llama-gqa-qknorm", "gpt2"])
def test_tp1_modes_give_bitwise_equal_losses_gradients_and_rng_with_dropout(arch, one_torch_thread):
    steps = {mode: _train_step(mode, arch) for mode in MODES}
    for mode in ("selective", "full"):
        _assert_same_step(steps[mode], steps["none"], mode)
    saved = [steps[mode]["saved_bytes"] for mode in MODES]
    assert saved[0] > saved[1] > saved[2], dict(zip(MODES, saved))


def _tp2_steps(overrides: list[str]) -> dict:
    group, _ = tensor_parallel_group(2)
    steps = {mode: _train_step(mode, overrides, group) for mode in MODES}
    # torch's checkpoint without the tracker's replay: recomputed TP-region dropout draws other masks.
    tracker = get_rng_tracker()
    tracker.replay_contexts = torch.utils.checkpoint.noop_context_fn
    try:
        steps["full-without-replay"] = _train_step("full", overrides, group)
    finally:
        del tracker.replay_contexts
    return steps


def test_tp2_sequence_parallel_modes_replay_the_rank_stream():
    overrides = LLAMA + ["parallel.tensor=2", "parallel.sequence_parallel=true"]
    for rank, steps in enumerate(run_distributed(2, _tp2_steps, overrides)):
        for mode in ("selective", "full"):
            _assert_same_step(steps[mode], steps["none"], f"rank {rank} {mode}")
        unreplayed = steps["full-without-replay"]
        assert not all(torch.equal(unreplayed["grads"][n], g) for n, g in steps["none"]["grads"].items()), \
            "the test cannot tell a missing tracker replay"


@pytest.mark.parametrize("overrides, message", [
    (["train.activation_checkpointing=partial"],
     "train.activation_checkpointing must be 'none', 'selective' or 'full', got 'partial'"),
    (["train.activation_checkpointing=full", "train.compile=true", "parallel.tensor=2"],
     "train.compile=true with train.activation_checkpointing=full cannot replay the per-TP-rank dropout stream"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg("none", *overrides).validate(check_files=False)


# ---- through the trainer ---------------------------------------------------------------------------

LAYOUTS = {  # name: (overrides, modes), each on two ranks
    "tp2-sp": (["parallel.tensor=2", "parallel.sequence_parallel=true"], MODES),
    "pp2": (["parallel.pipeline=2"], ("none", "full")),
}
TRAIN = ["model.dropout=0.1", "train.max_steps=5", "train.eval_interval=0"]


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory, tiny_tokenizer, tiny_dataset_prefix) -> dict[tuple[str, str], list]:
    """(layout, mode) → [(step, loss, grad norm)] of a real two-rank run; all runs at once, since start-up
    (imports) dominates and overlaps well."""
    root = tmp_path_factory.mktemp("activation_checkpointing")
    config = write_config(str(root / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix, str(root / "runs"))
    runs = [(layout, mode) for layout, (_, modes) in LAYOUTS.items() for mode in modes]

    def train(run: tuple[str, str]):
        layout, mode = run
        return run_train(["--config", config, f"train.out_dir={root / layout / mode}", *TRAIN, *LAYOUTS[layout][0],
                          f"train.activation_checkpointing={mode}", "--deepspeed_config", "ds_configs/zero1.json"], 2)

    with ThreadPoolExecutor(len(runs)) as pool:
        results = dict(zip(runs, pool.map(train, runs)))
    found = {}
    for (layout, mode), result in results.items():
        assert result.ok, f"{layout} {mode}:\n{result.describe()}"
        found[layout, mode] = [(r["step"], r["loss"], r["grad_norm"])
                               for r in read_records(str(root / layout / mode), "train")]
    return found


@pytest.mark.parametrize("layout", LAYOUTS)
def test_trainer_on_two_ranks_gives_the_same_losses_with_each_mode(layout, trajectories):
    reference = trajectories[layout, "none"]
    assert [step for step, _, _ in reference] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(loss) for _, loss, _ in reference)
    for mode in LAYOUTS[layout][1][1:]:
        assert trajectories[layout, mode] == reference, mode  # bitwise: the same dropout masks and arithmetic
