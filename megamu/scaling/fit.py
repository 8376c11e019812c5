"""Fit L = a·x^b + c to (x, loss) points and predict the loss at a larger x, with an interval.

The fit runs in a well-conditioned parametrisation: x is divided by the geometric mean of the
fitted x (so x̃ is of order one whatever the units), and the amplitude is fitted as its log
(so a > 0 without a bound and its scale does not dwarf b and c). Bounded least squares from
several starts keeps b < 0 and 0 ≤ c ≤ min(loss), the physically meaningful region: the loss
falls with x towards an irreducible floor that cannot exceed any observed loss.

Uncertainty (nominal level chosen by the caller, 90% by default in the tool):

- delta method (default): the parameter covariance s²(JᵀJ)⁻¹ from the Jacobian at the
  optimum, propagated to the prediction by the delta method, plus the residual variance s²,
  with a Student-t quantile on n − 3 degrees of freedom. This is a *prediction* interval: it
  is meant to contain the loss an actual run at x would report (curve uncertainty and run-to-
  run noise), which is what a held-out run is compared against. It is cheap and
  deterministic, and over many synthetic seeds it covers at about its nominal rate.
- ``bootstrap=N`` (tool: ``--bootstrap N``): a studentized residual bootstrap. Residuals,
  rescaled by √(n/(n−3)) for the degrees of freedom the fit used, are resampled onto the
  fitted curve and refitted; each resample gives the studentized error of predicting a new
  run, (new run − refit prediction) / refit's delta-method sd, and the interval is the fit's
  prediction plus the percentiles of that error times the fit's sd. It keeps the delta
  method's scale but takes the shape (asymmetry, heavy tails of a poorly pinned-down curve)
  from the data instead of the linearisation. Residuals rather than pairs are resampled
  because a pairs resample of a handful of points often drops the very points that pin down
  b; studentized rather than plain percentiles because with few points the plain percentile
  interval under-covers (measured 78% at nominal 90% with 8 points; studentized: 91%, 100 seeds each).

Neither can account for a ladder that does not follow the power law (a misspecified form,
un-transferred hyper-parameters); `holdout` is the honest check for that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from scipy import optimize, stats

from megamu.errors import FitError

N_PARAMS = 3
_B_MAX = -1e-6  # b < 0 strictly: b = 0 makes a and c indistinguishable
_B_MIN = -10.0
_START_EXPONENTS = -np.geomspace(0.01, 4.0, 48)
_MAX_STARTS = 3


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted L = a·x^b + c with its covariance in the internal parametrisation."""

    a: float
    b: float
    c: float
    stderr: Optional[dict]  # {"a", "b", "c"}; None when no degree of freedom is left
    x: np.ndarray
    loss: np.ndarray
    x_scale: float  # geometric mean of the fitted x; x̃ = x / x_scale
    theta: np.ndarray  # (log a·x_scale^b, b, c)
    covariance: Optional[np.ndarray]  # of theta; None when no degree of freedom is left
    sigma: float  # residual standard deviation, sqrt(SSR / dof); 0 when dof == 0
    absorbed_dof: int = 0  # degrees of freedom the caller spent on the data before the fit (seed offsets)

    @property
    def dof(self) -> int:
        return len(self.x) - N_PARAMS - self.absorbed_dof

    @property
    def residuals(self) -> np.ndarray:
        """Observed minus fitted loss at the fitted points."""
        return self.loss - self.predict(self.x)

    def predict(self, x: "np.ndarray | float") -> np.ndarray:
        return _model(self.theta, np.asarray(x, dtype=float) / self.x_scale)

    def interval(self, x: "np.ndarray | float", level: float, runs: int = 1) -> Optional[np.ndarray]:
        """Delta-method prediction interval for the mean loss of `runs` new runs at x, shape (len(x), 2);
        None with no degree of freedom."""
        if self.covariance is None:
            return None
        centre = self.predict(np.atleast_1d(x))
        half = stats.t.ppf(0.5 + level / 2, self.dof) * self.prediction_sd(x, runs)
        return np.stack([centre - half, centre + half], axis=1)

    def prediction_sd(self, x: "np.ndarray | float", runs: int = 1) -> np.ndarray:
        """Standard deviation of the mean loss of `runs` new runs about the fit at x: curve (delta method)
        and run-to-run noise."""
        x_tilde = np.atleast_1d(np.asarray(x, dtype=float)) / self.x_scale
        grad = _jacobian(self.theta, x_tilde)
        return np.sqrt(np.einsum("ij,jk,ik->i", grad, self.covariance, grad) + self.sigma**2 / runs)


