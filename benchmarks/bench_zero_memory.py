"""Per-rank memory of the model and optimizer state under ZeRO 1, 2 and 3 with DP=2: measured against the
ZeRO paper's formulas, adapted to what megamu runs.

    python benchmarks/bench_zero_memory.py [--hidden 384] [--layers 8] [--vocab 8192]
    python benchmarks/bench_zero_memory.py --smoke        # a ~0.7M-parameter model, ~20 s per stage

The ZeRO paper (Rajbhandari et al. 2020, §3-5) counts, for Ψ parameters, N_d data-parallel ranks and mixed
precision Adam, 2Ψ fp16 weights + 2Ψ fp16 gradients + KΨ optimizer state (K = 12: fp32 master weights,
momentum and variance), of which ZeRO 1 partitions the K term, ZeRO 2 also the gradients and ZeRO 3 all three.
megamu trains in bf16 on GPUs (run here by DeepSpeed's CPU accelerator) with bf16 weights, but accumulates
gradients in fp32 (`data_types.grad_accum_dtype`, training/ds_config.py); at ZeRO 1 DeepSpeed's BF16_Optimizer
keeps the bf16 `.grad`s as well as the whole fp32 gradient buffer until the update. Adapted:

    ZeRO 1:  2Ψ + (2 + 4)Ψ + 12Ψ/N_d      ZeRO 2:  2Ψ + (4 + 12)Ψ/N_d      ZeRO 3:  (2 + 4 + 12)Ψ/N_d + 4G/N_d

where G is the largest μP param group (the hidden matrices): ZeRO 3 steps one sub-group at a time and flattens
that sub-group's fp32 gradient partition into a fresh tensor first (DeepSpeed's stage3.py,
`_prepare_fp32_grad_for_sub_group`; a sub-group is a param group cut at `sub_group_size`, 1e9 elements).

Measured: each rank builds the real engine (megamu.training.engine.build_engine with the shipped
ds_configs/zero{1,2,3}.json) and takes two steps; just before each call of the inner optimizer's step
(gradient partitions, master weights and Adam's moments all alive: "at update", what the formula counts) and
just before the gradients' DP reduction ("peak": ZeRO 2/3 then also hold not yet reduced bf16 gradients and
gathered parameters), it sums the storage of every tensor the engine's module and its optimizer wrappers hold:
parameters, `.grad`s, ZeRO's partitions (`ds_tensor`, flat fp32 groups), Adam's `exp_avg`/`exp_avg_sq` and the
communication buckets, each storage counted once (by its data pointer). Bucket sizes are set to the model's
h² elements (what Hugging Face's "auto" picks): the shipped 5e7 are sized for GPU models and would dwarf this
one. Activations are not counted.
"""
from __future__ import annotations

import argparse
import os
import socket
from typing import Any, Callable, Iterator

import torch
from torch import nn

STAGES = (1, 2, 3)
DP = 2
WEIGHT_BYTES = 2  # bf16
GRAD_BYTES = 4  # fp32 gradient accumulation
ADAM_BYTES = 12  # fp32 master weights, exp_avg, exp_avg_sq
# How deep to follow DeepSpeed objects' attributes from the optimizer wrapper (its groups, buckets, offload).
MAX_DEPTH = 8


def formula_bytes(stage: int, params: int, largest_group: int, dp: int = DP) -> float:
    """The adapted ZeRO formula (module docstring) for one rank."""
    w = WEIGHT_BYTES
    if stage == 1:
        return w * params + (w + GRAD_BYTES) * params + ADAM_BYTES * params / dp
    if stage == 2:
        return w * params + (GRAD_BYTES + ADAM_BYTES) * params / dp
    return (w + GRAD_BYTES + ADAM_BYTES) * params / dp + GRAD_BYTES * largest_group / dp


def model_overrides(args: argparse.Namespace) -> list[str]:
    """megamu config overrides of the measured model and a one-micro-batch-per-rank bf16 run."""
    hidden, layers, vocab = (128, 2, 1024) if args.smoke else (args.hidden, args.layers, args.vocab)
    return [f"model.hidden_size={hidden}", f"model.n_layers={layers}", f"model.n_heads={hidden // 64}",
            f"model.vocab_size={vocab}", "model.seq_len=32", "mup.zero_readout=false",
            "train.dtype=bf16", "train.micro_batch_size=1", f"train.global_batch_size={DP}",
            "train.max_steps=2", "train.warmup_steps=1"]


# ---- measuring ---------------------------------------------------------------------------------------------

