"""The loss-prediction workflow behind megamu-predict: fit, hold out, predict, report.

`predict` returns the DESIGN.md "Predict" JSON (plus `level`, `interval_method`, residuals,
`selection`, `warnings`, `interval_source`, `interval_note` and, with two_var, the L(N, D) fit) and the
fitted curve for plotting; `format_report` turns that JSON into the table the tool prints. `selection` is
megamu.scaling.forecast's choice among forms by expanding-window cross-validation (with or without a floor;
for L(N, D) Chinchilla's sum, its tied-exponent version, the over-training form or the smooth maximum), with
its own holdout, prediction and interval, beside the classic fit the contract keeps.
When the classic fit's own interval means nothing (fewer than two residual degrees of freedom, or reaching
0 or 6× the loss) its intervals are the selection's, relative to the loss, or none, and `interval_note` says
why; `warnings` names a ladder whose loss does not fall with x and extreme exponents.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from megamu.scaling.fit import (
    FitError,
    evaluate_holdout,
    fit_power_law,
    nonnegative,
    prediction_interval,
    split_holdout,
)
from megamu.scaling.forecast import ND_FORMS, X_FORMS, forecast
from megamu.scaling.forms import FORMS
from megamu.scaling.points import LossPoint
from megamu.scaling.seeds import estimate_seed_offsets, point_seeds
from megamu.scaling.trend_checks import extreme_exponent, non_monotone
from megamu.scaling.two_var import fit_two_var

FORM = "a*x^b+c"
TWO_VAR_FORM = "E+A/N^alpha+B/D^beta"


def predict(
    points: Sequence[LossPoint],
    x_kind: str = "params",
    holdout: int = 0,
    target: Optional[float] = None,
    level: float = 0.9,
    bootstrap: int = 0,
    two_var: bool = False,
    target_tokens: Optional[float] = None,
    seed: int = 0,
    seed_offsets: bool = False,
) -> tuple:
    """Fit all but the `holdout` largest-x points; return (report dict, PowerLawFit).

    `seed_offsets`: the points are a ladder run once per seed at every size; fit the seed-averaged law
    with a per-seed offset (megamu.scaling.seeds), predict each held-out run at curve + its seed's
    offset, and score the mean of each held-out size's seeds ("holdout_mean").
    """
    if not 0 < level < 1:
        raise FitError(f"--level must be between 0 and 1, got {level}")
    if bootstrap < 0:
        raise FitError(f"--bootstrap N must be 0 (the delta method) or a number of resamples, got {bootstrap}")
    if target is not None and not (math.isfinite(target) and target > 0):
        raise FitError(f"--target must be a positive number, got {target}")
    x = np.array([p.x(x_kind) for p in points], dtype=float)
    loss = np.array([p.loss for p in points], dtype=float)
    used = split_holdout(x, holdout)
    offset = np.zeros(len(points))
    offsets: dict = {}
    if seed_offsets:
        seeds = point_seeds(points)
        offsets = estimate_seed_offsets([s for s, u in zip(seeds, used) if u], x[used], loss[used])
        unknown = sorted({s for s in seeds if s not in offsets})
        if unknown:
            raise FitError(f"held-out runs of seed(s) {unknown} have no fitted runs to estimate their offset from")
        offset = np.array([offsets[s] for s in seeds])
    try:
        fit = fit_power_law(x[used], (loss - offset)[used], absorbed_dof=max(len(offsets) - 1, 0))
    except FitError as exc:
        if not two_var:
            raise
        raise FitError(f"{exc}; with --two-var the report still starts with a·x^b + c along --x {x_kind}, which "
                       f"the points of an N×D grid need not follow: pass the --x they fall along "
                       f"(flops or tokens)") from None
    # One interval computation for held-out points and target: a bootstrap is then run once.
    eval_x = np.append(x[~used], [] if target is None else [target])
    intervals = prediction_interval(fit, eval_x, level, bootstrap, seed) if len(eval_x) else None
    n_held = int((~used).sum())
    target_x = [] if target is None else [float(target)]
    selection = _selection({"x": np.append(x, target_x)}, np.append(loss - offset, [np.nan] * len(target_x)),
                           np.append(used, [False] * len(target_x)), list(X_FORMS), level,
                           n_target=len(target_x))
    centres = np.append(fit.predict(x[~used]) + offset[~used], fit.predict(target_x))
    interval_note = _meaningless(fit, intervals, centres) if len(eval_x) else None
    if interval_note:
        intervals, interval_note = _from_selection(selection, centres, interval_note)
        offset_rows = np.zeros(n_held)  # the selection's widths are already placed on the predictions
    else:
        offset_rows = offset[~used]
    held_intervals = None if intervals is None else nonnegative(intervals[:n_held] + offset_rows[:, None])
    held = evaluate_holdout(fit, x[~used], loss[~used], held_intervals, offset[~used])
    residuals = loss - offset - fit.predict(x)

    report = {
        "form": FORM,
        "x": x_kind,
        "level": level,
        "interval_method": "bootstrap" if bootstrap > 0 else "delta",
        "fit": {"a": fit.a, "b": fit.b, "c": fit.c},
        "stderr": fit.stderr or {"a": None, "b": None, "c": None},
        "residual_std": fit.sigma if fit.dof > 0 else None,
        "dof": fit.dof,
        "points": [
            {"name": p.name, "x": float(xi), "loss": p.loss, "used": bool(u), "residual": float(r) if u else None,
             **({"seed": p.seed} if seed_offsets else {})}
            for p, xi, u, r in zip(points, x, used, residuals)
        ],
        "holdout": [
            {
                "x": h.x,
                "actual": h.actual,
                "predicted": h.predicted,
                "rel_error": h.rel_error,
                "interval": list(h.interval) if h.interval else None,
            }
            for h in held
        ],
        "prediction": None if target is None else {
            "x": float(target),
            "loss": float(fit.predict(target)),
            "interval": None if intervals is None else [float(intervals[-1, 0]), float(intervals[-1, 1])],
        },
    }
    report["selection"] = selection
    report["interval_source"] = None if intervals is None else (
        "selection" if interval_note else ("bootstrap" if bootstrap > 0 else "delta"))
    report["interval_note"] = interval_note
    report["warnings"] = (non_monotone(x[used], (loss - offset)[used], x_kind) + extreme_exponent("b", fit.b)
                          + _selection_exponents(selection))
    if seed_offsets:
        report["seed_offsets"] = {str(s): d for s, d in offsets.items()}
        report["holdout_mean"] = _holdout_means(fit, x[~used], loss[~used], offset[~used], level)
    if two_var:
        report["two_var"] = _two_var_report(
            [p for p, u in zip(points, used) if u], [p for p, u in zip(points, used) if not u],
            target, target_tokens, level,
        )
    return report, fit


def _meaningless(fit, intervals: Optional[np.ndarray], centres: np.ndarray) -> Optional[str]:
    """Why the classic fit's own interval says nothing (None when it is usable): one residual degree of
    freedom or none, or an interval reaching 0 or 6× the prediction."""
    if fit.dof < 2:
        return (f"the classic fit has {fit.dof} residual degree(s) of freedom ({len(fit.x)} points, 3 parameters): "
                f"its own interval would rest on {'no residual' if fit.dof < 1 else 'one residual'}")
    if intervals is None:
        return None
    if np.any(intervals[:, 0] <= 0) or np.any(intervals[:, 1] >= 6 * centres):
        return "the classic fit's delta-method interval reaches 0 or 6× the loss: the points do not pin a, b and c"
    return None


def _from_selection(selection: dict, centres: np.ndarray, why: str) -> tuple:
    """The cross-validated selection's relative interval placed on the classic predictions, with the note saying
    so; (None, note) when the selection has no interval either."""
    rows = [*selection.get("holdout", []), *([selection["prediction"]] if selection.get("prediction") else [])]
    if "error" in selection or len(rows) != len(centres) or any(r["interval"] is None for r in rows):
        return None, f"{why}; the cross-validated selection has no interval either, so none is given"
    ratios = np.array([[r["interval"][0] / r["predicted"], r["interval"][1] / r["predicted"]] for r in rows])
    return centres[:, None] * ratios, (f"{why}; the interval is the cross-validated selection's "
                                       f"({selection['chosen']}), relative to the loss")


def _selection_exponents(selection: dict) -> list:
    return [w for k, v in selection.get("fit", {}).items() if k.startswith("alpha_")
            for w in extreme_exponent(k.replace("alpha_", "alpha for "), v)]


def _selection(columns: dict, loss: np.ndarray, fitted: np.ndarray, candidates: list, level: float,
               n_target: int) -> dict:
    """The cross-validated choice of form, scored on the held-out rows; the last `n_target` rows (loss NaN)
    are the target's."""
    key = "x" if "x" in columns else "params"
    fitted = np.asarray(fitted, dtype=bool)
    try:
        result = forecast(columns, loss, columns[key], fitted, candidates, level)
    except FitError as exc:  # the classic fit above still stands; say why the selection could not run
        return {"error": str(exc)}
    held = np.flatnonzero(~fitted)
    rows = []
    for i, row in enumerate(held):
        interval = None if result.interval is None else [float(v) for v in result.interval[i]]
        rows.append({**{k: float(v[row]) for k, v in columns.items()}, "actual": float(loss[row]),
                     "predicted": float(result.predicted[i]), "interval": interval,
                     "rel_error": float(result.predicted[i] / loss[row] - 1)})
    targets, holdout = rows[len(rows) - n_target:], rows[:len(rows) - n_target]
    return {
        "chosen": FORMS[result.form].label,
        "reason": result.reason,
        "folds": result.folds,
        "cv_error": dict(result.cv_errors),
        "fit": result.fit.natural(),
        "notes": result.notes,
        "holdout": holdout,
        "prediction": None if not targets else {k: v for k, v in targets[0].items() if k not in ("actual", "rel_error")},
    }


