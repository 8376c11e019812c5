"""ZeRO 3 builds the model already partitioned (`deepspeed.zero.Init`), and trains like the other stages.

- Under zero.Init each of DP=2 ranks stores about half of every parameter and no whole one, the gathered
  weights equal build_model's unpartitioned μP init bitwise (fp32, and bf16 as the fp32 weights rounded), and
  the layout and μP tags megamu sets on parameters survive; at TP=2 × DP=2 too.
- A ZeRO 3 DP=2 run (`python -m megamu.train`) learns, follows a one-process ZeRO 0 run within the DP
  equivalence tolerance, and resumed from its checkpoint gives the uninterrupted run's losses bitwise.
- The shipped CPU-offload configs (ds_configs/zero2_offload.json, zero3_offload.json) step like that run.
- ZeRO 3 at TP=2 × DP=2 with sequence parallelism gives ZeRO 1's losses and gradient norms.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dist import run_train
from megamu.config import Config, load_config
from test_train_e2e import MAX_STEPS, REL_TOL, assert_close, losses, read_records, write_config
from tp_utils import run_distributed

TAGS = ("partition_dim", "tensor_model_parallel", "needs_tp_grad_allreduce", "mup_role")


def tiny_cfg(*overrides: str) -> Config:
    base = ["model.hidden_size=32", "model.n_layers=2", "model.n_heads=4", "model.seq_len=16",
            "model.vocab_size=512", "model.n_kv_heads=2", "model.qk_norm=true", "mup.base_hidden_size=16",
            "mup.zero_readout=false", "train.seed=11", "train.micro_batch_size=1", "train.global_batch_size=2",
            "train.deepspeed_config=ds_configs/zero3.json"]
    return load_config(None, base + list(overrides))


def _partitioned_init(tp: int, overrides: list[str]) -> tuple[int, int]:
    """On every rank: build through the engine's ZeRO 3 path and check it against build_model; returns
    (elements this rank stores, elements of its TP shard of the model)."""
    from deepspeed.runtime.zero import GatheredParameters

    from megamu.model import build_model
    from megamu.parallel import initialize_parallel
    from megamu.training.ds_config import build_ds_config
    from megamu.training.engine import _build_model

    cfg = tiny_cfg(f"parallel.tensor={tp}", *overrides)
    state = initialize_parallel(tp)
    model = _build_model(cfg, build_ds_config(cfg, state.get_data_parallel_world_size()), state)
    dense = dict(build_model(cfg, state.get_tensor_model_parallel_group()).named_parameters())
    stored = 0
    for name, param in model.named_parameters():
        assert param.numel() == 0, f"{name}: a whole parameter stays materialised ({param.numel()} elements)"
        stored += param.ds_tensor.numel()
        for tag in TAGS:
            assert getattr(param, tag) == getattr(dense[name], tag), f"{name}: {tag} lost under zero.Init"
        with GatheredParameters([param]):
            want = dense[name].detach().to(param.dtype)
            assert torch.equal(param.detach(), want), f"{name}: gathered ZeRO 3 init differs from build_model's"
    return stored, sum(p.numel() for p in dense.values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero_init_stores_half_of_the_model_per_rank_and_gathers_to_build_models_init(dtype):
    for stored, total in run_distributed(2, _partitioned_init, 1, [f"train.dtype={dtype}"]):
        # Each parameter is padded to a multiple of DP: at most one element per parameter more than half.
        assert total / 2 <= stored < total / 2 + 100, (stored, total)


def test_zero_init_under_tensor_parallelism_keeps_the_tp_shards_init():
    """TP=2 × DP=2 with sequence parallelism (so the norms carry needs_tp_grad_allreduce)."""
    for stored, total in run_distributed(4, _partitioned_init, 2, ["parallel.sequence_parallel=true"]):
        assert total / 2 <= stored < total / 2 + 100, (stored, total)


# ---- training through `python -m megamu.train` ----------------------------------------------------------

STOP = 3
OFFLOAD = ("zero2_offload", "zero3_offload")  # the shipped CPU-offload examples
OFFLOAD_STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer, tiny_dataset_prefix) -> dict[str, str]:
    """Run dirs: a one-process ZeRO 0 reference, a ZeRO 3 DP=2 run, one stopped at step STOP and resumed, and
    short DP=2 runs of the offload configs."""
    root = tmp_path_factory.mktemp("zero3")
    config = write_config(str(root / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix, str(root))

    def train(name: str, nprocs: int, ds: str, *overrides: str) -> str:
        run_dir = str(root / name)
        result = run_train(["--config", config, f"train.out_dir={run_dir}", "train.eval_interval=0", *overrides,
                            "--deepspeed_config", f"ds_configs/{ds}.json"], nprocs)
        assert result.ok, f"{name}:\n{result.describe()}"
        return run_dir

    first = {"reference": ("zero0_dp1", 1, "zero0"), "zero3": ("zero3_dp2", 2, "zero3"),
             "resumed": ("zero3_resumed", 2, "zero3", f"train.stop_at_step={STOP}"),
             **{ds: (ds, 2, ds, f"train.stop_at_step={OFFLOAD_STEPS}") for ds in OFFLOAD}}
    with ThreadPoolExecutor(len(first)) as pool:
        futures = {name: pool.submit(train, *spec) for name, spec in first.items()}
        dirs = {name: future.result() for name, future in futures.items()}
    assert max(losses(dirs["resumed"])) == STOP
    train("zero3_resumed", 2, "zero3", "train.resume=true")
    return dirs


def test_zero3_dp2_learns_and_follows_a_one_process_zero0_run(runs):
    got = losses(runs["zero3"])
    assert got[MAX_STEPS] < got[1]
    assert_close(got, losses(runs["reference"]), REL_TOL)


def test_zero3_dp2_resumes_exactly(runs):
    assert losses(runs["resumed"]) == losses(runs["zero3"])  # bitwise, step for step


@pytest.mark.parametrize("ds", OFFLOAD)
def test_cpu_offload_configs_step_like_the_device_run(runs, ds):
    """megamu's torch AdamW steps the offloaded fp32 partitions (`zero_force_ds_cpu_optimizer: false`; DeepSpeed
    otherwise demands its JIT-built DeepSpeedCPUAdam), with the math of the run that keeps them in place."""
    want = {step: loss for step, loss in losses(runs["reference"]).items() if step <= OFFLOAD_STEPS}
    assert_close(losses(runs[ds]), want, REL_TOL)


def test_zero3_under_tensor_and_sequence_parallelism_follows_zero1(tmp_path, tiny_tokenizer, tiny_dataset_prefix):
    """TP=2 × DP=2 with sequence parallelism: the norms' partial-gradient all-reduce over TP (a tensor hook)
    and DeepSpeed's TP-aware gradient norm work on ZeRO 3's partitioned parameters as on ZeRO 1's."""
    config = write_config(str(tmp_path / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix, str(tmp_path))

    def train(ds: str) -> str:
        run_dir = str(tmp_path / ds)
        result = run_train(["--config", config, f"train.out_dir={run_dir}", "train.eval_interval=0",
                            "parallel.tensor=2", "parallel.sequence_parallel=true",
                            "--deepspeed_config", f"ds_configs/{ds}.json"], 4)
        assert result.ok, f"{ds}:\n{result.describe()}"
        return run_dir

    with ThreadPoolExecutor(2) as pool:
        zero1, zero3 = pool.map(train, ["zero1", "zero3"])
    assert_close(losses(zero3), losses(zero1), REL_TOL)
    norms = [{r["step"]: r["grad_norm"] for r in read_records(run, "train")} for run in (zero3, zero1)]
    assert_close(*norms, REL_TOL)


def test_a_zero3_dp2_checkpoint_exports_to_hugging_face_like_the_zero0_run(runs, tmp_path):
    """megamu-export-hf gathers ZeRO 3's partitions through DeepSpeed's zero-to-fp32 conversion: the export of
    the DP=2 run gives the logits of the one-process ZeRO 0 run's export (whose weights it follows)."""
    from transformers import AutoModelForCausalLM

    from megamu.cli.export_hf import main as export_main

    logits = {}
    tokens = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(2))
    for name in ("zero3", "reference"):
        assert export_main([runs[name], str(tmp_path / name)]) == 0
        with torch.no_grad():
            logits[name] = AutoModelForCausalLM.from_pretrained(str(tmp_path / name)).eval()(tokens).logits
    assert (logits["zero3"] - logits["reference"]).abs().max().item() < 1e-4
