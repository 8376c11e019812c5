"""Whole-curve loss forecasts: one schedule-aware law fitted jointly to the loss curves of a width ladder.

The law (in the spirit of the learning-rate-annealing scaling law of Tissue et al. 2024, with the model
size made explicit so that one fit across widths predicts another width, and the size and training terms
combined as in Kaplan et al. 2020's L(N, D)):

    L(N, k) = E + ((B·n^(−β))^q + (A·S1(k)^(−α))^q)^(1/q) − C·S2(k),      n = N / N_ref

- N is the run's parameter count and N_ref the geometric mean of the fitted runs' N (conditioning only);
- k is the number of optimizer updates applied when the loss was measured (a train record at step s was
  measured before update s, so k = s − 1; an eval record at step s after it, so k = s);
- S1(k) = Σ_{i<k} η_i is the forward area of the learning-rate schedule η (what a constant-LR run's
  loss falls with), S2(k) = Σ_{i<k} m_i the annealing area, with m_i = λ·m_{i−1} + max(η_{i−1} − η_i, 0)
  and λ = exp(−1/τ): a decay of the LR lowers the loss, with a memory of τ updates;
- E is the floor, B·n^(−β) the loss a model of size N cannot train below, A·S1^(−α) what training has
  not yet removed. q ≥ 1 sets how the two combine: q = 1 adds them (a larger model is better by the same
  amount at every point of training), a large q takes the larger of the two, so that curves start
  together while training limits every width and fan out as the smaller ones reach their size limit.
  Measured on real ladders the curves do fan out (benchmarks/bench_curve.py: the additive law misses the
  held-out width by 2.0% on average, this one by 1.8%, with half the in-sample residual).

Runs of several seeds (train.seed in config.yaml) get one log offset per seed, summing to zero (CurveFit).

η is computed from each run's config.yaml by megamu's own schedule (training/schedule.py) for every
update, so any warm-up, cosine, WSD or constant schedule enters through its areas; the logged `lr`
records are checked against it. Fitting: relative residuals (log L) over every record after warm-up of
every run, by variable projection from a grid of starts (at q = 1 and fixed β, α, τ the law is linear in
E, B, A, C ≥ 0: non-negative least squares weighted by 1/L), then bounded least squares on log L over
all eight parameters (and the seed offsets) from the best starts, each with q = 1 and q = 3.
"""
from __future__ import annotations

import itertools
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
from scipy import optimize, signal

from megamu.config import ConfigError, TrainConfig, load_config
from megamu.errors import FitError
from megamu.scaling.forms import log_smooth_max
from megamu.scaling.runs import read_metrics, run_seed
from megamu.training.metrics import METRICS_FILE
from megamu.training.schedule import base_lr

PARAM_NAMES = ("E", "B", "A", "C", "beta", "alpha", "log_tau", "log_q")
LAW = "L = E + ((B*n^-beta)^q + (A*S1^-alpha)^q)^(1/q) - C*S2,  n = N/N_ref"
MIN_SIZES = 3  # E, B and β need at least three sizes (as a·x^b + c does)
# Grid of starts over the nonlinear parameters (τ as a fraction of the longest run).
_START_BETA = (0.2, 0.5, 1.0)
_START_ALPHA = (0.2, 0.5, 1.0)
_START_TAU = (0.01, 0.1, 0.5)
_START_Q = (1.0, 3.0)
_NEGLIGIBLE = 1e-4  # an annealing term below this fraction of the loss counts as C on its bound 0
_MAX_Q = 30.0  # beyond, the combination is the larger term to within a few percent of it
_POLISHED_STARTS = 3
_LR_RTOL = 1e-6


