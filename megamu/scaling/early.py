"""Early forecast: a run's final loss from its first records, and whether it has left the ladder's trend.

The ladder's curve law (scaling/curve.py) predicts the whole curve of a run at its size and under its
schedule. A real run sits above or below that trend by a roughly constant factor (its seed's luck, or
something wrong with it), so the forecast is the trend's final loss times the run's own offset,
exp(mean log(actual/trend)) over the second half of its records past warm-up (the first half still
carries the steep early transient). The offset is compared with the seed-to-seed spread: the standard
deviation of the fit's per-seed offsets (a ladder with several seeds), or else of the offsets of runs of
one size. Offsets beyond twice that flag the run; with no repeated runs in the ladder the spread is
unknown and said so.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megamu.errors import FitError
from megamu.scaling.curve import Curve, CurveFit

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


@dataclass(frozen=True)
class EarlyForecast:
    name: str
    seen_updates: int  # the last update the forecast saw
    final_updates: int
    trend_final: float  # the ladder law's final loss at the run's size and schedule
    predicted_final: float  # the trend times the run's own offset
    offset: float  # log(actual / trend) of the run so far
    spread: Optional[float]  # seed-to-seed standard deviation of that offset; None: unknown
    flagged: Optional[bool]  # |offset| > FLAG_SIGMAS · spread; None when the spread is unknown
    actual_final: Optional[float] = None  # the run's own last loss when it has already finished

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def verdict(self) -> str:
        if self.flagged is None:
            return ("seed-to-seed spread unknown (no ladder size was trained with several seeds): "
                    f"the run is {self.offset * 100:+.2f}% off the ladder's trend, with nothing to compare it to")
        state = "has LEFT the ladder's trend" if self.flagged else "follows the ladder's trend"
        return (f"{state}: {self.offset * 100:+.2f}% vs a seed spread of ±{FLAG_SIGMAS * self.spread * 100:.2f}% "
                f"({FLAG_SIGMAS:g}σ)")


def early_forecast(fit: CurveFit, curve: Curve, spread: Optional[float]) -> EarlyForecast:
    """Forecast the final loss of `curve` (a run's records so far) from the fitted ladder law."""
    offset = log_offset(fit, curve)
    trend = float(fit.predict(curve.params, curve.lrs, np.array([curve.final_updates]), curve.seed)[0])
    flagged = None if spread is None else bool(abs(offset) > FLAG_SIGMAS * spread)
    finished = float(curve.loss[-1]) if curve.updates[-1] >= curve.final_updates else None
    return EarlyForecast(curve.name, int(curve.updates[-1]), curve.final_updates, trend,
                         trend * float(np.exp(offset)), offset, spread, flagged, finished)
