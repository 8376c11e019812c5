"""Forecast held-out losses: choose the law by expanding-window cross-validation, fit it, and give an
interval that says how far its own past extrapolations missed.

Cross-validation mimics the real task: fit the k smallest sizes, predict the next one, for every k the
forms can be fitted at. The form with the smallest mean |relative error| over the folds all forms could
fit wins (ties go to the form with fewer parameters). "Size" is what a ladder grows along: params for a
ladder of model sizes, compute for an IsoFLOP grid.

The interval on log L adds to the delta method a term for extrapolation: the cross-validated errors, as a
least-squares slope through 0 of log error against log distance beyond the fitted range, give an error
per e-fold of extrapolation, s_cv; a point d e-folds out gets s_cv·d on top of the fit's own sd, with a
Student-t quantile on as many degrees of freedom as there were folds. When the data do not pin the law
(as many points as parameters, or a floor with log E uncertain by more than a factor e) the delta method
is meaningless: the interval is then the cross-validated part alone, and the forecast says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from megamu.errors import FitError
from megamu.scaling.forms import FORMS, Form, LogFit, design, fit_form, t_quantile

MAX_FOLDS = 5  # the folds nearest the target; earlier ones extrapolate from a handful of tiny runs
MAX_SIZE_BINS = 8  # sizes are binned geometrically when a ladder has more distinct ones (digitised points)


@dataclass(frozen=True)
class FitOptions:
    huber: Optional[float] = None  # Huber δ on log L; None: least squares
    starts: str = "grid"  # a key of forms.START_GRIDS


# Chosen by benchmarks/bench_forecast.py --only-options on the 18 published-ladder splits: least squares on
# log L from the small grid, suite mean held-out error 3.64%, against Huber δ=1e-2 4.92%, Huber δ=1e-3 5.42%
# (one split left unfittable), the wide grid of starts 3.90% and the per-ladder cross-validated choice between
# least squares and Huber 3.90%.
DEFAULT_OPTIONS = FitOptions()


@dataclass(frozen=True)
class Forecast:
    form: str
    fit: LogFit
    predicted: np.ndarray
    interval: Optional[np.ndarray]  # shape (n, 2); None when nothing honest can be given
    cv_errors: dict  # form label -> mean |rel err| over the common folds (None: no common fold)
    folds: int
    reason: str
    notes: list = field(default_factory=list)
    options: FitOptions = DEFAULT_OPTIONS  # the fitting loss and starts the forecast used


def size_bins(size: np.ndarray) -> np.ndarray:
    """An integer bin per point, increasing with size: distinct sizes, or geometric bins when too many."""
    distinct = np.unique(size)
    if len(distinct) <= MAX_SIZE_BINS:
        return np.searchsorted(distinct, size)
    edges = np.geomspace(distinct[0], distinct[-1], MAX_SIZE_BINS + 1)[1:-1]
    return np.searchsorted(edges, size, side="right")


def distance(columns: dict, fitted: np.ndarray, at: np.ndarray) -> np.ndarray:
    """How many e-folds beyond the fitted range each evaluated point lies, in any of its variables or in
    compute 6ND (a point can be within the fitted N and D and still far beyond the fitted compute)."""
    names = [c for c in ("x", "params", "tokens") if columns.get(c) is not None]
    values = {c: np.asarray(columns[c], dtype=float) for c in names}
    if "params" in values and "tokens" in values:
        values["compute"] = values["params"] * values["tokens"]
    out = np.zeros(int(np.sum(at)))
    for v in values.values():
        out = np.maximum(out, np.log(v[at] / v[fitted].max()))
    return np.maximum(out, 0.0)


def _subset(columns: dict, mask: np.ndarray) -> dict:
    return {k: None if v is None else np.asarray(v)[mask] for k, v in columns.items()}


def cross_validate(form: Form, columns: dict, loss: np.ndarray, bins: np.ndarray,
                   options: FitOptions) -> dict:
    """Fold k (the k smallest size bins fitted, bin k predicted) -> (log errors, distances); folds the form
    cannot be fitted on are left out."""
    out = {}
    for k in range(1, int(bins.max()) + 1):
        train, test = bins < k, bins == k
        if train.sum() < form.n_params or not test.any():
            continue
        try:
            fit = fit_form(form, design(form, _subset(columns, train)), loss[train], options.huber, options.starts)
        except FitError:
            continue
        log_err = np.log(fit.predict(design(form, _subset(columns, test)))) - np.log(loss[test])
        out[k] = (log_err, distance(columns, train, test))
    return out


def forecast(columns: dict, loss: Sequence[float], size: Sequence[float], fitted: np.ndarray,
             candidates: Sequence[str], level: float = 0.9,
             options: "FitOptions | Sequence[FitOptions]" = DEFAULT_OPTIONS) -> Forecast:
    """Choose among `candidates` (keys of forms.FORMS) by cross-validation on the fitted points, fit the
    choice on all of them and forecast the others (the rows of `columns` where `fitted` is False).

    Several `options` make the fitting loss part of the choice too (each form under each option); on equal
    footing the earlier option wins."""
    loss = np.asarray(loss, dtype=float)
    fitted = np.asarray(fitted, dtype=bool)
    fit_columns = _subset(columns, fitted)
    bins = size_bins(np.asarray(size, dtype=float)[fitted])
    variants = [(name, o) for o in ((options,) if isinstance(options, FitOptions) else options) for name in candidates]
    folds = {v: cross_validate(FORMS[v[0]], fit_columns, loss[fitted], bins, v[1]) for v in variants}
    common = sorted(set.intersection(*(set(f) for f in folds.values())))[-MAX_FOLDS:]
    per_fold = {v: np.array([np.mean(np.abs(np.expm1(f[k][0]))) for k in common]) for v, f in folds.items()}
    chosen, reason = _choose(variants, per_fold)
    name, chosen_options = chosen
    scores = {_label(v, len(variants) > len(candidates)): float(e.mean()) if len(e) else None
              for v, e in per_fold.items()}
    form = FORMS[name]
    fit = fit_form(form, design(form, fit_columns), loss[fitted], chosen_options.huber, chosen_options.starts)
    held = ~fitted
    z_held = design(form, _subset(columns, held))
    predicted = fit.predict(z_held) if held.any() else np.zeros(0)
    cv = [folds[chosen][k] for k in common]
    interval, notes = _interval(fit, cv, z_held, distance(columns, fitted, held), predicted, level)
    return Forecast(name, fit, predicted, interval, scores, len(common), reason, notes, chosen_options)


def _label(variant: tuple, with_options: bool) -> str:
    name, options = variant
    if not with_options:
        return FORMS[name].label
    fitting = "least squares" if options.huber is None else f"Huber {options.huber:g}"
    return f"{FORMS[name].label} ({fitting}, {options.starts})"


def _choose(variants: list, per_fold: dict) -> tuple:
    """The one-standard-error rule: the variant with the fewest parameters whose mean fold error is within one
    standard error (over folds) of the best; a richer form must earn its parameters beyond fold-to-fold noise."""
    folds = len(next(iter(per_fold.values())))
    with_options = len({o for _, o in variants}) > 1
    if not folds:
        return variants[0], f"no fold every form could be fitted on: {_label(variants[0], with_options)} by default"
    means = {v: float(per_fold[v].mean()) for v in variants}
    best = min(variants, key=lambda v: means[v])
    se = float(per_fold[best].std(ddof=1) / np.sqrt(folds)) if folds > 1 else 0.0
    chosen = min((v for v in variants if means[v] <= means[best] + se),
                 key=lambda v: (FORMS[v[0]].n_params, means[v]))
    others = ", ".join(f"{_label(v, with_options)} {means[v] * 100:.2f}%" for v in variants if v != chosen)
    why = "smallest cross-validated error" if chosen == best else \
        f"fewest parameters within one standard error ({se * 100:.2f}%) of the best"
    return chosen, (f"{_label(chosen, with_options)}: {why}, {means[chosen] * 100:.2f}% over {folds} fold(s)"
                    + (f" (vs {others})" if others else ""))


def _interval(fit: LogFit, cv: list, z: np.ndarray, dist: np.ndarray, predicted: np.ndarray,
              level: float) -> tuple:
    """Interval on log L: fit sd (delta method) and extrapolation error per e-fold, each at its t quantile."""
    notes = []
    if cv:
        errors = np.concatenate([e for e, _ in cv])
        distances = np.concatenate([d for _, d in cv])
        s_cv = float(np.sqrt(np.sum(errors**2) / max(np.sum(distances**2), 1e-12)))
        cv_half = t_quantile(level, len(cv)) * s_cv * dist
    else:
        cv_half = None
    trusted = fit.dof > 0 and fit.floor_identified()
    if fit.dof <= 0:
        notes.append(f"as many points as parameters ({fit.form.n_params}): the fit is exact, so its residuals "
                     f"say nothing about its error")
    elif not fit.floor_identified():
        notes.append(f"the floor E is not identified (E = {fit.natural()['E']:.4g}, log E ± "
                     f"{np.sqrt(fit.covariance[0, 0]):.2g}; its bound is the smallest loss, {fit.min_loss:.4g}): "
                     f"the delta method cannot measure what the data leave unknown")
    if trusted:
        half = t_quantile(level, fit.dof) * fit.log_sd(z)
        if cv_half is not None:
            half = np.sqrt(half**2 + cv_half**2)
    elif cv_half is not None:
        notes.append(f"interval from the cross-validated spread alone ({len(cv)} fold(s))")
        half = cv_half
    else:
        notes.append("no cross-validation fold either: no interval can be given")
        return None, notes
    if np.any(half > np.log(6.0)):
        notes.append("the interval spans more than 6× the loss: the data do not pin the law at that distance")
    centre = np.log(predicted)
    return np.exp(np.stack([centre - half, centre + half], axis=1)), notes
