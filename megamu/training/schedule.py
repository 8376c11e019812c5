"""Learning-rate schedules that scale every param group's own μP multiplier.

`lr_factor(step)` is the schedule's shape in [0, 1]; `apply_lr` sets, for every group,
group["lr"] = train.lr * factor * group["lr_mult"]. The multiplier is never overwritten, so the
μP ratios between groups hold at every step (DeepSpeed's built-in schedulers overwrite group
LRs, which is why megamu does not use them).
"""
from __future__ import annotations

import math
from typing import Iterable

from megamu.config import TrainConfig


def lr_factor(step: int, t: TrainConfig) -> float:
    """LR at optimizer step `step` (0-based) as a fraction of the peak train.lr."""
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    floor = t.min_lr_ratio
    if t.schedule == "cosine":
        span = max(t.max_steps - t.warmup_steps, 1)
        progress = min((step - t.warmup_steps) / span, 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if t.schedule == "wsd":
        decay_steps = max(int(round(t.decay_fraction * t.max_steps)), 1)
        decay_start = t.max_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start + 1) / decay_steps, 1.0)
        return 1.0 - (1.0 - floor) * progress
    raise ValueError(f"train.schedule must be 'cosine', 'wsd' or 'constant', got {t.schedule!r}")


def base_lr(step: int, t: TrainConfig) -> float:
    return t.lr * lr_factor(step, t)


def apply_lr(param_groups: Iterable[dict], lr: float) -> None:
    """Set every group's LR to `lr` times its own multiplier."""
    for group in param_groups:
        group["lr"] = lr * group["lr_mult"]