def _model(theta: np.ndarray, x_tilde: np.ndarray) -> np.ndarray:
    log_amp, b, c = theta
    return np.exp(log_amp + b * np.log(x_tilde)) + c


def _jacobian(theta: np.ndarray, x_tilde: np.ndarray) -> np.ndarray:
    log_amp, b, _ = theta
    log_x = np.log(x_tilde)
    power = np.exp(log_amp + b * log_x)
    return np.stack([power, power * log_x, np.ones_like(log_x)], axis=1)


def check_points(x: Sequence[float], loss: Sequence[float], n_params: int = N_PARAMS, min_points: int = 0) -> tuple:
    """Validate and return (x, loss) as float arrays, or raise FitError naming the problem."""
    x_arr = np.asarray(x, dtype=float)
    loss_arr = np.asarray(loss, dtype=float)
    if x_arr.shape != loss_arr.shape or x_arr.ndim != 1:
        raise FitError(f"x and loss must be 1-D and equally long, got {x_arr.shape} and {loss_arr.shape}")
    needed = max(n_params, min_points)
    if len(x_arr) < needed:
        raise FitError(
            f"{len(x_arr)} point(s) to fit but the form has {n_params} parameters: "
            f"add runs (at least {needed}, better {needed + 2}) or lower --holdout"
        )
    bad_loss = [i for i, v in enumerate(loss_arr) if not math.isfinite(v) or v <= 0]
    if bad_loss:
        raise FitError(
            f"loss must be finite and positive, got {loss_arr[bad_loss].tolist()} at point(s) {bad_loss}: "
            "drop diverged runs before fitting"
        )
    bad_x = [i for i, v in enumerate(x_arr) if not math.isfinite(v) or v <= 0]
    if bad_x:
        raise FitError(f"x must be finite and positive, got {x_arr[bad_x].tolist()} at point(s) {bad_x}")
    if len(np.unique(x_arr)) < 2:
        raise FitError("all points have the same x: a power law in x needs points at several x")
    return x_arr, loss_arr


def best_least_squares(residuals: Callable[[np.ndarray], np.ndarray], jacobian: Callable[[np.ndarray], np.ndarray],
                       starts: Iterable[np.ndarray], lower: np.ndarray,
                       upper: np.ndarray, huber: Optional[float] = None) -> Optional[optimize.OptimizeResult]:
    """Bounded least squares from each start (clipped strictly inside the bounds); the lowest-cost
    converged result, or None when no start converged.

    `huber`: the Huber δ in units of the residuals (quadratic inside ±δ, linear outside), so that a
    few runs far off the law pull the fit less than under plain least squares.
    """
    best = None
    robust = {} if huber is None else {"loss": "huber", "f_scale": huber}
    for start in starts:
        result = optimize.least_squares(residuals, np.clip(start, lower + 1e-12, upper - 1e-9), jac=jacobian,
                                        bounds=(lower, upper), x_scale="jac", max_nfev=2000, **robust)
        if result.status > 0 and np.isfinite(result.cost) and (best is None or result.cost < best.cost):
            best = result
    return best


def fit_power_law(x: Sequence[float], loss: Sequence[float], absorbed_dof: int = 0) -> PowerLawFit:
    """Least-squares fit of L = a·x^b + c with b < 0 and 0 ≤ c ≤ min(loss), from several starts.

    `absorbed_dof`: degrees of freedom already spent on `loss` (e.g. seed offsets subtracted from it),
    taken off the residual degrees of freedom.
    """
    x_arr, loss_arr = check_points(x, loss, min_points=N_PARAMS + absorbed_dof)
    x_scale = float(np.exp(np.mean(np.log(x_arr))))
    x_tilde = x_arr / x_scale
    floor_max = float(loss_arr.min())
    lower = np.array([-np.inf, _B_MIN, 0.0])
    upper = np.array([np.inf, _B_MAX, floor_max])

    best = best_least_squares(lambda t: _model(t, x_tilde) - loss_arr, lambda t: _jacobian(t, x_tilde),
                              _starts(x_tilde, loss_arr, floor_max), lower, upper)
    if best is None:
        raise FitError(
            "the power-law fit did not converge from any start: check that the loss falls with x "
            "and that the points come from comparable runs"
        )
    _check_decreasing(best.x, x_tilde, loss_arr)
    return _finish(best.x, x_arr, loss_arr, x_scale, absorbed_dof)


