"""deepspeed.initialize on megamu's model, μP param groups and process groups."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed

from megamu.config import Config
from megamu.parallel.state import ParallelState
from megamu.training.guards import NonFiniteStepGate
from megamu.training.optim import build_optimizer, restore_lr_mults


@dataclass
class Engine:
    """The DeepSpeed engine plus what the loop needs next to it."""

    engine: Any  # deepspeed.DeepSpeedEngine
    gate: NonFiniteStepGate
    zero_stage: int

    @property
    def param_groups(self) -> list[dict]:
        """The groups whose `lr` the schedule sets (ZeRO wrappers expose the inner optimizer's)."""
        return self.engine.optimizer.param_groups

    def unreduced_grad_norm(self) -> float:
        """Global gradient norm before clipping, for ZeRO 0 where DeepSpeed does not report one.

        Called between the last backward and step(); gradients are already averaged over DP. Under tensor
        parallelism a sharded parameter's gradient counts on every TP rank and a replicated one only on TP
        rank 0 (DeepSpeed's rule), and the squares are summed over the model-parallel group.
        """
        mpu = self.engine.mpu
        first_tp_rank = mpu.get_tensor_model_parallel_rank() == 0
        grads = [p.grad for p in self.engine.module.parameters()
                 if p.grad is not None and (first_tp_rank or getattr(p, "tensor_model_parallel", False))]
        if grads:
            squares = torch.stack(torch._foreach_norm([g.float() for g in grads])).square().sum()
        else:
            squares = torch.zeros((), dtype=torch.float32, device=self.engine.device)
        torch.distributed.all_reduce(squares, group=mpu.get_model_parallel_group())
        return float(squares.sqrt())


def _innermost_optimizer(ds_optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer whose step() changes weights: ZeRO and the bf16 wrapper keep it in `.optimizer`."""
    inner = ds_optimizer
    while hasattr(inner, "optimizer") and isinstance(getattr(inner, "optimizer"), torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def build_engine(cfg: Config, ds_config: dict, state: ParallelState) -> Engine:
    import deepspeed
    from megamu.model import build_model

    model = build_model(cfg, state.get_tensor_model_parallel_group())
    optimizer = build_optimizer(model, cfg)
    reference = [{"name": g["name"], "lr_mult": g["lr_mult"]} for g in optimizer.param_groups]
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=state)
    restore_lr_mults(engine.optimizer, reference)
    if cfg.train.compile:
        engine.compile()
    stage = engine.zero_optimization_stage()
    if stage == 0 and state.get_data_parallel_world_size() == 1:
        # One data-parallel rank: DeepSpeed's reduction would flatten every gradient, "all-reduce" it over
        # that one rank and copy it back (4 passes over the gradients per step for nothing).
        engine.enable_backward_allreduce = False
    # ZeRO 1-3 compute the global grad norm (over every rank) before their inner step: the gate reuses it.
    zero_norm = (lambda: getattr(engine.optimizer, "_global_grad_norm", None)) if stage > 0 else (lambda: None)
    gate = NonFiniteStepGate(_innermost_optimizer(ds_optimizer), state.get_data_parallel_group(), zero_norm)
    return Engine(engine=engine, gate=gate, zero_stage=stage)