def _holdout_means(fit, x: np.ndarray, actual: np.ndarray, offset: np.ndarray, level: float) -> list:
    """Per held-out size: the mean loss of its seeds against the seed-averaged curve (plus the mean offset of
    the seeds present: 0 when all are), with the delta-method interval for the mean of that many runs."""
    rows = []
    for size in np.unique(x):
        runs = actual[x == size]
        shift = float(offset[x == size].mean())
        predicted = float(fit.predict(size)) + shift
        interval = fit.interval(size, level, runs=len(runs))
        interval = None if interval is None else nonnegative(interval + shift)
        mean = float(runs.mean())
        rows.append({"x": float(size), "runs": len(runs), "actual": mean, "predicted": predicted,
                     "rel_error": (predicted - mean) / mean,
                     "interval": None if interval is None else [float(interval[0, 0]), float(interval[0, 1])]})
    return rows


def _two_var_report(
    used: list, held: list, target: Optional[float], target_tokens: Optional[float], level: float
) -> dict:
    """Fit L(N, D) on the used points; its own holdout and prediction at (target, target_tokens)."""
    fit = fit_two_var([p.x("params") for p in used], [p.x("tokens") for p in used], [p.loss for p in used])
    holdout = []
    for p in held:
        predicted = float(fit.predict(p.x("params"), p.x("tokens"))[0])
        lo, hi = fit.interval(p.x("params"), p.x("tokens"), level)[0]
        holdout.append({
            "params": p.x("params"), "tokens": p.x("tokens"), "actual": p.loss, "predicted": predicted,
            "rel_error": (predicted - p.loss) / p.loss, "interval": [float(lo), float(hi)],
        })
    prediction = None
    if target is not None and target_tokens is None:
        raise FitError("--two-var with --target also needs --target-tokens (the token count D at the target)")
    extra = [] if target is None else [float(target)]
    extra_tokens = [] if target is None else [float(target_tokens)]
    rows = used + held
    selection = _selection(
        {"params": np.array([p.x("params") for p in rows] + extra), "tokens": np.array([p.x("tokens") for p in rows] + extra_tokens)},
        np.array([p.loss for p in rows] + [np.nan] * len(extra)),
        np.array([True] * len(used) + [False] * (len(held) + len(extra))), list(ND_FORMS), level,
        len(extra))
    if target is not None:
        lo, hi = fit.interval(target, target_tokens, level)[0]
        prediction = {
            "params": float(target), "tokens": float(target_tokens),
            "loss": float(fit.predict(target, target_tokens)[0]), "interval": [float(lo), float(hi)],
        }
    return {
        "form": TWO_VAR_FORM,
        "fit": {"E": fit.E, "A": fit.A, "alpha": fit.alpha, "B": fit.B, "beta": fit.beta},
        "stderr": fit.stderr,
        "residual_std_log": fit.sigma,
        "holdout": holdout,
        "prediction": prediction,
        "selection": selection,
    }


