"""Power-law fitting: recovery of a known law, interval coverage, holdout, two-variable form, bad input."""
import numpy as np
import pytest

from megamu.scaling.fit import (
    FitError,
    bootstrap_interval,
    evaluate_holdout,
    fit_power_law,
    prediction_interval,
    split_holdout,
)
from megamu.scaling.two_var import fit_two_var

TRUE_A, TRUE_B, TRUE_C = 30.0, -0.25, 2.0
NOISE = 0.01
LADDER = np.geomspace(1e6, 3e7, 8)
TARGET = 4 * LADDER[-1]


def law(x):
    return TRUE_A * np.asarray(x) ** TRUE_B + TRUE_C


def noisy(x, seed, noise=NOISE):
    return law(x) + np.random.default_rng(seed).normal(0, noise, len(x))


def test_fit_recovers_known_law_within_its_standard_errors():
    x = np.geomspace(1e6, 1e9, 16)
    fit = fit_power_law(x, noisy(x, seed=3, noise=0.002))
    for name, truth in (("a", TRUE_A), ("b", TRUE_B), ("c", TRUE_C)):
        estimate = getattr(fit, name)
        assert abs(estimate - truth) < 3 * fit.stderr[name], (name, estimate, fit.stderr[name])
    assert fit.b == pytest.approx(TRUE_B, abs=0.02)
    assert fit.c == pytest.approx(TRUE_C, abs=0.03)
    np.testing.assert_allclose(fit.residuals, fit.loss - fit.predict(x))
    assert fit.sigma == pytest.approx(0.002, rel=0.5)


def test_fit_is_exact_on_noise_free_points_in_any_units():
    # Units from 1 to 1e12: the normalised parametrisation must not care.
    for scale in (1e-6, 1.0, 1e3):
        x = LADDER * scale
        a_in_units = TRUE_A * scale ** (-TRUE_B)
        fit = fit_power_law(x, a_in_units * x**TRUE_B + TRUE_C)
        assert fit.b == pytest.approx(TRUE_B, rel=1e-5)
        assert fit.c == pytest.approx(TRUE_C, rel=1e-5)
        assert fit.a == pytest.approx(a_in_units, rel=1e-4)


def test_delta_interval_covers_new_runs_at_about_the_nominal_rate():
    seeds = 200
    hits = {0.9: [], 0.5: []}
    for seed in range(seeds):
        fit = fit_power_law(LADDER, noisy(LADDER, seed))
        actual = law(TARGET) + np.random.default_rng(10_000 + seed).normal(0, NOISE)
        for level, record in hits.items():
            lo, hi = fit.interval(TARGET, level)[0]
            record.append(lo <= actual <= hi)
    # Binomial sd at n=200 is 0.021 (0.035 at 50%): bands of about ±3 sd around nominal, so
    # an interval of the wrong width (e.g. a 50% interval passed off as 90%) fails.
    assert 0.84 <= np.mean(hits[0.9]) <= 0.96, np.mean(hits[0.9])
    assert 0.40 <= np.mean(hits[0.5]) <= 0.60, np.mean(hits[0.5])


def test_bootstrap_interval_brackets_the_prediction_with_a_sensible_width():
    fit = fit_power_law(LADDER, noisy(LADDER, seed=1))
    boot = bootstrap_interval(fit, TARGET, 0.9, n_resamples=200, seed=0)[0]
    delta = fit.interval(TARGET, 0.9)[0]
    assert boot[0] < fit.predict(TARGET) < boot[1]
    assert 0.3 < (boot[1] - boot[0]) / (delta[1] - delta[0]) < 3
    again = bootstrap_interval(fit, TARGET, 0.9, n_resamples=200, seed=0)[0]
    np.testing.assert_array_equal(boot, again)  # seeded: reproducible
    with pytest.raises(FitError, match="too few resamples"):
        bootstrap_interval(fit, TARGET, 0.9, n_resamples=5)