def _check_decreasing(theta: np.ndarray, x_tilde: np.ndarray, loss: np.ndarray) -> None:
    """Refuse optima where the power law collapsed: the data do not fall with x."""
    drop = float(np.ptp(_model(theta, x_tilde)))
    if theta[1] > _B_MAX * 10 or drop < 1e-6 * float(np.mean(loss)):
        raise FitError(
            f"the loss does not fall with x (fitted b={theta[1]:.3g}, fitted drop {drop:.3g} over the range): "
            "a power law with b < 0 does not describe these points; check the runs and --x"
        )


def _starts(x_tilde: np.ndarray, loss: np.ndarray, floor_max: float) -> list:
    """Starting points from the profile over b: for a fixed b the model is linear in (a, c).

    Solving that small linear problem on a grid of exponents is cheap and maps the cost
    landscape, so least squares starts from the best grid point of each basin instead of
    blind guesses (a blind start far from the optimum wanders along the flat a–c valley).
    """
    log_x = np.log(x_tilde)
    candidates = []
    for b in _START_EXPONENTS:
        power = np.exp(b * log_x)
        design = np.stack([power, np.ones_like(power)], axis=1)
        (amplitude, c), *_ = np.linalg.lstsq(design, loss, rcond=None)
        if not 0.0 <= c <= floor_max:
            c = float(np.clip(c, 0.0, floor_max))
            amplitude = float(power @ (loss - c) / (power @ power))
        if amplitude <= 0:
            continue
        cost = float(np.sum((amplitude * power + c - loss) ** 2))
        candidates.append((cost, np.array([math.log(amplitude), b, c])))
    costs = np.array([cost for cost, _ in candidates])
    # Local minima of the profile (each a separate basin), best first.
    minima = [
        i for i in range(len(costs))
        if (i == 0 or costs[i] <= costs[i - 1]) and (i == len(costs) - 1 or costs[i] <= costs[i + 1])
    ]
    minima.sort(key=lambda i: costs[i])
    return [candidates[i][1] for i in minima[:_MAX_STARTS]]


def _finish(theta: np.ndarray, x: np.ndarray, loss: np.ndarray, x_scale: float,
            absorbed_dof: int = 0) -> PowerLawFit:
    """Turn the optimum into a PowerLawFit with covariance and natural-unit standard errors."""
    log_amp, b, c = (float(v) for v in theta)
    a = math.exp(log_amp - b * math.log(x_scale))
    dof = len(x) - N_PARAMS - absorbed_dof
    residuals = loss - _model(theta, x / x_scale)
    covariance = stderr = None
    sigma = 0.0
    if dof > 0:
        sigma = float(np.sqrt(np.sum(residuals**2) / dof))
        jac = _jacobian(theta, x / x_scale)
        try:
            covariance = sigma**2 * np.linalg.inv(jac.T @ jac)
        except np.linalg.LinAlgError:
            covariance = None
        if covariance is None or not np.all(np.isfinite(covariance)) or np.any(np.diag(covariance) < 0):
            raise FitError(
                f"the fit is degenerate (b={b:.3g}, c={c:.3g}): a, b and c cannot all be determined "
                "from these points; add points over a wider range of x"
            )
        # a = exp(log_amp − b·log x_scale): its gradient in theta is (a, −a·log x_scale, 0).
        grad_a = np.array([a, -a * math.log(x_scale), 0.0])
        stderr = {
            "a": float(np.sqrt(grad_a @ covariance @ grad_a)),
            "b": float(np.sqrt(covariance[1, 1])),
            "c": float(np.sqrt(covariance[2, 2])),
        }
    return PowerLawFit(a, b, c, stderr, x, loss, x_scale, np.array(theta, dtype=float), covariance, sigma, absorbed_dof)


