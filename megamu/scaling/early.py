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
size, times the run's e-folds beyond the ladder (`extrapolation_drift`; it needs a size to leave out, three to
refit, and the two largest sizes at least 1.35x apart). A healthy run's offset lies between 0 and that drift,
give or take twice the seed spread and the drift's own uncertainty (the seed spread of the runs it rests on,
scaled as the drift is); outside, the run is flagged.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from megamu.errors import FitError
from megamu.scaling.curve import MIN_SIZES, Curve, CurveFit, fit_curves

FLAG_SIGMAS = 2.0
MIN_GAP = 0.3  # e-folds between the ladder's two largest sizes for the drift to be measured


def log_offset(fit: CurveFit, curve: Curve) -> float:
    """Mean log(actual / trend) over the second half of the curve's records past warm-up."""
    if not curve.measurable():
        raise FitError(f"run {curve.name} has fewer than 2 records past its {curve.warmup_steps} warm-up steps "
                       "so far: wait for more of the run, or log more often (log.interval for train losses, "
                       "train.eval_interval for validation losses)")
    mask = curve.after_warmup()
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


@dataclass(frozen=True)
class Drift:
    """The ladder law's expected log offset at a run's size, from its own extrapolation to the ladder's largest
    size; `sd` is that estimate's uncertainty from the seed spread of the runs it rests on. value None: not
    measured, `why_not` says why."""

    value: Optional[float]
    sd: float = 0.0
    why_not: str = ""


def extrapolation_drift(fitted: Sequence[Curve], curve: Curve, spread: float) -> Drift:
    """The drift of the law over the records of `curve` (a run so far) due to its size alone: 0 within the
    ladder's sizes; beyond them, the offset the law refitted without the ladder's largest size has at that size
    (its runs over the same fraction of their schedule), per e-fold of size, times the run's e-folds beyond the
    ladder. The seed spread of those runs' mean, scaled the same way, is its uncertainty."""
    sizes = sorted({c.params for c in fitted})
    beyond = math.log(curve.params / sizes[-1])
    if beyond <= 0:
        return Drift(0.0)
    if len(sizes) <= MIN_SIZES:
        return Drift(None, why_not=f"it needs runs at {MIN_SIZES + 1} or more ladder sizes, one to leave out")
    gap = math.log(sizes[-1] / sizes[-2])
    if gap < MIN_GAP:  # the drift per e-fold would be a small offset divided by a small distance: noise
        return Drift(None, why_not=f"the ladder's two largest sizes are {math.exp(gap):.2f}x apart, too close to "
                                   f"measure it (at least {math.exp(MIN_GAP):.2f}x)")
    seen = float(curve.updates[-1]) / len(curve.lrs)
    prefixes = (c.prefix(seen) for c in fitted if c.params == sizes[-1])
    largest = [c for c in prefixes if c.measurable()]
    if not largest:
        return Drift(None, why_not=f"the ladder's largest size has too few records over the first {seen:.0%} of "
                                   "its schedule")
    refit = fit_curves([c for c in fitted if c.params != sizes[-1]])
    offset = float(np.mean([log_offset(refit, c) for c in largest]))
    scale = beyond / gap
    return Drift(offset * scale, spread / math.sqrt(len(largest)) * scale)


@dataclass(frozen=True)
class EarlyForecast:
    name: str
    seen_updates: int  # the last update the forecast saw
    final_updates: int
    trend_final: float  # the ladder law's final loss at the run's size and schedule
    predicted_final: float  # the trend times the run's own offset
    offset: float  # log(actual / trend) of the run so far
    spread: Optional[float]  # seed-to-seed standard deviation of that offset; None: unknown
    flagged: Optional[bool]  # offset outside band(); None when the spread is unknown
    actual_final: Optional[float] = None  # the run's own last loss when it has already finished
    drift: Optional[float] = 0.0  # the law's expected offset at this size (Drift.value); None: not measured
    drift_sd: float = 0.0
    drift_note: str = ""  # why the drift is not measured

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def band(self) -> Optional[tuple]:
        """The offsets a healthy run may have: between 0 and the drift, widened by twice the seed spread and the
        drift's own uncertainty (added in quadrature); None when the spread is unknown."""
        if self.spread is None:
            return None
        drift = self.drift or 0.0
        width = FLAG_SIGMAS * math.hypot(self.spread, self.drift_sd)
        return min(0.0, drift) - width, max(0.0, drift) + width

    def verdict(self) -> str:
        band = self.band()
        if band is None:
            return ("seed-to-seed spread unknown (no ladder size was trained with several seeds): "
                    f"the run is {self.offset * 100:+.2f}% off the ladder's trend, with nothing to compare it to")
        state = "has LEFT the ladder's trend" if self.flagged else "follows the ladder's trend"
        line = (f"{state}: {self.offset * 100:+.2f}% vs a seed spread of ±{FLAG_SIGMAS * self.spread * 100:.2f}% "
                f"({FLAG_SIGMAS:g}σ)")
        if self.drift is None:
            return line + f"; the law's own extrapolation error at this size is not allowed for ({self.drift_note})"
        if not self.drift:
            return line
        return (f"{state}: {self.offset * 100:+.2f}%, healthy between {band[0] * 100:+.2f}% and "
                f"{band[1] * 100:+.2f}%: the law's expected error at this size is {self.drift * 100:+.2f}% ± "
                f"{self.drift_sd * 100:.2f}% (the drift it showed extrapolating to the ladder's largest size, scaled "
                f"to this run's), and the seed spread ±{FLAG_SIGMAS * self.spread * 100:.2f}% ({FLAG_SIGMAS:g}σ)")


def early_forecast(fit: CurveFit, curve: Curve, spread: Optional[float], drift: Drift = Drift(0.0)) -> EarlyForecast:
    """Forecast the final loss of `curve` (a run's records so far) from the fitted ladder law; `drift`: the
    law's expected offset at the run's size (extrapolation_drift)."""
    offset = log_offset(fit, curve)
    trend = float(fit.predict(curve.params, curve.lrs, np.array([curve.final_updates]), curve.seed)[0])
    finished = float(curve.loss[-1]) if curve.updates[-1] >= curve.final_updates else None
    forecast = EarlyForecast(curve.name, int(curve.updates[-1]), curve.final_updates, trend,
                             trend * float(np.exp(offset)), offset, spread, None, finished, drift.value, drift.sd,
                             drift.why_not)
    band = forecast.band()
    return forecast if band is None else replace(forecast, flagged=not band[0] <= offset <= band[1])