@dataclass(frozen=True, eq=False)  # compared by identity: its fields are arrays
class Curve:
    """One run's loss curve and the learning rate of every update of its schedule."""

    name: str
    params: float
    updates: np.ndarray  # updates applied before each loss was measured
    loss: np.ndarray
    lrs: np.ndarray  # η of updates 0 .. max_steps − 1
    warmup_steps: int
    final_updates: int  # k of the run's last record (train: max_steps − 1, val: max_steps)
    seed: Optional[int] = None
    tokens_per_step: Optional[int] = None  # tokens per update (its config's Config.tokens_per_step)

    def after_warmup(self) -> np.ndarray:
        """Mask of the records past the warm-up (the ones fitted and scored)."""
        return self.updates >= max(self.warmup_steps, 1)

    def measurable(self) -> bool:
        """At least 2 records past the warm-up: what a fit, or a run's offset from one, needs."""
        return int(self.after_warmup().sum()) >= 2

    def prefix(self, fraction: float) -> "Curve":
        """The records of the first `fraction` of the run's schedule (what an early forecast sees)."""
        keep = self.updates <= fraction * len(self.lrs)
        return replace(self, updates=self.updates[keep], loss=self.loss[keep])


def schedule_lrs(train: TrainConfig) -> np.ndarray:
    """η of every update of a run configured by `train` (megamu's own schedule, not a copy of it)."""
    return np.array([base_lr(i, train) for i in range(train.max_steps)], dtype=float)


def lr_areas(lrs: np.ndarray, updates: np.ndarray, tau: float) -> tuple:
    """(S1, S2) after `updates` updates of the schedule `lrs` (see the module docstring)."""
    drops = np.concatenate([[0.0], np.maximum(lrs[:-1] - lrs[1:], 0.0)])
    momentum = signal.lfilter([1.0], [1.0, -math.exp(-1.0 / tau)], drops)
    k = np.clip(np.asarray(updates, dtype=int), 1, len(lrs))
    return np.cumsum(lrs)[k - 1], np.cumsum(momentum)[k - 1]


def _basis(beta: float, alpha: float, n: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """Columns multiplying E, B, A, C at q = 1 for fixed (β, α): there the law is linear in them."""
    return np.stack([np.ones_like(n), n ** -beta, np.maximum(s1, 1e-12) ** -alpha, -s2], axis=1)


def _law(theta: np.ndarray, n: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    E, B, A, C, beta, alpha, _, log_q = theta[:len(PARAM_NAMES)]
    q = math.exp(log_q)
    size, training = B * n ** -beta, A * np.maximum(s1, 1e-12) ** -alpha
    combined, _ = log_smooth_max(np.log(np.maximum(np.stack([size, training], axis=-1), 1e-300)), q)
    return E + np.exp(combined) - C * s2


@dataclass
class _Design:
    """The fitted records of every run, flattened, with each run's schedule to recompute S2 for a τ."""

    curves: Sequence[Curve]
    n_ref: float

    def __post_init__(self) -> None:
        masks = [c.after_warmup() for c in self.curves]
        self.loss = np.concatenate([c.loss[m] for c, m in zip(self.curves, masks)])
        self.n = np.concatenate([np.full(m.sum(), c.params / self.n_ref) for c, m in zip(self.curves, masks)])
        self.updates = [c.updates[m] for c, m in zip(self.curves, masks)]
        self.seeds = offset_seeds(self.curves)
        index = {seed: i for i, seed in enumerate(self.seeds)}
        self.seed_index = np.concatenate([np.full(m.sum(), index.get(c.seed, 0)) for c, m in zip(self.curves, masks)])

    def areas(self, tau: float) -> tuple:
        pairs = [lr_areas(c.lrs, k, tau) for c, k in zip(self.curves, self.updates)]
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])

    def model(self, theta: np.ndarray) -> np.ndarray:
        s1, s2 = self.areas(math.exp(theta[6]))
        law = _law(theta, self.n, s1, s2)
        return law * np.exp(seed_offsets(theta)[self.seed_index]) if self.seeds else law


