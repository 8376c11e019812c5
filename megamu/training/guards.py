"""Skipping steps whose loss or gradients are not finite, identically on every rank.

The gate wraps the innermost optimizer's `step` (the call that actually changes weights, under
every ZeRO stage). It skips the update when the loop flagged a non-finite loss or when any
gradient it is about to apply is non-finite on any rank. The global gradient norm answers that
for free when this step has one (a norm is finite exactly when every gradient is): the loop's own
at ZeRO 0, DeepSpeed's under ZeRO 1-3, computed over every rank before the inner step runs. Only
without a norm does the gate pass over the gradients itself and all-reduce the verdict, so all
ranks skip together and replicas never diverge.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; a checkpoint was saved before raising."""


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
            bad = self.loss_is_bad or not self._grads_finite()
            self.skipped_last_step = self.skipped_last_step or bad
            if bad:
                return None
            return inner_step(*args, **kwargs)
        return step

    def _grads_finite(self) -> bool:
        norm = self.known_grad_norm if self.known_grad_norm is not None else self.step_grad_norm()
        if norm is not None:
            return math.isfinite(float(norm))
        return self._grads_finite_everywhere()

    def _grads_finite_everywhere(self) -> bool:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        # One device-to-host sync for the whole model, not one per tensor.
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        flag = (~finite).to(device=device, dtype=torch.float32).reshape(1)
        if self.group is not None and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return flag.item() == 0.0

    def begin_step(self, loss_is_bad: bool, grad_norm: Optional[float] = None) -> None:
        """Arm the gate for one optimizer step; `grad_norm`: the step's global norm if the loop has it."""
        self.loss_is_bad = loss_is_bad
        self.known_grad_norm = grad_norm
        self.skipped_last_step = False


class BadStepCounter:
    """Counts skipped steps in a row; says when the run must stop."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    def record(self, bad: bool) -> bool:
        """Record one step; True when `max_consecutive` bad steps have happened in a row."""
        self.consecutive = self.consecutive + 1 if bad else 0
        return self.max_consecutive > 0 and self.consecutive >= self.max_consecutive


def is_finite(x: Optional[float]) -> bool:
    return x is None or math.isfinite(x)