def _no_dof_line(report: dict) -> str:
    """"exact fit" only when the curve passes through the fitted points; bounds (b < 0, 0 ≤ c ≤ min loss) can
    keep it from doing so, e.g. on a ladder whose loss does not fall."""
    worst = max(abs(p["residual"]) / p["loss"] for p in report["points"] if p["used"])
    if worst <= 1e-6:
        return "  exact fit: no residual degrees of freedom, no uncertainty"
    return (f"  no residual degrees of freedom, yet the fit misses a point by {worst * 100:.2g}%: "
            f"a*x^b+c cannot pass through these points (see the warnings)")


def _pm(value: float, err: Optional[float]) -> str:
    return f"{value:.6g} ± {err:.3g}" if err is not None else f"{value:.6g} ± n/a"


def _interval(interval: Optional[list]) -> str:
    return f"[{interval[0]:.5g}, {interval[1]:.5g}]" if interval else "n/a (see the note)"


def format_report(report: dict) -> str:
    """The human-readable table: fit, points with residuals, holdout, prediction."""
    n_used = sum(p["used"] for p in report["points"])
    pct = f"{report['level'] * 100:g}%"
    method = {"delta": "delta method", "bootstrap": "studentized residual bootstrap",
              "selection": "the cross-validated selection's"}[report.get("interval_source") or report["interval_method"]]
    fit, err = report["fit"], report["stderr"]
    lines = [
        f"Fit  L = a·x^b + c  with x = {report['x']}  ({n_used} points fitted, {len(report['holdout'])} held out)",
        f"  a = {_pm(fit['a'], err['a'])}",
        f"  b = {_pm(fit['b'], err['b'])}",
        f"  c = {_pm(fit['c'], err['c'])}",
        f"  residual std = {report['residual_std']:.4g} on {report['dof']} degree(s) of freedom"
        if report["residual_std"] is not None else _no_dof_line(report),
        "",
        f"  {'name':<24} {report['x']:>12} {'loss':>9} {'used':>5} {'residual':>10}",
    ]
    for p in report["points"]:
        residual = f"{p['residual']:+.2e}" if p["residual"] is not None else "held out"
        lines.append(f"  {p['name'][:24]:<24} {p['x']:>12.4g} {p['loss']:>9.4f} {str(p['used']):>5} {residual:>10}")
    if report["holdout"]:
        lines += ["", f"Holdout ({pct} prediction interval, {method})",
                  f"  {report['x']:>12} {'actual':>9} {'predicted':>9} {'rel.err':>8}  interval"]
        for h in report["holdout"]:
            inside = "" if not h["interval"] else ("  inside" if h["interval"][0] <= h["actual"] <= h["interval"][1]
                                                   else "  OUTSIDE")
            lines.append(f"  {h['x']:>12.4g} {h['actual']:>9.4f} {h['predicted']:>9.4f} "
                         f"{h['rel_error'] * 100:>7.2f}%  {_interval(h['interval'])}{inside}")
    if report.get("seed_offsets"):
        lines += ["", "Seed offsets (loss above the seed-averaged law): "
                  + ", ".join(f"seed {s} {d:+.4f}" for s, d in report["seed_offsets"].items())]
        for h in report["holdout_mean"]:
            inside = "" if not h["interval"] else ("  inside" if h["interval"][0] <= h["actual"] <= h["interval"][1]
                                                   else "  OUTSIDE")
            lines.append(f"  mean of {h['runs']} seeds at {report['x']} = {h['x']:.4g}: actual {h['actual']:.4f}, "
                         f"predicted {h['predicted']:.4f} ({h['rel_error'] * 100:+.2f}%), {pct} "
                         f"{_interval(h['interval'])}{inside}")
    if report["prediction"]:
        pred = report["prediction"]
        lines += ["", f"Prediction at {report['x']} = {pred['x']:.4g}: loss {pred['loss']:.5g}, "
                      f"{pct} interval {_interval(pred['interval'])} ({method})"]
    if report.get("interval_note"):
        lines += [f"  note on the intervals above: {report['interval_note']}"]
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    lines += _selection_lines(report["selection"], pct)
    if "two_var" in report:
        tv = report["two_var"]
        lines += ["", "Two-variable fit  L = E + A/N^alpha + B/D^beta  (on log L)"]
        lines += [f"  {k} = {_pm(v, tv['stderr'][k])}" for k, v in tv["fit"].items()]
        for h in tv["holdout"]:
            lines.append(f"  held out N={h['params']:.4g} D={h['tokens']:.4g}: actual {h['actual']:.4f}, predicted "
                         f"{h['predicted']:.4f} ({h['rel_error'] * 100:+.2f}%), {pct} {_interval(h['interval'])}")
        if tv["prediction"]:
            p = tv["prediction"]
            lines.append(f"  prediction at N={p['params']:.4g} D={p['tokens']:.4g}: loss {p['loss']:.5g}, "
                         f"{pct} interval {_interval(p['interval'])}")
        lines += _selection_lines(tv["selection"], pct)
    return "\n".join(lines)


def _at(row: dict) -> str:
    return ", ".join(f"{k}={row[k]:.4g}" for k in ("x", "params", "tokens") if k in row)


def _selected_interval(row: dict) -> str:
    return _interval(row["interval"]) if row["interval"] else "n/a (see the notes)"


def _selection_lines(selection: dict, pct: str) -> list:
    """The cross-validated choice of form: what won and why, what it cannot know, and its forecasts."""
    if "error" in selection:
        return ["", f"Form selection by cross-validation: not possible ({selection['error']})"]
    lines = ["", f"Form selection by expanding-window cross-validation: {selection['reason']}"]
    lines += [f"  note: {note}" for note in selection["notes"]]
    for h in selection["holdout"]:
        lines.append(f"  held out {_at(h)}: actual {h['actual']:.4f}, predicted {h['predicted']:.4f} "
                     f"({h['rel_error'] * 100:+.2f}%), {pct} {_selected_interval(h)}")
    if selection["prediction"]:
        p = selection["prediction"]
        lines.append(f"  prediction at {_at(p)}: loss {p['predicted']:.5g}, {pct} {_selected_interval(p)}")
    return lines