def _children(obj: Any) -> list[Any]:
    """What `obj` holds: a tensor its `.grad` and ZeRO 3 partition, a container its items, one of DeepSpeed's
    (or torch.optim's) objects its attributes; modules are left to `held_bytes`, which walks the parameters."""
    if isinstance(obj, torch.Tensor):
        return [obj.grad if obj.is_leaf else None, getattr(obj, "ds_tensor", None)]
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, (list, tuple, set)):
        return list(obj)
    if isinstance(obj, nn.Module) or not hasattr(obj, "__dict__"):
        return []
    return list(vars(obj).values()) if type(obj).__module__.startswith(("deepspeed", "torch.optim")) else []


def _reachable_tensors(root: Any) -> Iterator[torch.Tensor]:
    """Every tensor reachable from `root` within MAX_DEPTH steps, breadth first, so that the depth limit cuts
    only long paths (a fp32 partition is reached through the wrapper before through its inner optimizer)."""
    seen, frontier = {id(root)}, [root]
    for _ in range(MAX_DEPTH + 1):
        next_frontier = []
        for obj in frontier:
            if isinstance(obj, torch.Tensor):
                yield obj
            for child in _children(obj):
                if child is not None and id(child) not in seen:
                    seen.add(id(child))
                    next_frontier.append(child)
        frontier = next_frontier


def held_bytes(engine: Any) -> int:
    """Bytes of every distinct storage the engine's parameters and optimizer hold."""
    storages: dict[int, int] = {}
    for tensor in _reachable_tensors([list(engine.module.parameters()), engine.optimizer]):
        storage = tensor.untyped_storage()
        if storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _measuring(call: Callable, engine: Any, measured: list[int]) -> Callable:
    """`call`, also recording in `measured` what the engine holds just before it runs."""
    def wrapped(*args, **kwargs):
        measured.append(held_bytes(engine))
        return call(*args, **kwargs)
    return wrapped


def _measure_rank(rank: int, port: int, stage: int, args: argparse.Namespace, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(DP), LOCAL_WORLD_SIZE=str(DP))
    torch.set_num_threads(1)
    from megamu.config import load_config
    from megamu.model.mup import param_groups
    from megamu.parallel import initialize_parallel
    from megamu.training.ds_config import build_ds_config
    from megamu.training.engine import build_engine, innermost_optimizer

    cfg = load_config(None, model_overrides(args) + [f"train.deepspeed_config=ds_configs/zero{stage}.json"])
    state = initialize_parallel()
    ds = build_ds_config(cfg, DP)
    bucket = cfg.model.hidden_size ** 2
    ds["zero_optimization"].update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if stage == 3:
        ds["zero_optimization"]["stage3_prefetch_bucket_size"] = bucket
    optimizer_step = build_engine(cfg, ds, state)
    engine = optimizer_step.engine
    inner = innermost_optimizer(engine.optimizer)
    at_reduction: list[int] = []
    at_update: list[int] = []
    engine.allreduce_gradients = _measuring(engine.allreduce_gradients, engine, at_reduction)
    inner.step = _measuring(inner.step, engine, at_update)
    gen = torch.Generator().manual_seed(rank)
    batches = iter(lambda: torch.randint(0, cfg.model.vocab_size, (1, cfg.model.seq_len + 1), generator=gen), None)
    for index in range(2):
        optimizer_step(index, batches)
    groups = [sum(getattr(p, "ds_numel", p.numel()) for p in g["params"]) for g in param_groups(engine.module, cfg)]
    results.put((rank, sum(groups), max(groups), max(at_update), max(at_update + at_reduction)))


def measure(stage: int, args: argparse.Namespace) -> tuple[int, int, int, int]:
    """(Ψ, largest param group, bytes held at the update, peak bytes), the most of any rank, at ZeRO `stage`
    from DP fresh processes."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_measure_rank, args=(rank, port, stage, args, results)) for rank in range(DP)]
    for proc in procs:
        proc.start()
    per_rank = sorted(results.get(timeout=args.timeout) for _ in procs)
    for proc in procs:
        proc.join()
    return per_rank[0][1], per_rank[0][2], max(r[3] for r in per_rank), max(r[4] for r in per_rank)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--smoke", action="store_true", help="a ~0.7M-parameter model (~20 s per stage)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a stage's ranks")
    args = parser.parse_args(argv)
    rows = [(stage, *measure(stage, args)) for stage in STAGES]
    print(f"\nPer-rank model + optimizer memory, DP={DP}, bf16 weights, fp32 gradients and Adam state (MiB)")
    print(f"{'ZeRO':>4}  {'Ψ (params)':>12}  {'at update':>9}  {'formula':>8}  {'ratio':>6}  {'peak':>7}")
    for stage, params, largest_group, at_update, peak in rows:
        formula = formula_bytes(stage, params, largest_group)
        print(f"{stage:>4}  {params:>12,}  {at_update / 2**20:>9.2f}  {formula / 2**20:>8.2f}  "
              f"{at_update / formula:>6.3f}  {peak / 2**20:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
