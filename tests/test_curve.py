"""Whole-curve fits (scaling/curve.py), early forecasts (scaling/early.py) and megamu-curve, on synthetic curves."""
import json
import math
import os

import numpy as np
import pytest
import yaml

from megamu.cli import curve as curve_tool
from megamu.config import TrainConfig
from megamu.errors import FitError
from megamu.scaling.curve import Curve, CurveFit, curve_errors, fit_curves, offset_seeds, read_curve, schedule_lrs
from megamu.scaling.curve_report import curve_report, format_curve_report
from megamu.scaling.early import early_forecast, seed_spread

# The synthetic law: θ = (E, B, A, C, β, α, log τ, log q) at N_ref = 1e6; q = 3: the curves fan out.
TRUE = np.array([1.8, 0.9, 0.6, 2.0, 0.35, 0.45, math.log(40.0), math.log(3.0)])
N_REF = 1e6
STEPS, WARMUP, PEAK_LR, LOG_EVERY = 400, 20, 4e-3, 5
FIT_SIZES = (2.5e5, 5e5, 1e6)
HELD_OUT = 8e6  # 8× the largest fitted size


def schedule(kind: str, steps: int = STEPS) -> np.ndarray:
    return schedule_lrs(TrainConfig(schedule=kind, max_steps=steps, warmup_steps=WARMUP, lr=PEAK_LR,
                                    min_lr_ratio=0.1, decay_fraction=0.2))


def true_curve(params: float, kind: str, noise: float = 0.0, seed: int = 0, shift: float = 0.0,
               steps: int = STEPS) -> Curve:
    """A train curve of the synthetic law, optionally with relative noise and a constant log shift."""
    lrs = schedule(kind, steps)
    updates = np.arange(LOG_EVERY, steps + 1, LOG_EVERY) - 1
    law = CurveFit(TRUE, N_REF, 0.0, (), params).predict(params, lrs, updates)
    rng = np.random.default_rng(seed)
    loss = law * np.exp(shift + noise * rng.standard_normal(len(law)))
    return Curve(f"N{params:.3g}_{kind}_s{seed}", params, updates, loss, lrs, WARMUP, steps - 1, seed)


@pytest.fixture(scope="module")
def cosine_fit():
    return fit_curves([true_curve(n, "cosine") for n in FIT_SIZES])


def test_joint_fit_recovers_the_synthetic_law(cosine_fit):
    fitted = cosine_fit.theta.copy()
    fitted[1] *= (cosine_fit.n_ref / N_REF) ** fitted[4]  # B to N_REF's units
    assert cosine_fit.rms_rel < 1e-4
    np.testing.assert_allclose(fitted, TRUE, rtol=0.03)


def test_held_out_width_and_unseen_schedule_are_predicted(cosine_fit):
    """Fit on cosine at three sizes, predict a WSD run 8× larger (and a cosine one of the same size)."""
    for kind in ("wsd", "cosine"):
        errors = curve_errors(cosine_fit, true_curve(HELD_OUT, kind))
        assert errors["size_ratio"] == pytest.approx(8.0)
        assert errors["mean_rel_error"] < 1e-3 and errors["max_rel_error"] < 3e-3, (kind, errors)


def test_a_wrong_law_is_not_predicted_within_tolerance(cosine_fit):
    """The check can fail: a WSD curve whose cool-down does nothing is off the fitted law."""
    curve = true_curve(HELD_OUT, "wsd")
    flat = Curve(curve.name, curve.params, curve.updates, curve.loss.copy(), curve.lrs, WARMUP, curve.final_updates)
    decay = flat.updates >= STEPS * 0.8
    flat.loss[decay] = flat.loss[np.argmax(decay) - 1]
    assert curve_errors(cosine_fit, flat)["max_rel_error"] > 0.01


