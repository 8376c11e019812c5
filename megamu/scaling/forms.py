"""Loss laws as sums of power terms, fitted on log L: one family for every form megamu selects among.

    L = E + Σ_k A_k · z_k^(−α_k)        (z_k: params N, tokens D, or one x such as compute)

- `x_floor`   a·x^b + c (one variable; b = −α, c = E), the classic single-ladder law;
- `x_pure`    a·x^b (no floor): two parameters, for ladders too short to pin a floor down;
- `nd_sum`    E + A/N^α + B/D^β, Chinchilla's form (any tokens per parameter);
- `nd_tied`   E + A/N^α + B/D^α: Gadre et al. 2024's over-training law L(C, M) = E + (a·M^η + b·M^−η)·C^−η
              is this form written in compute C = 6ND and tokens per parameter M = D/N (α = 2η), so one
              exponent describes how the loss falls at any M; one parameter fewer than `nd_sum`;
- `cm_over`   E + (A·M^γ + B·M^−γ)·C^−η with C = N·D and M = D/N: Gadre's idea (at any fixed M the loss
              falls along one power of compute, and M only sets the prefactor) with the prefactor's
              curvature in log M free (γ) instead of tied to η; γ = η is `nd_tied`. Each term is a product
              of powers, N^−(η±γ)·D^−(η∓γ), so how much over-training costs is measured, not assumed;
- `nd_smax`   E + ((A/N^α)^q + (B/D^β)^q)^(1/q), q ≥ 1: the two limits combined by a smooth maximum, as in
              Kaplan et al. 2020's L(N, D) (q = 1 is `nd_sum`; a large q is the larger of the two: a run is
              either size- or data-limited, and what the other variable adds fades).

A term is a product of powers of the variables: log term_k = log A_k − Σ_j G_kj·log z_j with the exponent
G_kj = Σ_p coefficients[k, j, p]·α_p linear in the form's exponents α.

Each variable is divided by its geometric mean and amplitudes are fitted as logs (as in fit.py), the
floor as log E bounded by the smallest observed loss. Fitting log L weights every point by its relative
error; `huber` (a δ on log L) makes it robust to runs off the law. Prediction intervals are the delta
method on log L (they stay positive).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence

import numpy as np
from scipy import optimize, stats

from megamu.errors import FitError
from megamu.scaling.fit import best_least_squares

_ALPHA_BOUNDS = (1e-4, 4.0)
# Start grids over every exponent and the floor (as a fraction of the smallest loss): "grid" is small and
# cheap, "wide" adds steep and shallow exponents and floors near 0 and near the data.
START_GRIDS = {
    "grid": ((0.1, 0.3, 0.7), (0.3, 0.7)),
    "wide": ((0.03, 0.1, 0.2, 0.4, 0.8, 1.6), (0.05, 0.3, 0.6, 0.85, 0.97)),
}


@dataclass(frozen=True)
class Form:
    """A power-sum law: its variables, its terms as products of powers, whether it has a floor."""

    name: str
    variables: tuple  # names of z_j, e.g. ("params", "tokens") or ("x",)
    coefficients: tuple  # [term][variable][exponent]: G_kj = Σ_p coefficients[k][j][p]·α_p
    exponent_keys: tuple  # (variable or name, exponent index): natural() reports alpha_<name> for each
    term_names: tuple  # natural() reports A_<name> for each term
    floor: bool = True
    label: str = ""
    smooth_max: bool = False  # terms combined as (Σ term^q)^(1/q), with log q the last parameter

    @property
    def n_exponents(self) -> int:
        return len(self.coefficients[0][0])

    @property
    def tied(self) -> bool:
        """One power term per variable, all sharing one exponent."""
        return self.n_exponents == 1 and len(self.variables) > 1

    @property
    def n_params(self) -> int:
        return int(self.floor) + len(self.term_names) + self.n_exponents + int(self.smooth_max)

    @property
    def min_points(self) -> int:
        """Points a fit needs: one per parameter, and one more for a smooth maximum, whose order is measured
        by how a plain sum misses (with no residual left it is not measured at all)."""
        return self.n_params + int(self.smooth_max)

    def exponent_matrix(self, alphas: np.ndarray) -> np.ndarray:
        """G, shape (terms, variables): the power of each variable in each term."""
        return np.asarray(self.coefficients, dtype=float) @ alphas

    def unpack(self, theta: np.ndarray) -> tuple:
        """(log E or None, log amplitudes, exponents)."""
        i = int(self.floor)
        j = i + len(self.term_names)
        log_e = theta[0] if self.floor else None
        return log_e, theta[i:j], theta[j:j + self.n_exponents]

    def q(self, theta: np.ndarray) -> float:
        """The smooth maximum's order; 1 (a plain sum) for the other forms."""
        return math.exp(theta[-1]) if self.smooth_max else 1.0


