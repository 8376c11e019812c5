"""Forecast held-out losses: choose the law by expanding-window cross-validation, fit it, and give an
interval that says how far its own past extrapolations missed.

Cross-validation mimics the real task: fit the k smallest sizes, predict the next one, for every k the
forms can be fitted at. The form with the smallest mean |relative error| over the folds all forms could
fit wins (ties go to the form with fewer parameters). "Size" is what a ladder grows along: params for a
ladder of model sizes, compute for an IsoFLOP grid.

Badly under-trained runs (few tokens per parameter, e.g. the early budgets of an IsoFLOP grid trained at a
constant learning rate) can follow another curve than the targets. When every target has at least t tokens
per parameter, fitting without the runs below t (t in UNDERTRAINED_RATIOS) is one more candidate: the
cross-validation scores it on the same in-regime points as the fit with every run, so the runs are dropped
only when that predicts better, and the forecast says how many were dropped.

The interval on log L separates the two ways a forecast misses. Scatter of single runs about the law: the
fit's residual sd at a Student-t quantile on its degrees of freedom. Drift of the law as it is
extrapolated: each fold's mean log error per e-fold of extrapolation (its mean distance beyond the fitted
range), whose root mean square over the folds, s_cv, gives a point d e-folds out s_cv·d at a Student-t
quantile on as many degrees of freedom as folds. The drift is the curve's uncertainty as measured, so the
delta method's curve term is not added to it (counting it twice: on the 18 published-ladder splits 89%
coverage at a median half-width of 5.8% of the loss, against 88% at 5.3% without; a normal quantile
instead of Student's t, 81% at 4.5%). (Dividing every single error by its distance instead would count
run-to-run scatter as drift and magnify it by the target's distance: twice as wide for no better
coverage.) Without a fold the interval is the delta method's. When the data do not pin the law (as many
points as parameters, or a floor with log E uncertain by more than a factor e) the residuals are
meaningless: the scatter is then the folds' spread about their mean, and the forecast says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from megamu.errors import FitError
from megamu.scaling.forms import FORMS, Form, LogFit, design, fit_form, t_quantile

# The candidates the cross-validation chooses among: for one x, and for separate params and tokens.
X_FORMS = ("x_floor", "x_pure")
ND_FORMS = ("nd_sum", "nd_tied", "cm_over", "nd_smax")
MAX_FOLDS = 5  # the folds nearest the target; earlier ones extrapolate from a handful of tiny runs
MAX_SIZE_BINS = 8  # sizes are binned geometrically when a ladder has more distinct ones (digitised points)
# Tokens per parameter below which runs may be left out of an L(N, D) fit (chosen by cross-validation, see
# above). On the published ladders this took the suite's mean held-out error from 3.64% to 3.03%: Porian's
# constant-LR grids 12.7% -> 7.8%, Li et al. 5.4% -> 1.2%, Chinchilla 3.6% -> 1.4%, but Porian's cosine grids
# 2.2% -> 5.3% (there the cross-validation preferred the cut and the targets did not).
UNDERTRAINED_RATIOS = (1.0, 2.0)


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
    min_tokens_per_param: float = 0.0  # fitted runs below this D/N were left out (0: none)
    excluded: int = 0  # how many fitted runs that left out


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


@dataclass(frozen=True)
class Variant:
    """One candidate of the cross-validation: a form, its fitting options and the runs it is fitted on."""

    form: str
    options: FitOptions
    min_ratio: float = 0.0  # leave out fitted runs with fewer tokens per parameter (0: keep every run)

    def kept(self, ratio: Optional[np.ndarray], runs: int) -> np.ndarray:
        """Mask of the `runs` runs (tokens per parameter `ratio`, None without params and tokens) it may fit."""
        return np.ones(runs, dtype=bool) if self.min_ratio == 0 else ratio >= self.min_ratio


def cross_validate(form: Form, columns: dict, loss: np.ndarray, bins: np.ndarray, options: FitOptions,
                   keep: Optional[np.ndarray] = None, scored: Optional[np.ndarray] = None) -> dict:
    """Fold k (the k smallest size bins fitted, bin k predicted) -> (log errors, distances); folds the form
    cannot be fitted on are left out. `keep`: the runs a fit may use; `scored`: the runs a fold is scored on
    (both default to every run)."""
    out = {}
    keep = np.ones(len(loss), dtype=bool) if keep is None else keep
    scored = np.ones(len(loss), dtype=bool) if scored is None else scored
    for k in range(1, int(bins.max()) + 1):
        train, test = (bins < k) & keep, (bins == k) & scored
        if train.sum() < form.min_points or not test.any():
            continue
        try:
            fit = fit_form(form, design(form, _subset(columns, train)), loss[train], options.huber, options.starts)
        except FitError:
            continue
        log_err = np.log(fit.predict(design(form, _subset(columns, test)))) - np.log(loss[test])
        out[k] = (log_err, distance(columns, train, test))
    return out


def tokens_per_param(columns: dict) -> Optional[np.ndarray]:
    """D/N of every row, or None when the forecast has no separate params and tokens."""
    if columns.get("params") is None or columns.get("tokens") is None:
        return None
    return np.asarray(columns["tokens"], dtype=float) / np.asarray(columns["params"], dtype=float)


def _cutoffs(ratio: Optional[np.ndarray], fitted: np.ndarray) -> list:
    """The D/N cut-offs worth trying: below every target's D/N, each leaving out at least one run more than
    the previous one and keeping most runs."""
    cuts = [0.0]
    if ratio is None or fitted.all():
        return cuts
    fit_ratio = ratio[fitted]
    for t in UNDERTRAINED_RATIOS:
        dropped = int(np.sum(fit_ratio < t))
        if t <= ratio[~fitted].min() and dropped > int(np.sum(fit_ratio < cuts[-1])) and dropped < len(fit_ratio) / 2:
            cuts.append(t)
    return cuts


def forecast(columns: dict, loss: Sequence[float], size: Sequence[float], fitted: np.ndarray,
             candidates: Sequence[str], level: float = 0.9,
             options: "FitOptions | Sequence[FitOptions]" = DEFAULT_OPTIONS) -> Forecast:
    """Choose among `candidates` (keys of forms.FORMS) by cross-validation on the fitted points, fit the
    choice on all of them and forecast the others (the rows of `columns` where `fitted` is False).

    Several `options` make the fitting loss part of the choice too (each form under each option); on equal
    footing the earlier option wins. With params and tokens, leaving out runs far less trained than every
    target is part of the choice as well (UNDERTRAINED_RATIOS)."""
    loss = np.asarray(loss, dtype=float)
    fitted = np.asarray(fitted, dtype=bool)
    fit_columns = _subset(columns, fitted)
    bins = size_bins(np.asarray(size, dtype=float)[fitted])
    ratio = tokens_per_param(columns)
    cuts = _cutoffs(ratio, fitted)
    fit_ratio = None if ratio is None else ratio[fitted]
    # Every variant is scored on the same runs, those no cut-off leaves out.
    scored = None if len(cuts) == 1 else fit_ratio >= cuts[-1]
    variants = [Variant(name, o, cut) for cut in cuts
                for o in ((options,) if isinstance(options, FitOptions) else options) for name in candidates]
    with_options = len({v.options for v in variants}) > 1
    folds = {v: cross_validate(FORMS[v.form], fit_columns, loss[fitted], bins, v.options,
                               v.kept(fit_ratio, len(bins)), scored) for v in variants}
    competing = _competing(variants, folds, bins, fit_ratio)
    uncompared = [_label(v, with_options) for v in variants if v not in competing]
    common = sorted(set.intersection(*(set(folds[v]) for v in competing)))[-MAX_FOLDS:]
    per_fold = {v: np.array([np.mean(np.abs(np.expm1(folds[v][k][0]))) for k in common]) for v in competing}
    scores = {_label(v, with_options): float(per_fold[v].mean()) if v in per_fold and common else None
              for v in variants}
    # What the one-SE rule's standard error is taken over: the folds' means, or the points of a single fold.
    spread = per_fold if len(common) != 1 else \
        {v: np.abs(np.expm1(folds[v][common[0]][0])) for v in competing}
    refused, why_refused = [], []
    while True:  # the choice refitted on every fitted run; one that is degenerate there gives way to the next
        chosen, reason = _choose([v for v in competing if v not in refused], per_fold, spread, with_options)
        form = FORMS[chosen.form]
        used = fitted & chosen.kept(ratio, len(loss))
        try:
            fit = fit_form(form, design(form, _subset(columns, used)), loss[used], chosen.options.huber,
                           chosen.options.starts)
            break
        except FitError as exc:
            refused.append(chosen)
            if len(refused) == len(competing):
                raise
            why_refused.append(f"{_label(chosen, with_options)} could not be refitted on every run ({exc})")
    reason = "; ".join([reason, *why_refused,
                        *([f"not compared (no fold could be fitted with them): {', '.join(uncompared)}"]
                          if uncompared else [])])
    held = ~fitted
    z_held = design(form, _subset(columns, held))
    predicted = fit.predict(z_held) if held.any() else np.zeros(0)
    cv = [folds[chosen][k] for k in common]
    interval, notes = _interval(fit, cv, z_held, distance(columns, used, held), predicted, level)
    excluded = int(fitted.sum() - used.sum())
    if excluded:
        notes.insert(0, f"{excluded} of {int(fitted.sum())} fitted runs left out: fewer than {chosen.min_ratio:g} "
                        f"tokens per parameter (every target has at least {ratio[held].min():.3g}), and the "
                        f"fit without them predicted better in cross-validation")
    return Forecast(chosen.form, fit, predicted, interval, scores, len(common), reason, notes, chosen.options,
                    chosen.min_ratio, excluded)


def _competing(variants: list, folds: dict, bins: np.ndarray, ratio: Optional[np.ndarray]) -> list:
    """The variants the cross-validation compares. One that no fold could be fitted on cannot be compared: if its
    largest fold had the points it needs, it is degenerate on these runs and left out; if not, it is short of
    runs, and it is left out when at least two others can be compared, else the comparison is not possible and
    every variant stays, so that none is common to all folds and the first (the classic form) is the default."""
    largest_fold = bins < bins.max()
    fitted = [v for v in variants if folds[v]]
    short = [v for v in variants
             if not folds[v] and FORMS[v.form].min_points > (largest_fold & v.kept(ratio, len(bins))).sum()]
    if len(fitted) >= 2 or not short:
        return fitted or list(variants)
    return [v for v in variants if v in fitted or v in short]


def _label(variant: Variant, with_options: bool) -> str:
    label = FORMS[variant.form].label
    if with_options:
        fitting = "least squares" if variant.options.huber is None else f"Huber {variant.options.huber:g}"
        label = f"{label} ({fitting}, {variant.options.starts})"
    return label + (f" on D/N >= {variant.min_ratio:g}" if variant.min_ratio else "")


def _choose(variants: list, per_fold: dict, spread: dict, with_options: bool) -> tuple:
    """The one-standard-error rule: the variant with the fewest parameters whose mean fold error is within one
    standard error of the best; a richer form must earn its parameters beyond fold-to-fold noise. The standard
    error is over folds, or with a single fold over its points (`spread`): one fold has no fold-to-fold
    spread, and a zero standard error would let a richer form win by any margin. Among equally many
    parameters the smallest error wins."""
    folds = len(next(iter(per_fold.values())))
    if not folds:
        return variants[0], f"no fold every form could be fitted on: {_label(variants[0], with_options)} by default"
    means = {v: float(per_fold[v].mean()) for v in variants}
    best = min(variants, key=lambda v: means[v])
    n = len(spread[best])
    se = float(spread[best].std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    chosen = min((v for v in variants if means[v] <= means[best] + se),
                 key=lambda v: (FORMS[v.form].n_params, means[v]))
    others = ", ".join(f"{_label(v, with_options)} {means[v] * 100:.2f}%" for v in variants if v != chosen)
    why = "smallest cross-validated error" if chosen == best else \
        f"fewest parameters within one standard error ({se * 100:.2f}%) of the best"
    return chosen, (f"{_label(chosen, with_options)}: {why}, {means[chosen] * 100:.2f}% over {folds} fold(s)"
                    + (f" (vs {others})" if others else ""))


def drift_and_scatter(cv: list) -> tuple:
    """From the folds' (log errors, distances): s_cv, the root mean square over folds of each fold's mean log
    error per e-fold of extrapolation, and the root mean square spread of single errors about their fold's
    mean (run-to-run scatter)."""
    drift = [np.mean(e) / max(float(np.mean(d)), 1e-6) for e, d in cv]
    spread = np.concatenate([e - np.mean(e) for e, _ in cv])
    return float(np.sqrt(np.mean(np.square(drift)))), float(np.sqrt(np.mean(spread**2)))


def _interval(fit: LogFit, cv: list, z: np.ndarray, dist: np.ndarray, predicted: np.ndarray,
              level: float) -> tuple:
    """Interval on log L: run-to-run scatter (the fit's residual sd, else the folds' spread) and drift per
    e-fold of extrapolation (s_cv), each at its t quantile, added in quadrature; without folds, the delta
    method."""
    notes = []
    trusted = fit.dof > 0 and fit.floor_identified()
    if fit.dof <= 0:
        notes.append(f"as many points as parameters ({fit.form.n_params}): the fit passes through them, so its "
                     f"residuals say nothing about its error")
    elif not fit.floor_identified():
        notes.append(f"the floor E is not identified (E = {fit.natural()['E']:.4g}, log E ± "
                     f"{np.sqrt(fit.covariance[0, 0]):.2g}; its bound is the smallest loss, {fit.min_loss:.4g}): "
                     f"the delta method cannot measure what the data leave unknown")
    if not cv and not trusted:
        notes.append("no cross-validation fold either: no interval can be given")
        return None, notes
    if not cv:
        half = t_quantile(level, fit.dof) * fit.log_sd(z)
    else:
        s_cv, scatter = drift_and_scatter(cv)
        t_cv = t_quantile(level, len(cv))
        # The folds measure how the law drifts as it is extrapolated, so the delta method gives only the
        # run-to-run scatter σ: its curve term would count the curve's uncertainty a second time.
        run = t_quantile(level, fit.dof) * fit.sigma if trusted else t_cv * scatter
        half = np.sqrt(run**2 + (t_cv * s_cv * dist) ** 2)
        if not trusted:
            notes.append(f"interval from the cross-validated spread alone ({len(cv)} fold(s): drift "
                         f"{s_cv * 100:.2g}% per e-fold of extrapolation, scatter {scatter * 100:.2g}%)")
    if np.any(half > np.log(6.0)):
        notes.append("the interval spans more than 6× the loss: the data do not pin the law at that distance")
    centre = np.log(predicted)
    return np.exp(np.stack([centre - half, centre + half], axis=1)), notes
