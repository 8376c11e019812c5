"""Pipeline parallelism through DeepSpeed's PipelineEngine: building it, and one optimizer step of 1F1B.

`engine.train_batch` runs a whole step (every micro batch's forward and backward, the gradient reduction
and the optimizer step) in one call, so what megamu does between backward and step elsewhere happens
inside the call here:
- the non-finite gate sees the loss only on the last stage, and only when the inner optimizer step runs;
  its verdict is all-reduced over every rank, so all stages and replicas skip together;
- at ZeRO 0 DeepSpeed's fp32 clipping (`clip_grad_norm_`) would count replicated parameters only where
  the grid's model-parallel rank is 0, i.e. on the first stage alone; megamu clips with its own norm,
  which counts them on TP rank 0 of every stage. ZeRO 1 counts them correctly (by TP rank).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from megamu.config import Config, TrainConfig
from megamu.data.objectives import inputs_and_labels
from megamu.parallel.pipeline_grid import check_pipeline_grid, pipeline_topology
from megamu.parallel.state import ParallelState
from megamu.parallel.state import any_rank
from megamu.training.guards import is_finite
from megamu.training.schedule import apply_lr, base_lr
from megamu.training.step import NonFiniteStepGate, OptimizerStep, StepOutcome, tp_grad_norm


class PipelineStepGate(NonFiniteStepGate):
    """The gate for a step run inside `train_batch`: it decides once per step (a ZeRO optimizer calls the
    inner step once per param group, and stages hold different groups), from this stage's loss and
    gradients, agreed over `group` (the whole world)."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: Optional[dist.ProcessGroup],
                 stage_loss: Callable[[], Optional[torch.Tensor]], step_grad_norm: Callable[[], Any]) -> None:
        super().__init__(optimizer, group, step_grad_norm)
        self.stage_loss = stage_loss
        self.verdict: Optional[bool] = None

    def begin_step(self, loss_is_bad: bool = False, grad_norm: Optional[float] = None) -> None:
        super().begin_step(loss_is_bad, grad_norm)
        self.verdict = None

    def _step_is_bad(self) -> bool:
        if self.verdict is None:
            loss = self.stage_loss()
            bad = loss is not None and not bool(torch.isfinite(loss).all())
            norm = self.step_grad_norm()
            bad = bad or (not math.isfinite(float(norm)) if norm is not None else self._local_grads_bad())
            self.verdict = any_rank(bad, self.group)
        return self.verdict


class Zero0PipelineNorm:
    """ZeRO 0's global gradient norm under PP, computed once per step; `clip` replaces the engine's fp32
    clipping (module docstring)."""

    def __init__(self, engine: Any, max_norm: float) -> None:
        self.engine = engine
        self.max_norm = max_norm
        self.value: Optional[float] = None

    def reset(self) -> None:
        self.value = None

    def __call__(self) -> float:
        if self.value is None:
            grid = self.engine.grid
            self.value = tp_grad_norm(self.engine.module.parameters(), grid.get_slice_parallel_rank() == 0,
                                      grid.get_model_parallel_group(), self.engine.device)
        return self.value

    def clip(self) -> None:
        coef = self.max_norm / (self() + 1e-6)  # DeepSpeed's formula
        if coef < 1.0:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coef)


class PipelineOptimizerStep(OptimizerStep):
    """One optimizer step of 1F1B over `gradient_accumulation_steps` micro batches per replica."""

    def __init__(self, engine: Any, gate: PipelineStepGate, zero_stage: int, train: TrainConfig,
                 dp_group: Optional[dist.ProcessGroup], zero0_norm: Optional[Zero0PipelineNorm]) -> None:
        super().__init__(engine, gate, zero_stage, train, dp_group)
        self.zero0_norm = zero0_norm

    def __call__(self, step: int, batches: Iterator[torch.Tensor]) -> StepOutcome:
        engine = self.engine
        apply_lr(self.param_groups, base_lr(step, self.train))
        # Every stage draws the step's samples (only the first and last use them), so that every rank's
        # sampler, and hence its checkpointed position, is the same.
        micro = [next(batches) for _ in range(engine.gradient_accumulation_steps())]
        self.gate.begin_step()
        if self.zero0_norm is not None:
            self.zero0_norm.reset()
        loss = float(engine.train_batch(iter(_inputs_and_labels(micro))))  # the last stage's, broadcast
        if self.zero0_norm is not None:
            grad_norm = self.zero0_norm.value
        else:
            reported = engine.get_global_grad_norm()
            grad_norm = float(reported) if reported is not None else None
        skipped = self.gate.skipped_last_step or not math.isfinite(loss) or not is_finite(grad_norm)
        return StepOutcome(loss, grad_norm, skipped)

    def validation_loss(self, batches: Iterable[torch.Tensor]) -> float:
        micro = list(batches)
        loss = self.engine.eval_batch(iter(_inputs_and_labels(micro)), num_micro_batches=len(micro))
        self.engine.train()
        return float(loss)  # averaged over micro batches and data parallelism, broadcast from the last stage


def _inputs_and_labels(micro_batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) as the pipeline engine loads them: inputs on the first stage, labels on the last."""
    return [inputs_and_labels(batch) for batch in micro_batches]


def build_pipeline_engine(cfg: Config, ds_config: dict, state: ParallelState) -> PipelineOptimizerStep:
    """This rank's pipeline stage in DeepSpeed's PipelineEngine (no mpu: the module's grid is megamu's
    groups, checked), ready to step."""
    import deepspeed
    from megamu.training.pipeline_module import TransformerPipe
    from megamu.runtime import device
    from megamu.training.engine import innermost_optimizer, use_fast_kernels
    from megamu.training.optim import build_optimizer, restore_lr_mults

    model = TransformerPipe(cfg, pipeline_topology(state.layout), state.get_tensor_model_parallel_group())
    check_pipeline_grid(model.mpu(), state)
    model.to(device())  # the optimizer's state (and fused AdamW's kernels) then live on the device
    use_fast_kernels(model, cfg)
    optimizer = build_optimizer(model, cfg)
    reference = [{"name": g["name"], "lr_mult": g["lr_mult"]} for g in optimizer.param_groups]
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    restore_lr_mults(engine.optimizer, reference)
    stage = engine.zero_optimization_stage()
    zero0_norm = Zero0PipelineNorm(engine, cfg.train.grad_clip) if stage == 0 else None
    if zero0_norm is not None:
        engine.clip_fp32_gradients = zero0_norm.clip  # an instance attribute shadows DeepSpeed's method

    def step_grad_norm() -> Optional[float]:
        # ZeRO 1 computes the global norm (over every rank) before its inner step.
        return zero0_norm() if zero0_norm is not None else getattr(engine.optimizer, "_global_grad_norm", None)

    def stage_loss() -> Optional[torch.Tensor]:
        return engine.total_loss if engine.is_last_stage() else None  # the sum of this step's micro losses

    gate = PipelineStepGate(innermost_optimizer(ds_optimizer), None, stage_loss, step_grad_norm)
    return PipelineOptimizerStep(engine, gate, stage, cfg.train, state.get_data_parallel_group(), zero0_norm)