def test_noisy_curves_with_seeds_give_an_early_forecast_and_a_flag():
    fitted = [true_curve(n, "cosine", noise=0.003, seed=s, shift=0.004 * (s - 1)) for n in FIT_SIZES for s in (0, 1, 2)]
    fit = fit_curves(fitted)
    np.testing.assert_allclose([fit.offsets[s] for s in (0, 1, 2)], [-0.004, 0.0, 0.004], atol=1e-3)
    spread = seed_spread(fit, fitted)
    assert spread == pytest.approx(0.004, rel=0.5)
    target = true_curve(HELD_OUT, "wsd", noise=0.003, seed=7)
    early = early_forecast(fit, target.prefix(0.2), spread)
    assert early.seen_updates <= 0.2 * STEPS and early.final_updates == STEPS - 1
    truth = true_curve(HELD_OUT, "wsd").loss[-1]
    assert abs(early.predicted_final / truth - 1) < 0.01
    assert early.flagged is False
    bad = early_forecast(fit, true_curve(HELD_OUT, "wsd", noise=0.003, seed=7, shift=0.05).prefix(0.2), spread)
    assert bad.flagged is True and bad.offset == pytest.approx(0.05, abs=0.01)
    assert bad.predicted_final == pytest.approx(truth * math.exp(0.05), rel=0.01)


def test_without_repeated_seeds_the_spread_is_unknown(cosine_fit):
    curves = [true_curve(n, "cosine") for n in FIT_SIZES]
    assert seed_spread(cosine_fit, curves) is None
    early = early_forecast(cosine_fit, true_curve(HELD_OUT, "wsd").prefix(0.2), None)
    assert early.flagged is None and "unknown" in early.verdict()


def test_too_few_sizes_are_refused():
    with pytest.raises(FitError, match="3 or more sizes"):
        fit_curves([true_curve(n, "cosine") for n in FIT_SIZES[:2]])


# ---- run directories and the tool -------------------------------------------------------------------------------

def write_run(run_dir, curve: Curve, kind: str, lr_records: bool = True, val: Curve = None) -> str:
    """A run directory as megamu's trainer leaves it: config.yaml (the schedule) and metrics.jsonl (eval
    records from `val`'s curve, measured after the update of their step, when given)."""
    os.makedirs(run_dir, exist_ok=True)
    train = {"max_steps": len(curve.lrs), "warmup_steps": WARMUP, "lr": PEAK_LR, "schedule": kind,
             "min_lr_ratio": 0.1, "decay_fraction": 0.2, "seed": curve.seed}
    with open(os.path.join(run_dir, "config.yaml"), "w") as handle:
        yaml.safe_dump({"train": train}, handle)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as handle:
        handle.write(json.dumps({"kind": "meta", "params": curve.params}) + "\n")
        for k, loss in zip(curve.updates, curve.loss):
            record = {"kind": "train", "step": int(k) + 1, "tokens": int(k + 1) * 512, "loss": float(loss)}
            if lr_records:
                record["lr"] = float(curve.lrs[k])
            handle.write(json.dumps(record) + "\n")
        for k, loss in zip(val.updates if val else [], val.loss if val else []):
            handle.write(json.dumps({"kind": "eval", "step": int(k), "val_loss": float(loss)}) + "\n")
    return str(run_dir)


def test_read_curve_computes_the_schedule_and_checks_the_logged_lr(tmp_path):
    source = true_curve(5e5, "wsd")
    curve = read_curve(write_run(tmp_path / "w", source, "wsd"))
    np.testing.assert_array_equal(curve.updates, source.updates)
    np.testing.assert_allclose(curve.lrs, source.lrs)
    assert (curve.params, curve.warmup_steps, curve.final_updates) == (5e5, WARMUP, STEPS - 1)
    with open(tmp_path / "w" / "config.yaml", "w") as handle:  # the config now says cosine: not what ran
        yaml.safe_dump({"train": {"max_steps": STEPS, "warmup_steps": WARMUP, "lr": PEAK_LR, "schedule": "cosine"}},
                       handle)
    with pytest.raises(FitError, match="config.yaml's schedule gives"):
        read_curve(str(tmp_path / "w"))