def test_reported_interval_never_goes_below_zero_loss():
    x = LADDER[:5]
    loss = 0.02 * x ** -0.3 + np.random.default_rng(3).normal(0, 0.02, len(x)) + 0.05  # noise ~ the loss itself
    fit = fit_power_law(x, np.abs(loss))
    assert fit.interval(TARGET, 0.99)[0][0] < 0  # the raw delta method would report a negative loss
    lo, hi = prediction_interval(fit, TARGET, 0.99)[0]  # what the tool reports (bootstrap: the same cut)
    assert lo == 0.0 < hi


def test_holdout_drops_the_largest_x_and_scores_them():
    x = np.array([8.0, 1.0, 32.0, 2.0, 16.0, 4.0, 64.0]) * 1e6
    used = split_holdout(x, 2)
    assert sorted(x[~used]) == [32e6, 64e6]
    assert used.sum() == 5
    loss = noisy(x, seed=7)
    fit = fit_power_law(x[used], loss[used])
    held = evaluate_holdout(fit, x[~used], loss[~used], fit.interval(x[~used], 0.9))
    for point, xi, actual in zip(held, x[~used], loss[~used]):
        predicted = float(fit.predict(xi))
        assert point.x == xi and point.actual == actual
        assert point.predicted == pytest.approx(predicted)
        assert point.rel_error == pytest.approx((predicted - actual) / actual)
        lo, hi = point.interval
        assert lo < predicted < hi
    with pytest.raises(FitError, match="--holdout 7"):
        split_holdout(x, 7)


def test_holdout_keeps_repeated_runs_of_one_size_together():
    x = np.array([1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 8.0, 8.0]) * 1e6  # two seeds per size
    used = split_holdout(x, 1)
    assert sorted(x[~used]) == [8e6, 8e6]
    assert sorted(x[~split_holdout(x, 2)]) == [4e6, 4e6, 8e6, 8e6]
    with pytest.raises(FitError, match="distinct x"):
        split_holdout(x, 4)


def test_holdout_on_an_exact_law_predicts_the_held_out_loss():
    fit = fit_power_law(LADDER[:-1], law(LADDER[:-1]))
    (point,) = evaluate_holdout(fit, LADDER[-1:], law(LADDER[-1:]), fit.interval(LADDER[-1:], 0.9))
    assert abs(point.rel_error) < 1e-6


def test_three_points_fit_exactly_without_uncertainty():
    x = LADDER[:3]
    fit = fit_power_law(x, law(x))
    assert fit.dof == 0 and fit.stderr is None
    assert fit.interval(TARGET, 0.9) is None
    assert bootstrap_interval(fit, TARGET, 0.9, 100) is None


@pytest.mark.parametrize(
    "x, loss, message",
    [
        ([1e6, 2e6], [3.0, 2.9], "2 point.*3 parameters"),
        ([1e6, 2e6, 4e6, 8e6], [3.0, float("nan"), 2.8, 2.7], "finite and positive"),
        ([1e6, 2e6, 4e6, 8e6], [3.0, float("inf"), 2.8, 2.7], "finite and positive"),
        ([1e6, 1e6, 1e6, 1e6], [3.0, 2.9, 2.8, 2.7], "same x"),
        ([1e6, -2e6, 4e6, 8e6], [3.0, 2.9, 2.8, 2.7], "x must be finite and positive"),
        ([1e6, 2e6, 4e6, 8e6, 16e6], [2.0, 2.1, 2.2, 2.3, 2.4], "does not fall with x"),
        ([1e6, 2e6, 4e6, 8e6, 16e6], [2.0] * 5, "does not fall with x"),
    ],
)
def test_bad_points_raise_clear_fit_errors(x, loss, message):
    with pytest.raises(FitError, match=message):
        fit_power_law(x, loss)


