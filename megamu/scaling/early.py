"""Early forecast: a run's final loss from its first records, and whether it has left the ladder's trend.

The ladder's curve law (scaling/curve.py) predicts the whole curve of a run at its size and under its
schedule. A real run sits above or below that trend by a roughly constant factor (its seed's luck, or
something wrong with it), so the forecast is the trend's final loss times the run's own offset,
exp(mean log(actual/trend)) over the second half of its records past warm-up (the first half still
carries the steep early transient). The offset is compared with the seed-to-seed spread: the standard
deviation of the fit's per-seed offsets (a ladder with several seeds), or else of the offsets of runs of
one size. With no repeated runs in the ladder the spread is unknown and said so.

A run larger than the ladder is also off the trend by the law's own extrapolation error, which at 8× can
exceed the seed spread several times over (benchmarks/bench_curve.py: healthy runs 2–3% below the law over
their first 20%, against a seed spread of ±0.55%). That error is measured the way the ladder can: the law
refitted without its largest size, that size's offset over the same fraction of its schedule, per e-fold of
size, times the run's e-folds beyond the ladder (`extrapolation_drift`; it needs a size to leave out and
three to refit). A run is flagged when its offset exceeds twice the seed spread plus that drift.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megamu.errors import FitError
from megamu.scaling.curve import MIN_SIZES, Curve, CurveFit, fit_curves

FLAG_SIGMAS = 2.0


def log_offset(fit: CurveFit, curve: Curve) -> float:
    """Mean log(actual / trend) over the second half of the curve's records past warm-up."""
    mask = curve.after_warmup()
    if mask.sum() < 2:
        raise FitError(f"run {curve.name} has fewer than 2 records past its {curve.warmup_steps} warm-up steps "
                       "so far: wait for more of the run, or log more often (log.interval for train losses, "
                       "train.eval_interval for validation losses)")
    late = np.flatnonzero(mask)[mask.sum() // 2:]
    return float(np.mean(np.log(curve.loss[late] / fit.predict_curve(curve)[late])))


def seed_spread(fit: CurveFit, curves: Sequence[Curve]) -> Optional[float]:
    """Standard deviation of the seeds' log offsets (fitted, or pooled within sizes); None without repeated runs."""
    if len(fit.offsets) > 1:
        deltas = np.array(list(fit.offsets.values()))
        return float(np.sqrt(np.sum(deltas**2) / (len(deltas) - 1)))  # they sum to zero: this is their sample σ
    by_size = defaultdict(list)
    for c in curves:
        by_size[c.params].append(log_offset(fit, c))
    groups = [np.asarray(v) for v in by_size.values() if len(v) > 1]
    if not groups:
        return None
    dof = sum(len(g) - 1 for g in groups)
    return float(np.sqrt(sum(np.sum((g - g.mean()) ** 2) for g in groups) / dof))


def extrapolation_drift(fitted: Sequence[Curve], curve: Curve) -> Optional[float]:
    """The log offset the ladder's law is expected to have over the records of `curve` (a run so far) from its
    size alone: 0 within the ladder's sizes; beyond them, the drift the law showed extrapolating to its own
    largest size (refitted without it), per e-fold of size, times the run's e-folds beyond the ladder. None when
    it cannot be measured: too few sizes to leave one out, or too few records of that size so far."""
    sizes = sorted({c.params for c in fitted})
    beyond = math.log(curve.params / sizes[-1])
    if beyond <= 0:
        return 0.0
    if len(sizes) <= MIN_SIZES:
        return None
    largest = [c for c in fitted if c.params == sizes[-1]]
    refit = fit_curves([c for c in fitted if c.params != sizes[-1]])
    seen = float(curve.updates[-1]) / len(curve.lrs)
    try:
        offset = float(np.mean([log_offset(refit, c.prefix(seen)) for c in largest]))
    except FitError:  # the largest size's runs have too few records over that fraction of their schedule
        return None
    return offset / math.log(sizes[-1] / sizes[-2]) * beyond


@dataclass(frozen=True)
class EarlyForecast:
    name: str
    seen_updates: int  # the last update the forecast saw
    final_updates: int
    trend_final: float  # the ladder law's final loss at the run's size and schedule
    predicted_final: float  # the trend times the run's own offset
    offset: float  # log(actual / trend) of the run so far
    spread: Optional[float]  # seed-to-seed standard deviation of that offset; None: unknown
    flagged: Optional[bool]  # |offset| > FLAG_SIGMAS · spread + |drift|; None when the spread is unknown
    actual_final: Optional[float] = None  # the run's own last loss when it has already finished
    drift: Optional[float] = 0.0  # the law's expected offset at this size (extrapolation_drift); None: unmeasured

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def verdict(self) -> str:
        if self.flagged is None:
            return ("seed-to-seed spread unknown (no ladder size was trained with several seeds): "
                    f"the run is {self.offset * 100:+.2f}% off the ladder's trend, with nothing to compare it to")
        state = "has LEFT the ladder's trend" if self.flagged else "follows the ladder's trend"
        line = (f"{state}: {self.offset * 100:+.2f}% vs a seed spread of ±{FLAG_SIGMAS * self.spread * 100:.2f}% "
                f"({FLAG_SIGMAS:g}σ)")
        if self.drift is None:
            return line + ("; the law's own extrapolation error to this size is not measured (it needs runs at "
                           f"{MIN_SIZES + 1} or more ladder sizes) and not allowed for")
        if self.drift:
            return line + (f" plus ±{abs(self.drift) * 100:.2f}%, the law's expected error at this size (the "
                           "drift it showed extrapolating to the ladder's largest size, scaled to this run's: "
                           f"{self.drift * 100:+.2f}%)")
        return line


def early_forecast(fit: CurveFit, curve: Curve, spread: Optional[float],
                   drift: Optional[float] = 0.0) -> EarlyForecast:
    """Forecast the final loss of `curve` (a run's records so far) from the fitted ladder law; `drift`: the
    law's expected offset at the run's size (extrapolation_drift)."""
    offset = log_offset(fit, curve)
    trend = float(fit.predict(curve.params, curve.lrs, np.array([curve.final_updates]), curve.seed)[0])
    allowed = None if spread is None else FLAG_SIGMAS * spread + abs(drift or 0.0)
    flagged = None if allowed is None else bool(abs(offset) > allowed)
    finished = float(curve.loss[-1]) if curve.updates[-1] >= curve.final_updates else None
    return EarlyForecast(curve.name, int(curve.updates[-1]), curve.final_updates, trend,
                         trend * float(np.exp(offset)), offset, spread, flagged, finished, drift)
