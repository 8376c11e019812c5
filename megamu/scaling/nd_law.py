"""The law a compute-optimal plan minimises: L(N, D) = E + A/N^α + B/D^β, from one of three sources.

- published coefficients by name (`PUBLISHED`): they come without a covariance, so no interval;
- a law file (JSON, below), e.g. the `law` object of a `megamu-plan --json` report or the output of
  `megamu-predict --two-var --json` (whose `two_var.fit` has standard errors but no covariance: no interval);
- a fit here (`fit_law`, forms.py's `nd_sum` on log L): the delta method on its covariance gives an interval.

Law file: a JSON object with the coefficients, either at the top level or under `"law"`:

    {"law": {"E": 1.82, "A": 482.01, "alpha": 0.3478, "B": 2085.43, "beta": 0.3658,
             "source": "where the numbers come from",            # optional
             "covariance": [[...5 rows of 5...]],                 # optional, of (E, A, alpha, B, beta)
             "sigma": 0.01, "dof": 40}}                           # with the covariance: residual sd of log L

N and D are in the units the law was fitted in (parameters and tokens, not millions).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megamu.errors import FitError
from megamu.scaling.forecast import DEFAULT_OPTIONS
from megamu.scaling.forms import FORMS, LogFit, design, fit_form, t_quantile
from megamu.scaling.points import read_points_csv

COEFFICIENTS = ("E", "A", "alpha", "B", "beta")
FORM_LABEL = "E+A/N^alpha+B/D^beta"


@dataclass(frozen=True)
class NDLaw:
    """A Chinchilla-form law with, when it was fitted here or a file gives one, its covariance."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    source: str
    covariance: Optional[np.ndarray] = None  # of (E, A, alpha, B, beta) in the units of N and D
    sigma: float = 0.0  # residual standard deviation of log L: the run-to-run noise of a new run
    dof: int = 0
    no_interval: str = ""  # why there is no interval (covariance None)

    def loss(self, params: "np.ndarray | float", tokens: "np.ndarray | float") -> np.ndarray:
        n, d = np.asarray(params, dtype=float), np.asarray(tokens, dtype=float)
        return self.E + self.A * n**-self.alpha + self.B * d**-self.beta

    def interval(self, params: "np.ndarray | float", tokens: "np.ndarray | float",
                 level: float) -> Optional[np.ndarray]:
        """Delta-method prediction interval on log L for a new run, shape (n, 2); None without a covariance."""
        if self.covariance is None:
            return None
        n = np.atleast_1d(np.asarray(params, dtype=float))
        d = np.atleast_1d(np.asarray(tokens, dtype=float))
        n_term, d_term = self.A * n**-self.alpha, self.B * d**-self.beta
        total = self.E + n_term + d_term
        # d log L / d (E, A, alpha, B, beta)
        grad = np.stack([np.ones_like(n), n_term / self.A, -n_term * np.log(n),
                         d_term / self.B, -d_term * np.log(d)], axis=1) / total[:, None]
        sd = np.sqrt(np.einsum("ij,jk,ik->i", grad, self.covariance, grad) + self.sigma**2)
        half = t_quantile(level, self.dof) * sd
        return np.exp(np.stack([np.log(total) - half, np.log(total) + half], axis=1))

    def to_dict(self) -> dict:
        """The law-file form of this law (loadable by `load_law_file`)."""
        out = {"form": FORM_LABEL, **{k: float(getattr(self, k)) for k in COEFFICIENTS}, "source": self.source}
        if self.covariance is not None:
            out.update(covariance=self.covariance.tolist(), sigma=self.sigma, dof=self.dof)
        else:
            out["no_interval"] = self.no_interval
        return out


_NO_COVARIANCE = "published coefficients come without their covariance, so no interval can be given"

# Loss in nats per token on the authors' data and tokenizer (MassiveText); N counts every parameter.
PUBLISHED = {
    "chinchilla-besiroglu": NDLaw(
        1.82, 482.01, 0.3478, 2085.43, 0.3658,
        "Besiroglu et al. 2024, 'Chinchilla Scaling: A replication attempt' (refit of Hoffmann et al.'s "
        "approach 3 on their data)", no_interval=_NO_COVARIANCE),
    "chinchilla-hoffmann": NDLaw(
        1.69, 406.4, 0.34, 410.7, 0.28,
        "Hoffmann et al. 2022, 'Training Compute-Optimal Large Language Models', approach 3",
        no_interval=_NO_COVARIANCE),
}


def published_law(name: str) -> NDLaw:
    if name not in PUBLISHED:
        raise FitError(f"unknown law {name!r}; published laws: {', '.join(PUBLISHED)}")
    return PUBLISHED[name]


