"""One optimizer step on the DeepSpeed engine: schedule, micro batches, guard, update."""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megamu.config import TrainConfig
from megamu.training.engine import Engine
from megamu.training.guards import is_finite
from megamu.training.schedule import apply_lr, base_lr


def group_mean(total: float, count: int, group: Optional[dist.ProcessGroup], device: torch.device) -> float:
    """Sum of `total` over the group's ranks divided by the sum of `count`."""
    buf = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(buf, group=group)
    return float(buf[0] / buf[1])


def train_step(model: Engine, t: TrainConfig, step: int, batches: Iterator[torch.Tensor],
               dp_group: Optional[dist.ProcessGroup]) -> tuple[float, Optional[float], bool]:
    """Optimizer step `step` (0-based) over one global batch; returns (mean loss, grad norm, skipped).

    The loss is averaged over every micro batch of every data-parallel rank; a step whose loss or
    gradients are not finite on any rank makes no update on any rank.
    """
    engine = model.engine
    apply_lr(model.param_groups, base_lr(step, t))
    micro_losses = []
    accumulation = engine.gradient_accumulation_steps()
    for micro_step in range(accumulation):
        tokens = next(batches).to(engine.device, non_blocking=True)
        loss = engine(tokens[:, :-1], labels=tokens[:, 1:])
        engine.backward(loss)
        micro_losses.append(loss.detach().float())
        if micro_step < accumulation - 1:
            engine.step()  # DeepSpeed counts micro steps here; it updates only at the boundary
    loss = group_mean(float(torch.stack(micro_losses).sum()), len(micro_losses), dp_group, engine.device)
    loss_bad = not math.isfinite(loss)
    grad_norm = model.unreduced_grad_norm() if model.zero_stage == 0 else None
    model.gate.begin_step(loss_is_bad=loss_bad, grad_norm=grad_norm)
    engine.step()
    reported = engine.get_global_grad_norm()
    if reported is not None:
        grad_norm = float(reported)
    bad = loss_bad or model.gate.skipped_last_step or not is_finite(grad_norm)
    return loss, grad_norm, bad
