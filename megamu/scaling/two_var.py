"""Fit the two-variable law L(N, D) = E + A/N^α + B/D^β (Chinchilla form) on log L.

Used when the points vary in both params N and tokens D. Like the one-variable fit, N and D
are divided by their geometric means and amplitudes are fitted as logs; least squares runs
from a grid of starts over the exponents and the floor. The prediction interval is the delta
method on log L (so it stays positive) with a Student-t quantile on n − 5 degrees of freedom.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from megamu.scaling.fit import FitError, best_least_squares, check_points

TWO_VAR_PARAMS = 5
_TWO_VAR_EXPONENT_STARTS = (0.1, 0.3, 0.7)
_TWO_VAR_FLOOR_STARTS = (0.3, 0.7)


@dataclass(frozen=True)
class TwoVarFit:
    """A fitted L(N, D) = E + A/N^α + B/D^β (Chinchilla form), fitted on log L."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    stderr: dict  # {"E", "A", "alpha", "B", "beta"}
    scales: tuple  # geometric means of N and D used to normalise them
    theta: np.ndarray  # (log E, log A', α, log B', β) with A' = A/N_scale^α, B' = B/D_scale^β
    covariance: np.ndarray
    sigma: float  # residual standard deviation of log L
    dof: int

    def predict(self, params: "np.ndarray | float", tokens: "np.ndarray | float") -> np.ndarray:
        return np.exp(_two_var_log_model(self.theta, *self._normalise(params, tokens)))

    def interval(self, params: "np.ndarray | float", tokens: "np.ndarray | float", level: float) -> np.ndarray:
        """Delta-method prediction interval on log L (so it stays positive), shape (n, 2)."""
        n_hat, d_hat = self._normalise(params, tokens)
        grad = _two_var_log_jacobian(self.theta, n_hat, d_hat)
        variance = np.einsum("ij,jk,ik->i", grad, self.covariance, grad) + self.sigma**2
        half = stats.t.ppf(0.5 + level / 2, self.dof) * np.sqrt(variance)
        centre = _two_var_log_model(self.theta, n_hat, d_hat)
        return np.exp(np.stack([centre - half, centre + half], axis=1))

    def _normalise(self, params, tokens) -> tuple:
        return (
            np.atleast_1d(np.asarray(params, dtype=float)) / self.scales[0],
            np.atleast_1d(np.asarray(tokens, dtype=float)) / self.scales[1],
        )


def _two_var_terms(theta: np.ndarray, n_hat: np.ndarray, d_hat: np.ndarray) -> tuple:
    log_e, log_a, alpha, log_b, beta = theta
    return (
        np.full_like(n_hat, math.exp(log_e)),
        np.exp(log_a - alpha * np.log(n_hat)),
        np.exp(log_b - beta * np.log(d_hat)),
    )


def _two_var_log_model(theta: np.ndarray, n_hat: np.ndarray, d_hat: np.ndarray) -> np.ndarray:
    return np.log(sum(_two_var_terms(theta, n_hat, d_hat)))


def _two_var_log_jacobian(theta: np.ndarray, n_hat: np.ndarray, d_hat: np.ndarray) -> np.ndarray:
    floor, n_term, d_term = _two_var_terms(theta, n_hat, d_hat)
    total = floor + n_term + d_term
    return np.stack(
        [floor, n_term, -n_term * np.log(n_hat), d_term, -d_term * np.log(d_hat)], axis=1
    ) / total[:, None]


def fit_two_var(params: Sequence[float], tokens: Sequence[float], loss: Sequence[float]) -> TwoVarFit:
    """Fit L = E + A/N^α + B/D^β by least squares on log L from a grid of starts.

    Log space weights every point by its relative error, as the loss spans a range where
    absolute errors at small models would otherwise dominate.
    """
    if len(np.unique(np.asarray(params))) < 2 or len(np.unique(np.asarray(tokens))) < 2:
        raise FitError("--two-var needs points that vary in both params and tokens")
    # One point more than parameters: the interval needs a residual degree of freedom.
    n_arr, loss_arr = check_points(params, loss, TWO_VAR_PARAMS, TWO_VAR_PARAMS + 1)
    d_arr, _ = check_points(tokens, loss, TWO_VAR_PARAMS, TWO_VAR_PARAMS + 1)
    scales = (float(np.exp(np.mean(np.log(n_arr)))), float(np.exp(np.mean(np.log(d_arr)))))
    n_hat, d_hat = n_arr / scales[0], d_arr / scales[1]
    log_loss = np.log(loss_arr)
    lower = np.array([-np.inf, -np.inf, 1e-6, -np.inf, 1e-6])
    upper = np.array([math.log(loss_arr.min()), np.inf, 4.0, np.inf, 4.0])

    def starts():
        for alpha in _TWO_VAR_EXPONENT_STARTS:
            for beta in _TWO_VAR_EXPONENT_STARTS:
                for floor_fraction in _TWO_VAR_FLOOR_STARTS:
                    floor = floor_fraction * loss_arr.min()
                    share = math.log((loss_arr.mean() - floor) / 2)
                    yield np.array([math.log(floor), share, alpha, share, beta])

    best = best_least_squares(lambda t: _two_var_log_model(t, n_hat, d_hat) - log_loss,
                              lambda t: _two_var_log_jacobian(t, n_hat, d_hat), starts(), lower, upper)
    if best is None:
        raise FitError("the two-variable fit did not converge from any start")

    theta = best.x
    dof = len(loss_arr) - TWO_VAR_PARAMS
    sigma = float(np.sqrt(2 * best.cost / dof))
    jac = _two_var_log_jacobian(theta, n_hat, d_hat)
    covariance = sigma**2 * np.linalg.pinv(jac.T @ jac)
    if not np.all(np.isfinite(covariance)) or np.linalg.matrix_rank(jac) < TWO_VAR_PARAMS:
        raise FitError("the two-variable fit is degenerate: add points spread over both params and tokens")
    log_e, log_a, alpha, log_b, beta = (float(v) for v in theta)
    big_a = math.exp(log_a + alpha * math.log(scales[0]))
    big_b = math.exp(log_b + beta * math.log(scales[1]))
    # Natural-unit gradients: E = e^{θ0}; A = e^{θ1 + θ2·log N_scale}; B likewise with θ3, θ4.
    grads = {
        "E": np.array([math.exp(log_e), 0, 0, 0, 0]),
        "A": np.array([0, big_a, big_a * math.log(scales[0]), 0, 0]),
        "alpha": np.array([0, 0, 1.0, 0, 0]),
        "B": np.array([0, 0, 0, big_b, big_b * math.log(scales[1])]),
        "beta": np.array([0, 0, 0, 0, 1.0]),
    }
    stderr = {name: float(np.sqrt(g @ covariance @ g)) for name, g in grads.items()}
    return TwoVarFit(math.exp(log_e), big_a, alpha, big_b, beta, stderr, scales, theta, covariance, sigma, dof)