def two_var_law(n, d):
    return 1.7 + 400 / n**0.34 + 410 / d**0.28


def test_two_variable_fit_recovers_exponents_and_predicts():
    n = np.repeat(np.geomspace(1e6, 1e8, 5), 4)
    d = np.tile(np.geomspace(1e8, 1e10, 4), 5)
    loss = two_var_law(n, d) * np.exp(np.random.default_rng(0).normal(0, 0.002, len(n)))
    fit = fit_two_var(n, d, loss)
    assert fit.alpha == pytest.approx(0.34, abs=0.03)
    assert fit.beta == pytest.approx(0.28, abs=0.03)
    assert fit.E == pytest.approx(1.7, abs=0.1)
    truth = two_var_law(1e9, 2e10)
    assert float(fit.predict(1e9, 2e10)[0]) == pytest.approx(truth, rel=0.01)
    lo, hi = fit.interval(1e9, 2e10, 0.95)[0]
    assert lo < fit.predict(1e9, 2e10)[0] < hi


def test_two_variable_fit_refuses_points_that_vary_in_one_variable():
    n = np.geomspace(1e6, 1e8, 8)
    with pytest.raises(FitError, match="vary in both"):
        fit_two_var(n, np.full(8, 1e9), two_var_law(n, 1e9))
    with pytest.raises(FitError, match="5 parameters"):
        fit_two_var(n[:4], n[:4] * 10, two_var_law(n[:4], n[:4] * 10))


def seeded_ladder(offsets: dict, noise: float, rng_seed: int):
    """Every seed at every size of LADDER: the law plus the seed's offset plus small per-run noise."""
    from megamu.scaling.points import LossPoint

    rng = np.random.default_rng(rng_seed)
    return [LossPoint(name=f"x{i}_s{s}", loss=float(law(x) + d + rng.normal(0, noise)), params=float(x), seed=s)
            for i, x in enumerate(LADDER) for s, d in offsets.items()]


def test_seed_offsets_recover_each_seeds_luck_and_predict_the_seed_mean():
    from megamu.scaling.predict import predict

    offsets = {1: 0.15, 2: -0.10, 3: -0.05}  # μP ladders: a seed's luck is shared by every width
    points = seeded_ladder(offsets, noise=0.003, rng_seed=0)
    report, fit = predict(points, holdout=1, seed_offsets=True)
    assert report["seed_offsets"] == pytest.approx({str(s): d for s, d in offsets.items()}, abs=0.005)
    assert fit.b == pytest.approx(TRUE_B, abs=0.05) and report["dof"] == 21 - 3 - 2
    assert all(abs(h["rel_error"]) < 0.005 for h in report["holdout"])  # each seed at curve + its offset
    (mean,) = report["holdout_mean"]
    assert mean["runs"] == 3 and abs(mean["rel_error"]) < 0.003
    assert mean["interval"][0] <= mean["actual"] <= mean["interval"][1]
    # Ignoring the offsets leaves them in the residuals: a far noisier fit of the same points.
    plain, _ = predict(points, holdout=1)
    assert plain["residual_std"] > 10 * report["residual_std"]


def test_seed_offsets_refuse_unbalanced_or_unseeded_points():
    from megamu.scaling.points import LossPoint
    from megamu.scaling.predict import predict

    points = seeded_ladder({1: 0.1, 2: -0.1}, noise=0.003, rng_seed=1)
    with pytest.raises(FitError, match="every seed at every fitted size.*seeds 1 and 2 differ"):
        predict(points[1:], holdout=1, seed_offsets=True)  # seed 1 lacks the smallest size
    with pytest.raises(FitError, match="point 'odd' has no seed"):
        predict([*points, LossPoint(name="odd", loss=3.0, params=1e6)], holdout=1, seed_offsets=True)
    with pytest.raises(FitError, match="at least 2 seeds"):
        predict([p for p in points if p.seed == 1], holdout=1, seed_offsets=True)