def bootstrap_interval(
    fit: PowerLawFit, x: "np.ndarray | float", level: float, n_resamples: int, seed: int = 0
) -> Optional[np.ndarray]:
    """Studentized residual-bootstrap prediction interval, shape (len(x), 2); None with no dof."""
    if fit.dof <= 0:
        return None
    if n_resamples < 100:
        raise FitError(f"--bootstrap {n_resamples} is too few resamples for a {level:g} interval; use at least 200")
    rng = np.random.default_rng(seed)
    x_eval = np.atleast_1d(np.asarray(x, dtype=float))
    fitted = fit.predict(fit.x)
    truth_stand_in = fit.predict(x_eval)  # the fitted curve plays the true law in the resampled world
    residuals = fit.residuals * math.sqrt(len(fit.x) / fit.dof)
    residuals = residuals - residuals.mean()
    roots = []
    for _ in range(n_resamples):
        resampled = fitted + rng.choice(residuals, size=len(residuals), replace=True)
        try:
            refit = _refit_from(fit, resampled)
        except FitError:
            continue  # a resample the form cannot fit carries no information about the interval
        new_run = truth_stand_in + rng.choice(residuals, size=len(x_eval), replace=True)
        roots.append((new_run - refit.predict(x_eval)) / refit.prediction_sd(x_eval))
    if len(roots) < n_resamples // 2:
        raise FitError(f"only {len(roots)} of {n_resamples} bootstrap refits converged: the fit is unstable")
    tail = (1 - level) / 2 * 100
    low_root, high_root = np.percentile(np.array(roots), [tail, 100 - tail], axis=0)
    centre, sd = fit.predict(x_eval), fit.prediction_sd(x_eval)
    return np.stack([centre + low_root * sd, centre + high_root * sd], axis=1)


def _refit_from(fit: PowerLawFit, loss: np.ndarray) -> PowerLawFit:
    """One bounded fit started at an existing optimum (fast, for bootstrap resamples)."""
    if not np.all(loss > 0):
        raise FitError("a resampled loss is not positive")
    x_tilde = fit.x / fit.x_scale
    floor_max = float(loss.min())
    lower = np.array([-np.inf, _B_MIN, 0.0])
    upper = np.array([np.inf, _B_MAX, floor_max])
    result = best_least_squares(lambda t: _model(t, x_tilde) - loss, lambda t: _jacobian(t, x_tilde),
                                [fit.theta], lower, upper)
    if result is None:
        raise FitError("bootstrap refit did not converge")
    return _finish(result.x, fit.x, loss, fit.x_scale, fit.absorbed_dof)


def prediction_interval(
    fit: PowerLawFit, x: "np.ndarray | float", level: float, bootstrap: int = 0, seed: int = 0
) -> Optional[np.ndarray]:
    """The interval the tool reports: residual bootstrap when `bootstrap` > 0, else delta method."""
    interval = bootstrap_interval(fit, x, level, bootstrap, seed) if bootstrap > 0 else fit.interval(x, level)
    return nonnegative(interval)


def nonnegative(interval: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """An interval of losses cut at 0 (a loss is never negative; a symmetric interval around a small loss
    would reach below it)."""
    return None if interval is None else np.maximum(interval, 0.0)


@dataclass(frozen=True)
class HoldoutPoint:
    x: float
    actual: float
    predicted: float
    rel_error: float  # (predicted − actual) / actual
    interval: Optional[tuple]


def split_holdout(x: Sequence[float], k: int) -> np.ndarray:
    """Boolean mask of the points used for fitting: all but those at the k largest distinct x.

    Runs repeated at one x (several seeds of a model size) are held out or fitted together.
    """
    x_arr = np.asarray(x, dtype=float)
    distinct = np.unique(x_arr)
    if k < 0 or k >= len(distinct):
        raise FitError(f"--holdout {k} must be between 0 and the number of distinct x values minus one "
                       f"({len(distinct) - 1})")
    if not k:
        return np.ones(len(x_arr), dtype=bool)
    return x_arr < distinct[-k]


def evaluate_holdout(
    fit: PowerLawFit, x: np.ndarray, actual: np.ndarray, intervals: Optional[np.ndarray],
    offset: "np.ndarray | float" = 0.0,
) -> list:
    """Predicted (the curve plus `offset`, e.g. a seed's) vs actual loss at held-out points, with relative
    error and the given intervals."""
    predicted = fit.predict(x) + offset if len(x) else []
    return [
        HoldoutPoint(
            x=float(xi),
            actual=float(ai),
            predicted=float(pi),
            rel_error=float((pi - ai) / ai),
            interval=None if intervals is None else (float(intervals[i, 0]), float(intervals[i, 1])),
        )
        for i, (xi, ai, pi) in enumerate(zip(x, actual, predicted))
    ]
