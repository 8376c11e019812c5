"""The whole-curve forecast of `megamu-curve` as one report: fit the ladder's curves, score the held-out sizes'
whole curves, predict a target config's curve, and forecast a partial run's final loss early.

JSON: {"metric", "metric_reason" (the curves fitted: val or train, and why; added by megamu-curve), "law", "fit": {E, B, A, C, beta, alpha, tau, q, N_ref, seed_offsets, at_bounds}, "rms_rel", "fitted": [{"name", "params"}],
"holdout": [{"name", "params", "size_ratio", "records", "mean_rel_error", "max_rel_error", "final"}],
"seed_spread": σ or null, "early": {name, seen_updates, final_updates, trend_final, predicted_final, offset, spread, flagged, actual_final, drift, drift_sd, drift_note, verdict} or null, "target": {"config", "params", "final_updates", "final_loss"}
or null}. Errors are relative (predicted/actual − 1) over the records after warm-up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megamu.config import ConfigError, load_config, resolve
from megamu.errors import FitError
from megamu.model import param_counts
from megamu.scaling.curve import LAW, Curve, CurveFit, curve_errors, fit_curves, schedule_lrs
from megamu.scaling.early import Drift, EarlyForecast, early_forecast, extrapolation_drift, seed_spread


@dataclass(frozen=True)
class Target:
    """A run not trained yet: its size and schedule, from its config resolved as megamu-train would."""

    config: str
    params: float
    lrs: np.ndarray
    notes: tuple = ()  # what resolving the config changed (e.g. a warm-up longer than the run)


def read_target(config: str, params: Optional[float] = None, ladder: Sequence[Curve] = ()) -> Target:
    """The target's schedule from its config, resolved and checked as megamu-train does, and its parameter count
    (counted from the config unless given). `ladder`: the fitted runs' curves; the law is per update, so a
    target whose updates carry another number of tokens than theirs is refused."""
    cfg = load_config(config)
    try:
        notes = resolve(cfg, check_files=False)
    except ConfigError as exc:
        raise ConfigError(f"{config}: {exc}") from None
    if params is None:
        params = param_counts(cfg)["total"]
    if not params > 0:
        raise FitError(f"--target-params must be positive, got {params}")
    for curve in ladder:
        if curve.tokens_per_step not in (None, cfg.tokens_per_step):
            raise FitError(f"{config}: an update trains on {cfg.tokens_per_step} tokens (train.global_batch_size x "
                           f"model.seq_len) but run {curve.name} trained on {curve.tokens_per_step}; the curve law "
                           f"counts updates, so give the target the ladder's batch and sequence length")
    return Target(config, float(params), schedule_lrs(cfg.train), tuple(notes))


def split_holdout(curves: Sequence[Curve], holdout: int) -> tuple:
    """(fitted, held out): the `holdout` largest sizes, with every run at them, are held out."""
    sizes = sorted({c.params for c in curves})
    if holdout < 0 or holdout >= len(sizes):
        raise FitError(f"--holdout {holdout} must be between 0 and the number of sizes minus one ({len(sizes) - 1})")
    held = set(sizes[len(sizes) - holdout:]) if holdout else set()
    return [c for c in curves if c.params not in held], [c for c in curves if c.params in held]


def curve_report(curves: Sequence[Curve], holdout: int = 0, early: Optional[Curve] = None,
                 target: Optional[Target] = None) -> tuple:
    """(report, fit, held-out curves): the JSON report described in the module docstring."""
    fitted, held = split_holdout(curves, holdout)
    if early is not None and any(c.name == early.name and c.params == early.params for c in fitted):
        raise FitError(f"the --early run {early.name} is among the fitted runs: leave it out of RUN_DIR or hold it "
                       "out (--holdout), else it is compared with a trend fitted to itself")
    fit = fit_curves(fitted)
    spread = seed_spread(fit, fitted)
    forecast: Optional[EarlyForecast] = None
    if early is not None:  # the drift only widens the flag's band, which needs the spread
        drift = Drift(None) if spread is None else extrapolation_drift(fitted, early, spread)
        forecast = early_forecast(fit, early, spread, drift)
    report = {
        "law": LAW, "fit": fit.natural(), "rms_rel": fit.rms_rel,
        "fitted": [{"name": c.name, "params": c.params} for c in fitted],
        "holdout": [curve_errors(fit, c) for c in held],
        "seed_spread": spread,
        "early": None if forecast is None else {**forecast.to_dict(), "verdict": forecast.verdict()},
        "target": None if target is None else {
            "config": target.config, "params": target.params, "final_updates": len(target.lrs),
            "final_loss": float(fit.predict(target.params, target.lrs, np.array([len(target.lrs)]))[0])},
    }
    return report, fit, held


def format_curve_report(report: dict) -> str:
    fit = dict(report["fit"])
    offsets = fit.pop("seed_offsets")
    bounded = fit.pop("at_bounds")
    lines = [*([f"curves: {report['metric']} loss ({report['metric_reason']})"] if "metric" in report else []),
             f"law: {report['law']}",
             "fit: " + ", ".join(f"{k} {v:.4g}" for k, v in fit.items())
             + "".join(f"; seed {s} {d * 100:+.2f}%" for s, d in offsets.items()),
             *([f"not pinned by these runs (ended on a bound of its range, so extrapolations rest on the bound): "
                f"{', '.join(bounded)}"] if bounded else []),
             f"fitted {len(report['fitted'])} runs ({', '.join(f['name'] for f in report['fitted'])}); "
             f"rms relative residual {report['rms_rel'] * 100:.3f}%"]
    for h in report["holdout"]:
        final = h["final"]
        lines.append(f"held out {h['name']} ({h['params']:.4g} params, {h['size_ratio']:.1f}x the largest fitted): "
                     f"mean |error| {h['mean_rel_error'] * 100:.3f}%, max {h['max_rel_error'] * 100:.3f}% over "
                     f"{h['records']} records after warm-up; final {final['actual']:.4f} predicted {final['predicted']:.4f}")
    spread = report["seed_spread"]
    lines.append("seed spread: " + ("unknown (no size trained with several seeds)" if spread is None
                                    else f"{spread * 100:.2f}% (σ of log loss between seeds)"))
    early = report["early"]
    if early:
        lines.append(f"early forecast for {early['name']} from updates ≤ {early['seen_updates']}: final loss "
                     f"{early['predicted_final']:.4f} at update {early['final_updates']} "
                     f"(trend {early['trend_final']:.4f}"
                     + ("" if early["actual_final"] is None else
                        f"; the run has finished: actual {early['actual_final']:.4f}, forecast "
                        f"{(early['predicted_final'] / early['actual_final'] - 1) * 100:+.2f}% off")
                     + f"); {early['verdict']}")
    target = report["target"]
    if target:
        lines.append(f"target {os.path.basename(target['config'])} ({target['params']:.4g} params): final loss "
                     f"{target['final_loss']:.4f} after {target['final_updates']} updates")
    return "\n".join(lines)