def test_smoothing_is_a_centred_mean(tmp_path):
    source = true_curve(5e5, "constant", noise=0.01)
    curve = read_curve(write_run(tmp_path / "w", source, "constant"), smooth=3)
    np.testing.assert_allclose(curve.loss[1:-1], (source.loss[:-2] + source.loss[1:-1] + source.loss[2:]) / 3)
    np.testing.assert_allclose(curve.loss[0], source.loss[:2].mean())


def test_tool_fits_holds_out_forecasts_early_and_plots(tmp_path, capsys):
    runs = [write_run(tmp_path / f"n{i}", true_curve(n, "cosine"), "cosine") for i, n in enumerate(FIT_SIZES)]
    target = write_run(tmp_path / "big", true_curve(HELD_OUT, "wsd"), "wsd")
    out, png, config = tmp_path / "curve.json", tmp_path / "curve.png", tmp_path / "target.yaml"
    config.write_text(yaml.safe_dump({"model": {"vocab_size": 1024},
                                      "train": {"max_steps": 2 * STEPS, "warmup_steps": WARMUP, "lr": PEAK_LR,
                                                "schedule": "wsd", "decay_fraction": 0.2}}))
    code = curve_tool.main([*runs, target, "--holdout", "1", "--early", target, "--fraction", "0.2",
                            "--target", str(config), "--target-params", "3e6", "--json", str(out), "--plot", str(png)])
    assert code == 0
    report = json.loads(out.read_text())
    (held,) = report["holdout"]
    assert held["name"] == "big" and held["mean_rel_error"] < 1e-3
    assert report["early"]["flagged"] is None and abs(report["early"]["predicted_final"] / held["final"]["actual"] - 1) < 0.01
    truth = CurveFit(TRUE, N_REF, 0.0, (), 3e6).predict(3e6, schedule("wsd", 2 * STEPS), np.array([2 * STEPS]))[0]
    assert report["target"]["final_updates"] == 2 * STEPS
    assert report["target"]["final_loss"] == pytest.approx(truth, rel=1e-3)
    assert png.stat().st_size > 10_000
    assert "big" in capsys.readouterr().out