def _separate(name: str, variables: tuple, label: str, floor: bool = True, tied: bool = False) -> Form:
    """One power term per variable, with its own exponent or (tied) one shared by all."""
    n = len(variables)
    coefficients = tuple(tuple((float(j == k),) if tied else tuple(float(j == k == p) for p in range(n))
                               for j in range(n)) for k in range(n))
    keys = tuple((v, 0 if tied else k) for k, v in enumerate(variables))
    return Form(name, variables, coefficients, keys, variables, floor, label)


# cm_over's terms in (N, D), exponents (η, γ):
# C^−η·M^+γ = N^−(η+γ)·D^−(η−γ) and C^−η·M^−γ = N^−(η−γ)·D^−(η+γ).
_OVER_TRAINING = (((1.0, 1.0), (1.0, -1.0)), ((1.0, -1.0), (1.0, 1.0)))

FORMS = {
    "x_floor": _separate("x_floor", ("x",), "a*x^b+c"),
    "x_pure": _separate("x_pure", ("x",), "a*x^b", floor=False),
    "nd_sum": _separate("nd_sum", ("params", "tokens"), "E+A/N^alpha+B/D^beta"),
    "nd_tied": _separate("nd_tied", ("params", "tokens"), "E+A/N^alpha+B/D^alpha", tied=True),
    "cm_over": Form("cm_over", ("params", "tokens"), _OVER_TRAINING, (("compute", 0), ("ratio", 1)),
                    ("over", "under"), label="E+(A*M^g+B*M^-g)/C^eta"),
    "nd_smax": replace(_separate("nd_smax", ("params", "tokens"), "E+((A/N^alpha)^q+(B/D^beta)^q)^(1/q)"),
                       smooth_max=True),
}
_MAX_Q = 30.0  # beyond, the smooth maximum is the larger term to within a few percent
_START_Q = (1.0, 3.0)


def _log_terms(form: Form, theta: np.ndarray, log_z: np.ndarray) -> tuple:
    """(log E or None, log of each power term, shape (n, K))."""
    log_e, log_amps, alphas = form.unpack(theta)
    # Clipped: a trial step of the optimiser far up a wall would otherwise overflow to inf.
    return log_e, np.minimum(log_amps[None, :] - log_z @ form.exponent_matrix(alphas).T, 700.0)


def log_smooth_max(u: np.ndarray, q: float) -> tuple:
    """(S, w) over the last axis of the log terms u: S = log (Σ_k e^(q·u_k))^(1/q), the terms' smooth maximum of
    order q (their sum at q = 1), and w = ∂S/∂u, each term's weight in it (its share of the sum at q = 1)."""
    top = u.max(axis=-1, keepdims=True)  # divided out, so that e^(q·u) cannot overflow
    combined = (top + np.log(np.exp(q * (u - top)).sum(axis=-1, keepdims=True)) / q)[..., 0]
    return combined, np.exp(q * (u - combined[..., None]))


def _combined(form: Form, theta: np.ndarray, log_z: np.ndarray) -> tuple:
    """(log E or None, log terms u, weights w = ∂S/∂u, S = log of the terms' combination)."""
    log_e, u = _log_terms(form, theta, log_z)
    combined, weights = log_smooth_max(u, form.q(theta))
    return log_e, u, weights, combined