def offset_seeds(curves: Sequence[Curve]) -> list:
    """The seeds that get an offset: all of them when every run has a seed, there are several, and every seed is
    linked to the others by sizes run with both (so an offset is measured against another seed at the same
    size, not traded against the size term: seeds each at a size of their own get none), else none."""
    seeds = sorted({c.seed for c in curves if c.seed is not None})
    if len(seeds) < 2 or any(c.seed is None for c in curves):
        return []
    sizes_of = {seed: {c.params for c in curves if c.seed == seed} for seed in seeds}
    linked, frontier = {seeds[0]}, [seeds[0]]
    while frontier:
        seed = frontier.pop()
        for other in seeds:
            if other not in linked and sizes_of[seed] & sizes_of[other]:
                linked.add(other)
                frontier.append(other)
    return seeds if len(linked) == len(seeds) else []


def seed_offsets(theta: np.ndarray) -> np.ndarray:
    """Every seed's log offset: θ holds all but the last, which makes them sum to zero."""
    free = theta[len(PARAM_NAMES):]
    return np.concatenate([free, [-free.sum()]])


@dataclass(frozen=True)
class CurveFit:
    """A fitted curve law: θ = (E, B, A, C, β, α, log τ, log q) with N_ref, and how well it fits.

    With runs of several seeds, each seed's luck is a log offset δ_s (Σ δ_s = 0, so the law is the
    seed-averaged one): under μP a seed's init and data order are shared by every width, so its runs sit
    above or below the others at every size. A new run of a fitted seed is predicted with its offset."""

    theta: np.ndarray
    n_ref: float
    rms_rel: float  # root-mean-square relative residual over the fitted records
    runs: tuple  # names of the fitted runs
    largest_params: float
    offsets: dict = field(default_factory=dict)  # seed → δ_s; empty without several seeds
    at_bounds: tuple = ()  # parameters that ended on a bound of their range: the runs do not pin them

    def predict(self, params: float, lrs: np.ndarray, updates: np.ndarray, seed: Optional[int] = None) -> np.ndarray:
        """Loss of a run with `params` parameters under schedule `lrs`, after each of `updates` updates."""
        s1, s2 = lr_areas(lrs, updates, math.exp(self.theta[6]))
        n = np.full(len(s1), params / self.n_ref)
        return _law(self.theta, n, s1, s2) * math.exp(self.offsets.get(seed, 0.0))

    def predict_curve(self, curve: Curve) -> np.ndarray:
        return self.predict(curve.params, curve.lrs, curve.updates, curve.seed)

    def natural(self) -> dict:
        values = dict(zip(PARAM_NAMES, (float(v) for v in self.theta)))
        values["tau"] = math.exp(values.pop("log_tau"))
        values["q"] = math.exp(values.pop("log_q"))
        return {**values, "N_ref": self.n_ref, "seed_offsets": {str(s): d for s, d in self.offsets.items()},
                "at_bounds": list(self.at_bounds)}