def law_from_fit(fit: LogFit, source: str) -> NDLaw:
    """The natural-unit law of an N, D fit, its covariance carried over by the Jacobian of the change of
    variables (the delta method gives the same interval in either parametrisation)."""
    form = fit.form
    if (form.variables != ("params", "tokens") or form.term_names != ("params", "tokens") or not form.floor
            or form.smooth_max):
        raise FitError(f"form {form.label} is not a Chinchilla-form L(N, D) law (a floor plus one power of each)")
    nat = fit.natural()
    law = (nat["E"], nat["A_params"], nat["alpha_params"], nat["A_tokens"], nat["alpha_tokens"])
    if fit.covariance is None or not fit.floor_identified():
        why = ("as many points as parameters: the fit has no residual to measure its error" if fit.dof <= 0 else
               "the floor E is not identified by these points: the delta method would not measure it")
        return NDLaw(*law, source=source, no_interval=why)
    # theta = (log E, log A', log B', exponent(s)); A = A'·s_N^α, B = B'·s_D^β, s the variables' scales
    exp_n, exp_d = (3, 3) if form.tied else (3, 4)
    E, A, alpha, B, beta = law
    jac = np.zeros((5, len(fit.theta)))
    jac[0, 0] = E
    jac[1, 1], jac[1, exp_n] = A, A * math.log(fit.scales[0])
    jac[2, exp_n] = 1.0
    jac[3, 2], jac[3, exp_d] = B, B * math.log(fit.scales[1])
    jac[4, exp_d] = 1.0
    return NDLaw(*law, source=source, covariance=jac @ fit.covariance @ jac.T, sigma=fit.sigma, dof=fit.dof)


def fit_law(path: str, huber: Optional[float] = DEFAULT_OPTIONS.huber) -> NDLaw:
    """Fit E + A/N^α + B/D^β to a CSV of runs with params, tokens and loss (megamu-predict's CSV format), by
    least squares on log L or, with `huber`, the Huber loss with that δ on log L."""
    if huber is not None and not (math.isfinite(huber) and huber > 0):
        raise FitError(f"the Huber δ must be a positive number, got {huber}")
    points = read_points_csv(path, "params")
    missing = [p.name for p in points if p.tokens is None]
    if missing:
        raise FitError(f"{path}: {len(missing)} row(s) have no tokens (e.g. {missing[0]}); L(N, D) needs "
                       f"params and tokens for every run")
    form = FORMS["nd_sum"]
    z = design(form, {"params": [p.params for p in points], "tokens": [p.tokens for p in points]})
    fit = fit_form(form, z, [p.loss for p in points], huber, DEFAULT_OPTIONS.starts)
    how = "least squares" if huber is None else f"Huber δ = {huber:g}"
    return law_from_fit(fit, f"fitted here to {len(points)} runs of {path} ({how} on log L)")


def load_law_file(path: str) -> NDLaw:
    """Read a law file (module docstring); every problem names the file and the key."""
    try:
        with open(path) as handle:
            raw = json.load(handle)
    except OSError as exc:
        raise FitError(f"cannot read law file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise FitError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); a law file holds "
                       f"{{\"law\": {{\"E\", \"A\", \"alpha\", \"B\", \"beta\"}}}}") from None
    if isinstance(raw, dict) and isinstance(raw.get("two_var"), dict):  # megamu-predict --two-var --json
        values = raw["two_var"].get("fit") or {}
        note = "the file has standard errors but not their covariance (megamu-predict --json), so no interval"
    else:
        values = raw.get("law", raw) if isinstance(raw, dict) else None
        note = "the law file gives no covariance, so no interval can be given"
    if not isinstance(values, dict):
        raise FitError(f"{path}: expected a JSON object with the law's coefficients {', '.join(COEFFICIENTS)}")
    coefficients = [_positive(path, values, key) for key in COEFFICIENTS]
    source = str(values.get("source") or f"law file {path}")
    if values.get("covariance") is None:
        return NDLaw(*coefficients, source=source, no_interval=str(values.get("no_interval") or note))
    covariance = np.asarray(values["covariance"], dtype=float) if _is_matrix(values["covariance"]) else None
    if covariance is None or covariance.shape != (5, 5) or not np.all(np.isfinite(covariance)):
        raise FitError(f"{path}: covariance must be a 5×5 matrix of numbers over (E, A, alpha, B, beta)")
    dof = values.get("dof")
    if not isinstance(dof, int) or dof < 1:
        raise FitError(f"{path}: a covariance needs dof, the fit's residual degrees of freedom (a positive integer)")
    sigma = values.get("sigma", 0.0)
    if not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma >= 0):
        raise FitError(f"{path}: sigma must be a finite number ≥ 0 (the residual sd of log L), got {sigma!r}")
    return NDLaw(*coefficients, source=source, covariance=covariance, sigma=float(sigma), dof=dof)


def _positive(path: str, values: dict, key: str) -> float:
    value = values.get(key)
    if value is None:
        raise FitError(f"{path}: the law has no {key!r}; it needs {', '.join(COEFFICIENTS)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise FitError(f"{path}: {key} must be a positive finite number, got {value!r}")
    return float(value)


def _is_matrix(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(row, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in row) for row in value)
