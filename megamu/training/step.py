"""One optimizer step on the DeepSpeed engine, with everything that decides whether it may update.

`OptimizerStep` runs a step over one global batch: the LR schedule, the micro batches, the loss averaged
over data parallelism, the global gradient norm (megamu's own at ZeRO 0, where DeepSpeed reports none),
and the non-finite gate that skips the update identically on every rank.

The gate wraps the innermost optimizer's `step` (the call that actually changes weights, under every
ZeRO stage). It skips the update when the step's loss is non-finite or when any gradient it is about to
apply is non-finite on any rank. The global gradient norm answers that for free when the step has one (a
norm is finite exactly when every gradient is): the loop's own at ZeRO 0, DeepSpeed's under ZeRO 1-3,
computed over every rank before the inner step runs. Only without a norm does the gate pass over the
gradients itself and all-reduce the verdict, so all ranks skip together and replicas never diverge.

Host syncs: a step reads back to the host only what its skip verdict needs, which must be known (and
the same on every rank) before the update: the DP-mean loss (one all-reduce of a [loss, count] pair, one
read) and, at ZeRO 0, megamu's gradient norm (one all-reduce, one read; DeepSpeed's ZeRO optimizers compute
theirs anyway). Micro-batch losses stay on the device until then, and validation sums its losses on the
device. The loop adds one more read per step, the SIGTERM vote (training/preemption.py); everything it
logs waits for the logging interval.

In bf16 DeepSpeed's wrapper may decide first (see training/ds_config.py for which wrapper each ZeRO stage
gets): at ZeRO 0 (`FP16_UnfusedOptimizer`) and ZeRO 1 (`BF16_Optimizer`) it skips a step with a non-finite
norm without calling the inner step, on every rank alike, since its norm is global. The step still counts
as skipped once (`engine.was_step_applied()`), and its norm is megamu's own at ZeRO 0 (NaN or inf, as
computed); at ZeRO 1-3 it is DeepSpeed's, which reports every non-finite norm as inf, in fp32 as in bf16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from megamu.config import TrainConfig
from megamu.data.objectives import inputs_and_labels
from megamu.parallel.state import any_rank
from megamu.training.guards import is_finite
from megamu.training.schedule import apply_lr, base_lr


def group_mean(total: torch.Tensor, count: int, group: Optional[dist.ProcessGroup]) -> float:
    """Sum of the scalar `total` (on any device) over the group's ranks divided by the sum of `count`: one
    all-reduce and one read back to the host."""
    buf = torch.stack([total.to(torch.float64), total.new_tensor(float(count), dtype=torch.float64)])
    dist.all_reduce(buf, group=group)
    return float(buf[0] / buf[1])


def tp_grad_norm(params: Iterable[torch.nn.Parameter], first_tp_rank: bool, group: Optional[dist.ProcessGroup],
                 device: torch.device) -> float:
    """Global gradient norm with DeepSpeed's tensor-parallel counting rule: a sharded parameter's gradient
    (`tensor_model_parallel`) counts on every TP rank, a replicated one only on TP rank 0; the squares are
    summed over `group`, the ranks that together hold one model replica."""
    grads = [p.grad for p in params
             if p.grad is not None and (first_tp_rank or getattr(p, "tensor_model_parallel", False))]
    if grads:
        squares = torch.stack(torch._foreach_norm([g.float() for g in grads])).square().sum()
    else:
        squares = torch.zeros((), dtype=torch.float32, device=device)
    dist.all_reduce(squares, group=group)
    return float(squares.sqrt())


class NonFiniteStepGate:
    def __init__(self, optimizer: torch.optim.Optimizer, group: Optional[dist.ProcessGroup],
                 step_grad_norm: Callable[[], Any] = lambda: None) -> None:
        """`step_grad_norm` returns this step's global gradient norm when the wrapper calling the inner
        step has computed one before calling it (DeepSpeed's ZeRO optimizers), else None."""
        self.optimizer = optimizer
        self.group = group
        self.step_grad_norm = step_grad_norm
        self.loss_is_bad = False
        self.known_grad_norm: Optional[float] = None
        self.skipped_last_step = False
        optimizer.step = self._gated(optimizer.step)  # an instance attribute shadows the method DeepSpeed calls

    def _gated(self, inner_step: Callable) -> Callable:
        def step(*args, **kwargs):
            bad = self._step_is_bad()
            self.skipped_last_step = self.skipped_last_step or bad
            if bad:
                return None
            return inner_step(*args, **kwargs)
        return step

    def _step_is_bad(self) -> bool:
        return self.loss_is_bad or not self._grads_finite()

    def _grads_finite(self) -> bool:
        norm = self.known_grad_norm if self.known_grad_norm is not None else self.step_grad_norm()
        if norm is not None:
            return math.isfinite(float(norm))
        return not any_rank(self._local_grads_bad(), self.group)

    def _local_grads_bad(self) -> bool:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        # One device-to-host sync for the whole model, not one per tensor.
        return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def begin_step(self, loss_is_bad: bool, grad_norm: Optional[float] = None) -> None:
        """Arm the gate for one optimizer step; `grad_norm`: the step's global norm if the loop has it."""
        self.loss_is_bad = loss_is_bad
        self.known_grad_norm = grad_norm
        self.skipped_last_step = False


@dataclass
class StepOutcome:
    loss: float  # mean over every micro batch of every data-parallel rank
    grad_norm: Optional[float]  # global, before clipping; None when unknown
    skipped: bool  # no update was made (non-finite loss or gradients)


class OptimizerStep:
    """Runs optimizer steps on a DeepSpeed engine; `engine` stays reachable for evaluation and checkpoints."""

    def __init__(self, engine: Any, gate: NonFiniteStepGate, zero_stage: int, train: TrainConfig,
                 dp_group: Optional[dist.ProcessGroup]) -> None:
        self.engine = engine  # deepspeed.DeepSpeedEngine
        self.gate = gate
        self.zero_stage = zero_stage
        self.train = train
        self.dp_group = dp_group

    @property
    def param_groups(self) -> list[dict]:
        """The groups whose `lr` the schedule sets (ZeRO wrappers expose the inner optimizer's)."""
        return self.engine.optimizer.param_groups

    def __call__(self, step: int, batches: Iterator[torch.Tensor]) -> StepOutcome:
        """Optimizer step `step` (0-based) over one global batch drawn from `batches`.

        A step whose loss or gradients are not finite on any rank makes no update on any rank.
        """
        engine = self.engine
        apply_lr(self.param_groups, base_lr(step, self.train))
        micro_losses = []
        accumulation = engine.gradient_accumulation_steps()
        for micro_step in range(accumulation):
            inputs, labels = inputs_and_labels(next(batches).to(engine.device, non_blocking=True))
            loss = engine(inputs, labels=labels)
            engine.backward(loss)
            micro_losses.append(loss.detach().float())
            if micro_step < accumulation - 1:
                engine.step()  # DeepSpeed counts micro steps here; it updates only at the boundary
        loss = group_mean(torch.stack(micro_losses).sum(), len(micro_losses), self.dp_group)
        loss_bad = not math.isfinite(loss)
        grad_norm = self._zero0_grad_norm() if self.zero_stage == 0 else None
        self.gate.begin_step(loss_is_bad=loss_bad, grad_norm=grad_norm)
        engine.step()
        if grad_norm is None:
            reported = engine.get_global_grad_norm()
            grad_norm = float(reported) if reported is not None else None
        # DeepSpeed's bf16 wrappers at ZeRO 0 and 1 skip a non-finite step before the gate can see it.
        skipped = self.gate.skipped_last_step or not engine.was_step_applied()
        return StepOutcome(loss, grad_norm, skipped or loss_bad or not is_finite(grad_norm))

    def validation_loss(self, batches: Iterable[torch.Tensor]) -> float:
        """Mean loss over this rank's validation micro batches `batches`, averaged over data parallelism."""
        engine = self.engine
        engine.eval()
        total, count = torch.zeros((), dtype=torch.float64, device=engine.device), 0
        with torch.no_grad():
            for batch in batches:
                inputs, labels = inputs_and_labels(batch.to(engine.device, non_blocking=True))
                total += engine(inputs, labels=labels).double()  # summed on the device: no sync
                count += 1
        engine.train()
        return group_mean(total, count, self.dp_group)

    def _zero0_grad_norm(self) -> float:
        """Global gradient norm before clipping, for ZeRO 0 where DeepSpeed does not report one.

        Called between the last backward and step(); gradients are already averaged over DP. Under tensor
        parallelism a sharded parameter's gradient counts on every TP rank and a replicated one only on TP
        rank 0 (DeepSpeed's rule), and the squares are summed over the model-parallel group.
        """
        mpu = self.engine.mpu
        return tp_grad_norm(self.engine.module.parameters(), mpu.get_tensor_model_parallel_rank() == 0,
                            mpu.get_model_parallel_group(), self.engine.device)