def fit_curves(curves: Sequence[Curve]) -> CurveFit:
    """Fit the law jointly to every record after warm-up of `curves` (runs at three or more sizes)."""
    sizes = sorted({c.params for c in curves})
    if len(sizes) < MIN_SIZES:
        raise FitError(f"the whole-curve fit needs runs at {MIN_SIZES} or more sizes, got {len(curves)} run(s) at "
                       f"{len(sizes)} size(s) ({', '.join(f'{s:.4g}' for s in sizes) or 'none'}): add rungs")
    for c in curves:
        if not c.measurable():
            raise FitError(f"run {c.name} has fewer than 2 records after its {c.warmup_steps} warm-up steps: "
                           "log more often (log.interval for train losses, train.eval_interval for validation losses) "
                           "or drop the run")
        if not (np.all(np.isfinite(c.loss)) and np.all(c.loss > 0)):
            raise FitError(f"run {c.name} has a non-finite or non-positive loss (diverged?): drop the run")
    design = _Design(curves, float(np.exp(np.mean(np.log(sizes)))))
    longest = max(len(c.lrs) for c in curves)
    starts = sorted(_projected_starts(design, longest), key=lambda pair: pair[0])[:_POLISHED_STARTS]
    free_offsets = max(len(design.seeds) - 1, 0)
    lower = np.array([0.0, 0.0, 0.0, 0.0, 1e-3, 1e-3, math.log(0.5), 0.0] + [-1.0] * free_offsets)
    upper = np.array([float(design.loss.min()), np.inf, np.inf, np.inf, 3.0, 3.0, math.log(10.0 * longest),
                      math.log(_MAX_Q)] + [1.0] * free_offsets)
    log_loss = np.log(design.loss)

    def residuals(theta: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(design.model(theta), 1e-12)) - log_loss

    best = None
    for (_, start), q in itertools.product(starts, _START_Q):
        start = np.concatenate([start, [math.log(q)], np.zeros(free_offsets)])
        result = optimize.least_squares(residuals, np.clip(start, lower, upper), bounds=(lower, upper),
                                        x_scale="jac", max_nfev=400)
        if best is None or result.cost < best.cost:
            best = result
    rms = float(np.sqrt(np.mean(np.expm1(residuals(best.x)) ** 2)))
    offsets = dict(zip(design.seeds, (float(d) for d in seed_offsets(best.x)))) if design.seeds else {}
    theta = best.x[:len(PARAM_NAMES)]
    # q = 1 is the additive law itself, a member of the family rather than a stop on the way to another.
    unpinned = tuple(name for name in at_bounds(theta, lower, upper) if name != "q" or theta[7] > 0.5)
    if "C" in unpinned or theta[3] * design.areas(math.exp(theta[6]))[1].max() < _NEGLIGIBLE * design.loss.min():
        # No annealing gain in these runs: C is 0 in all but name, and τ (its memory) means nothing.
        unpinned = (*unpinned, *(name for name in ("C", "tau") if name not in unpinned))
    return CurveFit(theta, design.n_ref, rms, tuple(c.name for c in curves), float(sizes[-1]), offsets, unpinned)


def at_bounds(theta: np.ndarray, lower: np.ndarray, upper: np.ndarray, rtol: float = 1e-4) -> tuple:
    """Names of the law's parameters on a bound: there the data would have pushed them further, so their value
    is the bound's, not a measurement (a degenerate fit, e.g. a floor E = 0 traded against a tiny α)."""
    names = []
    for name, value, low, high in zip(PARAM_NAMES, theta, lower, upper):
        span = rtol * max(abs(low), abs(high) if np.isfinite(high) else 0.0, 1.0)
        if value - low <= span or (np.isfinite(high) and high - value <= span):
            names.append(name.removeprefix("log_"))
    return tuple(names)


def _projected_starts(design: _Design, longest: int):
    """(weighted squared relative error, θ without log q) for each grid point at q = 1, its amplitudes by
    non-negative least squares."""
    weight = 1.0 / design.loss
    for tau_fraction in _START_TAU:
        tau = max(tau_fraction * longest, 1.0)
        s1, s2 = design.areas(tau)
        for beta, alpha in itertools.product(_START_BETA, _START_ALPHA):
            basis = _basis(beta, alpha, design.n, s1, s2)
            amps, rnorm = optimize.nnls(basis * weight[:, None], np.ones_like(weight))
            yield rnorm**2, np.concatenate([amps, [beta, alpha, math.log(tau)]])


def curve_errors(fit: CurveFit, curve: Curve) -> dict:
    """Mean and max |predicted/actual − 1| over the records after warm-up, and the final record's loss."""
    mask = curve.after_warmup()
    if not mask.any():
        raise FitError(f"run {curve.name} has no record after its {curve.warmup_steps} warm-up steps to score")
    predicted = fit.predict_curve(curve)
    rel = predicted[mask] / curve.loss[mask] - 1.0
    return {"name": curve.name, "params": curve.params, "size_ratio": curve.params / fit.largest_params,
            "records": int(mask.sum()), "mean_rel_error": float(np.mean(np.abs(rel))),
            "max_rel_error": float(np.max(np.abs(rel))),
            "final": {"updates": int(curve.updates[-1]), "actual": float(curve.loss[-1]),
                      "predicted": float(predicted[-1])}}


