"""What the loop does about steps that could not update: count them, and stop a run that keeps failing."""
from __future__ import annotations

import math
from typing import Optional


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; a checkpoint was saved before raising."""


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