def test_auto_metric_fits_validation_curves_when_every_run_logged_them(tmp_path, capsys):
    """Validation curves (here the law 5% above the train curves) are fitted when every run has them, and the
    early run's offset is measured on them; one run without any falls the whole ladder back to train curves."""
    runs = [write_run(tmp_path / f"n{i}", true_curve(n, "cosine", noise=0.01, seed=i), "cosine",
                      val=true_curve(n, "cosine", shift=0.05)) for i, n in enumerate(FIT_SIZES)]
    early = write_run(tmp_path / "big", true_curve(HELD_OUT, "wsd", noise=0.01), "wsd",
                      val=true_curve(HELD_OUT, "wsd", shift=0.05))
    out = tmp_path / "curve.json"
    assert curve_tool.main([*runs, "--early", early, "--fraction", "0.2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["metric"] == "val" and "curves: val loss (every run logged" in capsys.readouterr().out
    # the run's end: after update STEPS (its last val record is after update STEPS - 1)
    truth = CurveFit(TRUE, N_REF, 0.0, (), HELD_OUT).predict(HELD_OUT, schedule("wsd"), np.array([STEPS]))[0]
    assert report["early"]["predicted_final"] == pytest.approx(truth * math.exp(0.05), rel=1e-3)
    assert report["rms_rel"] < 1e-3  # the noiseless val curves, not the 1%-noisy train losses

    bare = write_run(tmp_path / "bare", true_curve(2e6, "cosine", noise=0.01), "cosine")
    assert curve_tool.main([*runs, bare, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["metric"] == "train" and "1 of 4 runs logged no validation loss" in report["metric_reason"]
    assert report["rms_rel"] > 3e-3
    assert curve_tool.main([*runs, "--metric", "train", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["metric"] == "train"
    assert curve_tool.main([*runs, bare, "--metric", "val"]) == 2
    assert "has no val records with a loss: give the run train.eval_interval, or use --metric train" \
        in capsys.readouterr().err


def test_tool_refuses_a_run_given_twice(tmp_path, capsys):
    """A repeated directory would be a second run of the same seed: a spread of zero that flags everything."""
    runs = [write_run(tmp_path / f"n{i}", true_curve(n, "cosine"), "cosine") for i, n in enumerate(FIT_SIZES)]
    assert curve_tool.main([*runs, str(tmp_path / "n0" / ".")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run ") and "is given twice" in err and err.count("\n") == 1


@pytest.mark.parametrize("train, message", [
    ({"max_steps": 0}, "train.max_steps must be positive"),
    ({"lr": -1.0}, "train.lr must be positive"),
    ({"global_batch_size": 64, "micro_batch_size": 64}, "the curve law counts updates"),
])
def test_the_target_config_is_checked_as_megamu_train_would(tmp_path, capsys, train, message):
    runs = [write_run(tmp_path / f"n{i}", true_curve(n, "cosine"), "cosine") for i, n in enumerate(FIT_SIZES)]
    config = tmp_path / "target.yaml"
    config.write_text(yaml.safe_dump({"model": {"vocab_size": 1024},
                                      "train": {"max_steps": STEPS, "warmup_steps": WARMUP, "lr": PEAK_LR,
                                                "schedule": "wsd", **train}}))
    assert curve_tool.main([*runs, "--target", str(config), "--target-params", "3e6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_warm_up_longer_than_the_target_run_is_shortened_and_said(tmp_path, capsys):
    runs = [write_run(tmp_path / f"n{i}", true_curve(n, "cosine"), "cosine") for i, n in enumerate(FIT_SIZES)]
    config = tmp_path / "target.yaml"
    config.write_text(yaml.safe_dump({"model": {"vocab_size": 1024},
                                      "train": {"max_steps": 50, "warmup_steps": 80, "lr": PEAK_LR}}))
    out_json = tmp_path / "curve.json"
    assert curve_tool.main([*runs, "--target", str(config), "--target-params", "3e6", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert f"note: {config}: train.warmup_steps=80 is longer than train.max_steps=50" in out
    assert json.loads(out_json.read_text())["target"]["final_updates"] == 50


def test_an_early_forecast_of_a_finished_run_shows_its_actual_end(tmp_path, capsys):
    runs = [write_run(tmp_path / f"n{i}", true_curve(n, "cosine"), "cosine") for i, n in enumerate(FIT_SIZES)]
    done = write_run(tmp_path / "big", true_curve(HELD_OUT, "wsd", shift=0.01), "wsd")
    assert curve_tool.main([*runs, "--early", done]) == 0
    out = capsys.readouterr().out
    actual = true_curve(HELD_OUT, "wsd", shift=0.01).loss[-1]
    assert f"the run has finished: actual {actual:.4f}" in out
    assert curve_tool.main([*runs, "--early", done, "--fraction", "0.2"]) == 0
    assert "the run has finished" not in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("two_sizes", "3 or more sizes"),
    ("no_lr", "without an `lr` value"),
    ("no_config", "has no config.yaml"),
])
def test_tool_user_errors_are_one_line(tmp_path, capsys, case, message):
    sizes = FIT_SIZES[:2] if case == "two_sizes" else FIT_SIZES
    runs = [write_run(tmp_path / f"n{i}", true_curve(n, "cosine"), "cosine", lr_records=case != "no_lr")
            for i, n in enumerate(sizes)]
    if case == "no_config":
        os.remove(os.path.join(runs[0], "config.yaml"))
    assert curve_tool.main(runs) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_parameters_on_a_bound_are_reported_as_not_pinned(cosine_fit):
    """A fit whose truth has no annealing (C = 0) ends with C on its bound and says so; the interior truth does not."""
    assert cosine_fit.at_bounds == ()
    no_anneal = TRUE.copy()
    no_anneal[3] = 0.0
    curves = []
    for n in FIT_SIZES:
        curve = true_curve(n, "cosine")
        loss = CurveFit(no_anneal, N_REF, 0.0, (), n).predict(n, curve.lrs, curve.updates)
        curves.append(Curve(curve.name, n, curve.updates, loss, curve.lrs, WARMUP, curve.final_updates))
    report, fit, _ = curve_report(curves)
    assert "C" in fit.at_bounds and "C" in report["fit"]["at_bounds"]
    assert "not pinned by these runs" in format_curve_report(report)


def test_seed_offsets_only_for_seeds_linked_by_a_shared_size():
    """An offset is measured against another seed at the same size; seeds each at a size of their own would trade
    their offsets against the size term, so they get none."""
    alone = [true_curve(n, "cosine", seed=i) for i, n in enumerate(FIT_SIZES)]
    assert offset_seeds(alone) == []
    linked = [true_curve(n, "cosine", seed=1) for n in FIT_SIZES] + [true_curve(FIT_SIZES[0], "cosine", seed=2)]
    assert offset_seeds(linked) == [1, 2]
    assert offset_seeds(linked + [true_curve(HELD_OUT, "cosine", seed=3)]) == []


def fanning(params: float, kind: str, shift: float = 0.0, seed: int = 0) -> Curve:
    """The synthetic law with a fan-out it cannot quite follow: larger models gain a little more as training goes on."""
    curve = true_curve(params, kind, seed=seed, shift=shift)
    extra = np.exp(-0.01 * math.log(params / N_REF) * curve.updates / STEPS)
    return Curve(curve.name, params, curve.updates, curve.loss * extra, curve.lrs, WARMUP, curve.final_updates, seed)


def test_the_flag_allows_for_the_drift_the_law_showed_extrapolating_to_its_largest_size():
    """A healthy run 8× beyond the ladder sits off the law by the law's own extrapolation error, more than the seed
    spread: measured by leaving the ladder's largest size out, it is allowed for on its side; a run as far off on
    the other side, or 3% off, is flagged."""
    sizes = (2.5e5, 5e5, 1e6, 2e6)
    fitted = [fanning(n, "cosine", seed=1) for n in sizes] + [fanning(sizes[0], "cosine", shift=0.001, seed=2)]
    report, fit, _ = curve_report(fitted, early=fanning(16e6, "wsd", seed=1).prefix(0.2))
    early = report["early"]
    assert early["offset"] < -2 * early["spread"]  # beyond the seed spread alone, below the law
    assert early["drift"] == pytest.approx(early["offset"], rel=0.5) and early["flagged"] is False
    assert "the law's expected error at this size" in early["verdict"]
    # 3% off either way, or as far above the law as the healthy run is below it
    for shift in (-0.03, 0.03, -2 * early["offset"]):
        report, _, _ = curve_report(fitted, early=fanning(16e6, "wsd", shift=shift, seed=1).prefix(0.2))
        assert report["early"]["flagged"] is True, (shift, report["early"]["verdict"])
    # three sizes leave none to hold out: the drift is not measured, and the verdict says so
    three = [c for c in fitted if c.params != sizes[-1]]
    report, _, _ = curve_report(three, early=fanning(16e6, "wsd", seed=1).prefix(0.2))
    assert report["early"]["drift"] is None and "one to leave out" in report["early"]["verdict"]
    # two largest sizes close together: a small offset over a small distance is noise, not measured
    close = fitted + [fanning(2.2e6, "cosine", seed=1)]
    report, _, _ = curve_report(close, early=fanning(16e6, "wsd", seed=1).prefix(0.2))
    assert report["early"]["drift"] is None and "too close" in report["early"]["verdict"]
    # within the ladder's sizes the law does not extrapolate: no drift
    report, _, _ = curve_report(fitted[:-2] + fitted[-1:], early=fanning(sizes[-2], "wsd", seed=1).prefix(0.2))
    assert report["early"]["drift"] == 0.0