def choose_metric(run_dirs: Sequence[str]) -> tuple:
    """(metric, why) for `--metric auto`: validation curves when every run logged some, else train curves.

    Validation losses are measured on the same fixed batches by every run, so a run's offset from the law is
    its own, and the seed-to-seed spread the early forecast flags against is the spread of models. Train
    losses are measured on the batches each step draws: runs of one seed share them, so their offsets also
    carry how hard that seed's batches were (on benchmarks/bench_curve.py's CPU ladder the seeds' train
    offsets spread ±2.3% against ±0.15% on val, and the held-out curve was 6.0% off on train curves against
    2.2% on val)."""
    with warnings.catch_warnings():  # a torn last record is reported once, when the curve itself is read
        warnings.simplefilter("ignore")
        without = [d for d in run_dirs if not any(r.get("val_loss") is not None for r in read_metrics(d)[2])]
    if not without:
        return "val", "every run logged validation losses"
    return "train", (f"{len(without)} of {len(run_dirs)} runs logged no validation loss (e.g. {without[0]}; set "
                     "train.eval_interval): fitted on train losses, whose seed spread includes each seed's batches")


def read_curve(run_dir: str, metric: str = "train", smooth: int = 1) -> Curve:
    """A run's loss curve (train records, or eval records with `metric="val"`) and its schedule from config.yaml.

    `smooth` > 1 replaces each train loss by the mean of the `smooth` records centred on it (single-batch
    losses are noisy; a centred window does not lag the falling curve)."""
    if metric not in ("train", "val"):
        raise FitError(f"metric must be train or val, got {metric!r}")
    if smooth < 1:
        raise FitError(f"--smooth must be at least 1, got {smooth}")
    meta, train, evals = read_metrics(run_dir)
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    if "params" not in meta:
        raise FitError(f"{metrics_path}: the meta record has no params")
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise FitError(f"run {run_dir} has no config.yaml: the whole-curve fit needs the run's LR schedule")
    try:
        cfg = load_config(config_path)
        schedule = cfg.train
        lrs = schedule_lrs(schedule)
    except (ConfigError, ValueError) as exc:
        raise FitError(f"{config_path}: cannot compute the LR schedule ({exc})") from None
    _check_logged_lrs(metrics_path, train, lrs)
    records = train if metric == "train" else evals
    key = "loss" if metric == "train" else "val_loss"
    records = [r for r in records if r.get(key) is not None]
    if not records:
        raise FitError(f"{metrics_path} has no {metric} records with a loss"
                       + (": give the run train.eval_interval, or use --metric train" if metric == "val" else ""))
    loss = np.array([float(r[key]) for r in records])
    if metric == "train" and smooth > 1:
        loss = np.convolve(loss, np.ones(smooth), "same") / np.convolve(np.ones_like(loss), np.ones(smooth), "same")
    offset = 1 if metric == "train" else 0  # a train loss is measured before its step's update
    updates = np.array([int(r["step"]) - offset for r in records])
    return Curve(os.path.basename(os.path.normpath(run_dir)), float(meta["params"]), updates, loss, lrs,
                 schedule.warmup_steps, schedule.max_steps - offset, run_seed(run_dir),
                 cfg.tokens_per_step)


def _check_logged_lrs(path: str, train: list, lrs: np.ndarray) -> None:
    """The schedule computed from config.yaml must be the one the run trained with."""
    if not train or any("lr" not in r or r["lr"] is None for r in train):
        raise FitError(f"{path}: train records without an `lr` value; the whole-curve fit needs a megamu run's "
                       "train records (step, loss, lr)")
    for record in train:
        step = int(record["step"])
        expected = lrs[step - 1] if 1 <= step <= len(lrs) else None
        if expected is None or not math.isclose(record["lr"], expected, rel_tol=_LR_RTOL, abs_tol=1e-15):
            shown = "beyond train.max_steps" if expected is None else f"{expected:.6g}"
            raise FitError(f"{path}: step {step} logged lr {record['lr']:.6g} but config.yaml's schedule gives "
                           f"{shown} (resumed with another schedule?); fit runs with one schedule each")
