"""Checks of a ladder before its forecast is trusted: does the loss fall with size, is the exponent plausible.

A power law with a floor assumes the loss falls with x; a ladder whose loss rises somewhere (a rung with a
bad learning rate, too few steps, a diverged or unlucky seed) is fitted anyway, but its forecast inherits the
fault, so the report names the rungs. An exponent outside EXPONENT_RANGE means the fit leans on a few points
or on a floor at its bound rather than on a trend.
"""
from __future__ import annotations

import numpy as np

# |b| of L = a·x^b + c outside this range is warned about. Published ladders fit about 0.05-0.7 (in params,
# tokens or compute, e.g. Chinchilla's 0.34 and 0.28, Kaplan's 0.076 and 0.050); the range leaves room around it.
EXPONENT_RANGE = (0.02, 2.0)


def non_monotone(x: np.ndarray, loss: np.ndarray, x_kind: str) -> list:
    """One warning when the mean loss at each distinct x rises anywhere as x grows, naming where."""
    sizes = np.unique(x)
    means = [float(np.mean(loss[x == s])) for s in sizes]
    rises = [f"{means[i - 1]:.4g} at {x_kind} = {sizes[i - 1]:.4g} -> {means[i]:.4g} at {sizes[i]:.4g}"
             for i in range(1, len(sizes)) if means[i] > means[i - 1]]
    if not rises:
        return []
    return [f"the loss does not fall with {x_kind} ({'; '.join(rises)}): a power law assumes it does, so check "
            f"those runs (learning rate, steps, divergence, seeds) before trusting the forecast"]


def extreme_exponent(name: str, exponent: float) -> list:
    """A warning when |exponent| lies outside EXPONENT_RANGE."""
    low, high = EXPONENT_RANGE
    if low <= abs(exponent) <= high:
        return []
    return [f"the fitted exponent {name} = {exponent:.3g} is extreme (|{name}| outside {low:g}-{high:g}; published "
            f"ladders fit about 0.05-0.7): the fit leans on a few points or a floor at its bound, not on a trend"]
