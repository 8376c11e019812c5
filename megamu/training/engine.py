"""deepspeed.initialize on megamu's model, μP param groups and process groups, wrapped for stepping
(`parallel.pipeline > 1`: DeepSpeed's pipeline engine, megamu.training.pipeline)."""
from __future__ import annotations

from typing import Any

import torch

from megamu.checkpoint.initial import load_initial_weights, read_initial_weights
from megamu.config import Config, ConfigError
from megamu.model.fp8 import use_fp8_matmuls
from megamu.model.transformer import compile_blocks
from megamu.parallel.state import ParallelState
from megamu.runtime import compile_problem, fp8_problem
from megamu.training.optim import build_optimizer, restore_lr_mults
from megamu.training.step import NonFiniteStepGate, OptimizerStep


def innermost_optimizer(ds_optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer whose step() changes weights: ZeRO and the bf16 wrapper keep it in `.optimizer`."""
    inner = ds_optimizer
    while hasattr(inner, "optimizer") and isinstance(getattr(inner, "optimizer"), torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def _build_model(cfg: Config, ds_config: dict, state: ParallelState) -> torch.nn.Module:
    """This rank's model on its device, before the optimizer is built on it (its state, and fused AdamW's
    kernels, then live there). Under ZeRO 3 every parameter is partitioned over data parallelism as soon as
    its module exists (μP init gathers one parameter at a time), so no rank ever holds the whole model. With
    train.init_from the weights then come from that file instead (checkpoint/initial.py)."""
    import deepspeed
    from megamu.model import build_model
    from megamu.runtime import device
    from megamu.training.ds_config import zero_stage

    tp_group = state.get_tensor_model_parallel_group()
    if zero_stage(ds_config) != 3:
        model = build_model(cfg, tp_group)
    else:
        # zero.Init also places the partitions (on the device, or where offload_param says).
        with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=state,
                                 data_parallel_group=state.get_data_parallel_group()):
            model = build_model(cfg, tp_group)
    if cfg.train.init_from:
        load_initial_weights(model, read_initial_weights(cfg), cfg.train.init_from)
    return model if zero_stage(ds_config) == 3 else model.to(device())


def use_fast_kernels(model: torch.nn.Module, cfg: Config) -> None:
    """train.fp8 and train.compile on this rank's model (a Transformer or a pipeline stage), before DeepSpeed
    wraps it: neither changes a parameter or its name."""
    if cfg.train.fp8:
        use_fp8_matmuls(model)
    if cfg.train.compile:
        compile_blocks(model)  # regional: each block in place; all blocks share one compiled graph


def build_engine(cfg: Config, ds_config: dict, state: ParallelState) -> OptimizerStep:
    """This rank's model inside a DeepSpeed engine, ready to step (`.engine` is the DeepSpeed engine)."""
    import deepspeed

    if cfg.train.compile and (problem := compile_problem()):
        raise ConfigError(f"train.compile=true: {problem}; or set train.compile=false")
    if cfg.train.fp8 and (problem := fp8_problem()):
        raise ConfigError(f"train.fp8=true: {problem}; or set train.fp8=false")
    if cfg.parallel.pipeline > 1:
        from megamu.training.pipeline import build_pipeline_engine

        return build_pipeline_engine(cfg, ds_config, state)
    model = _build_model(cfg, ds_config, state)
    use_fast_kernels(model, cfg)
    optimizer = build_optimizer(model, cfg)
    reference = [{"name": g["name"], "lr_mult": g["lr_mult"]} for g in optimizer.param_groups]
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=state)
    restore_lr_mults(engine.optimizer, reference)
    stage = engine.zero_optimization_stage()
    if stage == 0 and state.get_data_parallel_world_size() == 1:
        # One data-parallel rank: DeepSpeed's reduction would flatten every gradient, "all-reduce" it over
        # that one rank and copy it back (4 passes over the gradients per step for nothing).
        engine.enable_backward_allreduce = False
    # ZeRO 1-3 compute the global grad norm (over every rank) before their inner step: the gate reuses it.
    zero_norm = (lambda: getattr(engine.optimizer, "_global_grad_norm", None)) if stage > 0 else (lambda: None)
    gate = NonFiniteStepGate(innermost_optimizer(ds_optimizer), state.get_data_parallel_group(), zero_norm)
    return OptimizerStep(engine, gate, stage, cfg.train, state.get_data_parallel_group())