def log_model(form: Form, theta: np.ndarray, log_z: np.ndarray) -> np.ndarray:
    log_e, _, _, combined = _combined(form, theta, log_z)
    return combined if log_e is None else np.logaddexp(log_e, combined)


def log_jacobian(form: Form, theta: np.ndarray, log_z: np.ndarray) -> np.ndarray:
    log_e, u, weights, combined = _combined(form, theta, log_z)
    total = combined if log_e is None else np.logaddexp(log_e, combined)
    share = np.exp(combined - total)[:, None]  # the power terms' share of L (1 without a floor)
    slopes = -np.einsum("nk,nj,kjp->np", weights, log_z, np.asarray(form.coefficients, dtype=float))
    columns = ([np.exp(log_e - total)[:, None]] if form.floor else []) + [share * weights, share * slopes]
    if form.smooth_max:  # ∂S/∂log q = Σ w·u − S
        columns.append(share * (np.sum(weights * u, axis=1) - combined)[:, None])
    return np.hstack(columns)


@dataclass(frozen=True)
class LogFit:
    """A fitted power-sum law with its covariance (None when no degree of freedom is left)."""

    form: Form
    theta: np.ndarray
    scales: np.ndarray  # geometric mean of each variable over the fitted points
    covariance: Optional[np.ndarray]
    sigma: float  # residual standard deviation of log L; 0 with no degree of freedom
    dof: int
    min_loss: float  # the floor's upper bound: no floor above an observed loss

    def _log_z(self, z: np.ndarray) -> np.ndarray:
        return np.log(np.atleast_2d(np.asarray(z, dtype=float)) / self.scales)

    def predict(self, z: np.ndarray) -> np.ndarray:
        """Loss at the rows of z, shape (n, number of variables)."""
        return np.exp(log_model(self.form, self.theta, self._log_z(z)))

    def log_sd(self, z: np.ndarray) -> Optional[np.ndarray]:
        """Standard deviation of log L of a new run at z: the curve (delta method) and run-to-run noise."""
        if self.covariance is None:
            return None
        grad = log_jacobian(self.form, self.theta, self._log_z(z))
        return np.sqrt(np.einsum("ij,jk,ik->i", grad, self.covariance, grad) + self.sigma**2)

    def natural(self) -> dict:
        """The law in the units of the data: E (or None), amplitudes and exponents per variable."""
        log_e, log_amps, alphas = self.form.unpack(self.theta)
        amps = np.exp(log_amps + self.form.exponent_matrix(alphas) @ np.log(self.scales))
        return {"E": None if log_e is None else math.exp(log_e),
                **{f"A_{t}": float(a) for t, a in zip(self.form.term_names, amps)},
                **{f"alpha_{v}": float(alphas[p]) for v, p in self.form.exponent_keys},
                **({"q": self.form.q(self.theta)} if self.form.smooth_max else {})}

    def floor_identified(self) -> bool:
        """False when the data cannot tell the floor from the power terms: log E is uncertain by more
        than a factor e, it sits at its bound (the smallest loss, where the covariance no longer measures
        it), or there is no degree of freedom to tell."""
        if not self.form.floor:
            return True
        if self.covariance is None or self.theta[0] > np.log(self.min_loss) - 1e-4:
            return False
        return bool(np.sqrt(self.covariance[0, 0]) < 1.0)


def design(form: Form, columns: dict) -> np.ndarray:
    """The z matrix of a form from named columns (x, params, tokens), shape (n, K)."""
    missing = [v for v in form.variables if columns.get(v) is None]
    if missing:
        raise FitError(f"form {form.label} needs {', '.join(missing)} for every point")
    return np.stack([np.asarray(columns[v], dtype=float) for v in form.variables], axis=1)


