"""Seed offsets: fitting a ladder trained once per seed at every size as a paired design.

Under μP a seed's luck is shared across widths: init is drawn per (seed, parameter name) and the
training dynamics do not depend on width, so one seed's runs sit above the others at every size
(on the sample-corpus ladder, by up to 0.3 nats: as much as the whole width effect). The model is

    L(seed s, size x) = a·x^b + c + δ_s + noise,   Σ_s δ_s = 0,

and with every seed at every fitted size (a balanced design) least squares gives δ_s exactly as
seed s's mean loss minus the grand mean, whatever the curve. So the offsets are subtracted first,
the usual power law is fitted on the adjusted losses with the G − 1 offsets' degrees of freedom
taken off, and the curve a·x^b + c is the seed-averaged law. A new run of seed s is predicted at
curve + δ_s; the mean of all G seeds at a size at the curve itself.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from megamu.scaling.fit import FitError


def estimate_seed_offsets(seeds: Sequence[int], x: np.ndarray, loss: np.ndarray) -> dict[int, float]:
    """δ_s per seed from the fitted points; they must hold every seed at every size."""
    distinct = sorted(set(seeds))
    if len(distinct) < 2:
        raise FitError(f"seed offsets need runs of at least 2 seeds, got {distinct}; drop --seed-offsets")
    sizes = {s: sorted(float(xi) for si, xi in zip(seeds, x) if si == s) for s in distinct}
    reference = sizes[distinct[0]]
    for s in distinct[1:]:
        if sizes[s] != reference:
            missing = sorted(set(reference) ^ set(sizes[s]))
            raise FitError(f"seed offsets need every seed at every fitted size (each once); seeds {distinct[0]} "
                           f"and {s} differ at x = {', '.join(f'{v:.4g}' for v in missing)}: finish or drop "
                           f"those runs")
    if len(set(reference)) != len(reference):
        raise FitError("seed offsets need one run per seed and size; a seed has repeated runs at one x")
    seeds_arr = np.asarray(seeds)
    grand = float(np.mean(loss))
    return {s: float(np.mean(loss[seeds_arr == s])) - grand for s in distinct}


def point_seeds(points: Sequence) -> list[int]:
    """The seed of every point, or an error naming the first point without one."""
    for p in points:
        if p.seed is None:
            raise FitError(f"point {p.name!r} has no seed (train.seed in its config.yaml, or a `seed` column in the "
                           f"CSV): seed offsets need one for every point")
    return [int(p.seed) for p in points]


def holdout_by_size(holdout: Sequence[dict]) -> list[dict]:
    """Held-out entries of a report ({"x", "actual", "predicted", "interval", "rel_error"}, one per run) merged per
    size: the mean of its runs' losses scored against the size's prediction, which its seeds share (the curve is
    the seed-averaged law), with "runs" counting them."""
    merged = []
    for x in sorted({h["x"] for h in holdout}):
        runs = [h for h in holdout if h["x"] == x]
        actual = float(np.mean([h["actual"] for h in runs]))
        merged.append({**runs[0], "actual": actual, "rel_error": runs[0]["predicted"] / actual - 1, "runs": len(runs)})
    return merged