def fit_form(form: Form, z: np.ndarray, loss: Sequence[float], huber: Optional[float] = None,
             starts: str = "grid") -> LogFit:
    """Fit `form` to losses at the rows of z (least squares on log L, or Huber with δ = `huber`)."""
    z = np.atleast_2d(np.asarray(z, dtype=float))
    loss_arr = np.asarray(loss, dtype=float)
    if len(loss_arr) < form.min_points:
        extra = " and needs a residual to measure q" if form.smooth_max else ""
        raise FitError(f"{len(loss_arr)} point(s) to fit but {form.label} has {form.n_params} parameters{extra}: "
                       f"add runs (at least {form.min_points}, better {form.min_points + 2})")
    if not (np.all(np.isfinite(z)) and np.all(z > 0) and np.all(np.isfinite(loss_arr)) and np.all(loss_arr > 0)):
        raise FitError("every loss and every x must be finite and positive: drop diverged or unlabelled runs")
    for k, v in enumerate(form.variables):
        if len(np.unique(z[:, k])) < 2:
            raise FitError(f"form {form.label} needs points at several {v}: all have {v} = {z[0, k]:.4g}")
    scales = np.exp(np.log(z).mean(axis=0))
    log_z = np.log(z / scales)
    log_loss = np.log(loss_arr)
    lower, upper = _bounds(form, float(loss_arr.min()))
    best = best_least_squares(lambda t: log_model(form, t, log_z) - log_loss,
                              lambda t: log_jacobian(form, t, log_z),
                              _starts(form, log_z, loss_arr, starts), lower, upper, huber)
    if best is None:
        raise FitError(f"the fit of {form.label} did not converge from any start")
    return _finish(form, best.x, log_z, log_loss, scales)


def _bounds(form: Form, min_loss: float) -> tuple:
    n_amp, n_exp = len(form.term_names), form.n_exponents
    lower = [-np.inf] * (int(form.floor) + n_amp) + [_ALPHA_BOUNDS[0]] * n_exp + [0.0] * int(form.smooth_max)
    upper = (([math.log(min_loss)] if form.floor else []) + [np.inf] * n_amp + [_ALPHA_BOUNDS[1]] * n_exp
             + [math.log(_MAX_Q)] * int(form.smooth_max))
    return np.array(lower), np.array(upper)


def _starts(form: Form, log_z: np.ndarray, loss: np.ndarray, grid: str) -> Iterator[np.ndarray]:
    """A grid over exponents and floor; for each, the amplitudes that fit best (non-negative least squares
    in L − E), so every start sits in the valley of its exponents rather than far up a wall."""
    exponents, floor_fractions = START_GRIDS[grid]
    floors = [f * loss.min() for f in floor_fractions] if form.floor else [0.0]
    for alphas in _exponent_grid(form, exponents):
        powers = np.exp(-log_z @ form.exponent_matrix(alphas).T)
        for floor in floors:
            amps, _ = optimize.nnls(powers, loss - floor)  # the plain sum's (q = 1)
            log_amps = np.log(np.maximum(amps, 1e-3 * (loss.mean() - floor) / len(form.term_names)))
            start = np.concatenate([[math.log(floor)] if form.floor else [], log_amps, alphas])
            yield from (np.append(start, math.log(q)) for q in _START_Q) if form.smooth_max else [start]


def _exponent_grid(form: Form, exponents: tuple) -> Iterator[np.ndarray]:
    mesh = np.meshgrid(*[exponents] * form.n_exponents, indexing="ij")
    yield from np.stack([m.ravel() for m in mesh], axis=1)


def _finish(form: Form, theta: np.ndarray, log_z: np.ndarray, log_loss: np.ndarray, scales: np.ndarray) -> LogFit:
    dof = len(log_loss) - form.n_params
    covariance, sigma = None, 0.0
    if dof > 0:
        residuals = log_model(form, theta, log_z) - log_loss
        sigma = float(np.sqrt(np.sum(residuals**2) / dof))
        jac = log_jacobian(form, theta, log_z)
        if np.linalg.matrix_rank(jac) < form.n_params:
            raise FitError(f"the fit of {form.label} is degenerate: its {form.n_params} parameters cannot all be "
                           f"determined from these points; add points over a wider range")
        covariance = sigma**2 * np.linalg.pinv(jac.T @ jac)
    return LogFit(form, np.array(theta, dtype=float), scales, covariance, sigma, dof, float(np.exp(log_loss.min())))


def t_quantile(level: float, dof: float) -> float:
    return float(stats.t.ppf(0.5 + level / 2, dof))
