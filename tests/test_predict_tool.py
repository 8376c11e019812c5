"""Inputs to the loss predictor (run directories, CSV) and megamu-predict end to end."""
import json
import math
import os
import subprocess

import numpy as np
import pytest

from megamu.cli import predict as predict_tool  # the tool's main, called in-process for the fast cases
from megamu.errors import FitError
from megamu.scaling.points import LossPoint, read_points_csv
from megamu.scaling.predict import format_report, predict
from megamu.scaling.runs import read_run_point
from megamu.scaling.trend_checks import extreme_exponent, non_monotone
from scripts import script

TOOL = script("megamu-predict")

TOKENS_PER_STEP = 4096


def final_loss_law(params: float) -> float:
    return 30.0 * params**-0.25 + 2.0


def write_run(run_dir, params, steps=200, log_every=10, eval_every=50, seed=0, extra_lines=()):
    """A metrics.jsonl as the trainer writes it: loss decays from a transient to the law's value."""
    rng = np.random.default_rng(seed)
    floor = final_loss_law(params)
    lines = [{"kind": "meta", "params": params, "non_embedding_params": params * 0.8,
              "flops_per_token": 6 * params, "hidden_size": int(params**0.5), "n_layers": 4,
              "tp": 1, "pp": 1, "dp": 1}]
    for step in range(log_every, steps + 1, log_every):
        tokens = step * TOKENS_PER_STEP
        loss = floor + 3.0 * math.exp(-step / 20) + rng.normal(0, 0.002)
        lines.append({"kind": "train", "step": step, "tokens": tokens, "flops": 6 * params * tokens,
                      "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e4, "mfu": 0.1, "time_s": step})
        if step % eval_every == 0:
            lines.append({"kind": "eval", "step": step, "tokens": tokens, "flops": 6 * params * tokens,
                          "val_loss": loss + 0.05})
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as handle:
        for record in lines + list(extra_lines):
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return [r for r in lines if r["kind"] == "train"], [r for r in lines if r["kind"] == "eval"]


def test_final_point_is_the_mean_of_the_last_w_train_losses(tmp_path):
    train, _ = write_run(tmp_path / "w64", params=2e6)
    point = read_run_point(str(tmp_path / "w64"), smooth=5)
    assert point.loss == pytest.approx(np.mean([r["loss"] for r in train[-5:]]))
    assert (point.name, point.params, point.step) == ("w64", 2e6, 200)
    assert point.tokens == 200 * TOKENS_PER_STEP and point.flops == 6 * 2e6 * point.tokens
    assert point.width == int(2e6**0.5)


def test_point_at_a_step_or_token_count(tmp_path):
    train, evals = write_run(tmp_path / "run", params=2e6)
    by_step = {r["step"]: r for r in train}
    at_step = read_run_point(str(tmp_path / "run"), at_step=155, smooth=3)
    assert at_step.step == 150
    assert at_step.loss == pytest.approx(np.mean([by_step[s]["loss"] for s in (130, 140, 150)]))
    at_tokens = read_run_point(str(tmp_path / "run"), at_tokens=120 * TOKENS_PER_STEP, smooth=1)
    assert at_tokens.step == 120 and at_tokens.loss == by_step[120]["loss"]
    val = read_run_point(str(tmp_path / "run"), metric="val", at_step=180)
    assert val.step == 150 and val.loss == evals[2]["val_loss"]


def test_min_step_skips_the_transient_by_default(tmp_path):
    train, _ = write_run(tmp_path / "run", params=2e6)
    # Default min step for a 200-step run is 100: a 50-record window must not reach before it.
    point = read_run_point(str(tmp_path / "run"), smooth=50)
    assert point.loss == pytest.approx(np.mean([r["loss"] for r in train if r["step"] >= 100]))
    with pytest.raises(FitError, match="between step 100 .--min-step."):
        read_run_point(str(tmp_path / "run"), at_step=60)
    early = read_run_point(str(tmp_path / "run"), at_step=60, min_step=0, smooth=1)
    assert early.step == 60


def test_resumed_run_uses_the_later_record_of_a_repeated_step(tmp_path):
    resumed = {"kind": "train", "step": 200, "tokens": 200 * TOKENS_PER_STEP, "flops": 1.0, "loss": 1.2345}
    write_run(tmp_path / "run", params=2e6, extra_lines=[resumed])
    assert read_run_point(str(tmp_path / "run"), smooth=1).loss == 1.2345


@pytest.mark.parametrize(
    "extra, kwargs, message",
    [
        ([{"kind": "train", "step": 210, "tokens": 1, "flops": 1, "loss": float("nan")}], {}, "not finite at step"),
        (["{not json"], {}, r"metrics.jsonl:\d+: not valid JSON"),
        ([], {"at_step": 500}, "stopped at step 200, before --at-step 500"),
        ([], {"at_tokens": 1e12}, "before --at-tokens"),
        ([], {"smooth": 0}, "--smooth must be at least 1"),
        ([], {"min_step": -5}, "--min-step must not be negative, got -5"),
    ],
)
def test_bad_run_directories_raise_clear_errors(tmp_path, extra, kwargs, message):
    write_run(tmp_path / "run", params=2e6, extra_lines=extra)
    with pytest.raises(FitError, match=message):
        read_run_point(str(tmp_path / "run"), **kwargs)


def test_run_directory_without_metrics_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FitError, match=f"{tmp_path / 'empty'} has no metrics.jsonl"):
        read_run_point(str(tmp_path / "empty"))
    with pytest.raises(FitError, match=f"run directory {tmp_path / 'typo'} does not exist: check the path"):
        read_run_point(str(tmp_path / "typo"))


def write_csv(path, text):
    path.write_text(text)
    return str(path)


def test_csv_points_with_params_in_millions(tmp_path):
    path = write_csv(tmp_path / "p.csv", "name,params_m,tokens,loss,width\nsmall,1.5,1e9,3.1,64\n,3,2e9,2.9,\n")
    small, unnamed = read_points_csv(path, "params")
    assert (small.name, small.params, small.tokens, small.loss, small.width) == ("small", 1.5e6, 1e9, 3.1, 64)
    assert unnamed.name == f"{path}:3" and unnamed.params == 3e6 and unnamed.width is None


@pytest.mark.parametrize(
    "text, x_kind, message",
    [
        ("name,params\na,1e6\n", "params", "missing column.*loss"),
        ("name,loss\na,3.0\n", "params", "missing column.*one of params, params_m, tokens, flops"),
        ("params,loss\n1e6,3.0\n", "tokens", "missing column.*tokens"),
        ("params,params_m,loss\n1e6,1,3.0\n", "params", "both `params` and `params_m`"),
        ("params,loss\n1e6,3.0\n2e6,abc\n", "params", r"p.csv:3: column loss is 'abc', not a number"),
        ("params,loss\n1e6,nan\n", "params", r"p.csv:2: column loss is nan; every value must be finite"),
        ("params,loss\n", "params", "no rows"),
    ],
)
def test_bad_csv_names_the_problem(tmp_path, text, x_kind, message):
    with pytest.raises(FitError, match=message):
        read_points_csv(write_csv(tmp_path / "p.csv", text), x_kind)


def test_tool_end_to_end_on_run_directories(tmp_path):
    params = [1e6 * 2**i for i in range(6)]
    run_dirs = [str(tmp_path / f"w{i}") for i in range(6)]
    for seed, (run_dir, n) in enumerate(zip(run_dirs, params)):
        write_run(run_dir, params=n, seed=seed)
    out_json, out_png = tmp_path / "fit.json", tmp_path / "fit.png"
    result = subprocess.run(
        [TOOL, *run_dirs, "--holdout", "1", "--target", "1e9", "--smooth", "5",
         "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Holdout" in result.stdout and "Prediction at params = 1e+09" in result.stdout
    report = json.loads(out_json.read_text())
    assert report["form"] == "a*x^b+c" and report["x"] == "params"
    assert set(report["fit"]) == set(report["stderr"]) == {"a", "b", "c"}
    assert [p["used"] for p in report["points"]] == [True] * 5 + [False]
    assert all(set(p) >= {"x", "loss", "used"} for p in report["points"])
    (held,) = report["holdout"]
    assert set(held) == {"x", "actual", "predicted", "rel_error", "interval"}
    assert held["x"] == params[-1] and abs(held["rel_error"]) < 0.01
    assert held["interval"][0] < held["predicted"] < held["interval"][1]
    prediction = report["prediction"]
    assert prediction["x"] == 1e9 and prediction["interval"][0] < prediction["loss"] < prediction["interval"][1]
    assert prediction["loss"] == pytest.approx(final_loss_law(1e9), rel=0.02)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    missing = str(tmp_path / "no_such_run")
    os.makedirs(missing)
    failed = subprocess.run([TOOL, *run_dirs[:3], missing], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert failed.returncode == 2
    assert f"error: run directory {missing} has no metrics.jsonl" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_tool_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    csv = write_csv(tmp_path / "p.csv", "name,tokens,loss\na,1e9,3.0\nb,2e9,2.9\nc,4e9,2.8\n")
    assert predict_tool.main(["--points", csv]) == 2
    assert "missing column(s) params (or params_m)" in capsys.readouterr().err
    assert predict_tool.main(["--points", csv, "--x", "tokens", "--holdout", "1"]) == 2
    assert "2 point(s) to fit but the form has 3 parameters" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--metric", "val"], "--metric read run directories; with --points the CSV's loss is used as it is"),
    (["--at-step", "100"], "drop --at-step"),
    (["--bootstrap", "-3"], "--bootstrap N must be 0 (the delta method) or a number of resamples"),
    (["--target-tokens", "1e10"], "--target-tokens is the token count for --two-var's L(N, D)"),
])
def test_tool_refuses_options_that_would_be_ignored(tmp_path, capsys, extra, message):
    csv = write_csv(tmp_path / "p.csv", "params,loss\n1e6,3.0\n2e6,2.9\n4e6,2.85\n8e6,2.82\n")
    assert predict_tool.main(["--points", csv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_tool_refuses_a_run_given_twice(tmp_path, capsys):
    """A repeated directory would count as a second run: a fake seed and a narrower interval."""
    runs = [str(tmp_path / f"w{i}") for i in range(3)]
    for run, params in zip(runs, (1e6, 2e6, 4e6)):
        write_run(run, params)
    assert predict_tool.main([*runs, str(tmp_path / "w0" / ".")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run ") and "is given twice" in err and err.count("\n") == 1


def test_two_var_names_the_x_when_the_one_variable_fit_fails(tmp_path, capsys):
    """Runs past the compute-optimal size at each budget: their loss rises with params, so a·x^b + c along
    params cannot be fitted; the refusal says which --x to pass, and along tokens both fits run."""
    n = np.array([2e6, 4e6, 8e6, 1.6e7, 3.2e7, 6.4e7])
    d = np.array([8e8, 2e8, 5e7, 1.2e7, 3e6, 8e5])
    loss = 1.7 + 400 / n**0.34 + 410 / d**0.28
    assert np.all(np.diff(loss) > 0)
    rows = "".join(f"{ni},{di},{li}\n" for ni, di, li in zip(n, d, loss))
    csv = write_csv(tmp_path / "over.csv", "params,tokens,loss\n" + rows)
    assert predict_tool.main(["--points", csv, "--two-var", "--target", "1e8", "--target-tokens", "2e9"]) == 2
    err = capsys.readouterr().err
    assert "pass the --x they fall along (flops or tokens)" in err and err.count("\n") == 1


def test_tool_two_variable_fit_from_csv(tmp_path, capsys):
    n = np.repeat(np.geomspace(1e6, 1e8, 4), 3)
    d = np.tile(np.geomspace(1e8, 1e10, 3), 4)
    loss = 1.7 + 400 / n**0.34 + 410 / d**0.28
    rows = "".join(f"{ni},{di},{li}\n" for ni, di, li in zip(n, d, loss))
    csv = write_csv(tmp_path / "nd.csv", "params,tokens,loss\n" + rows)
    out = tmp_path / "nd.json"
    assert predict_tool.main(["--points", csv, "--two-var", "--target", "1e9", "--target-tokens", "2e10",
                              "--json", str(out)]) == 0
    two_var = json.loads(out.read_text())["two_var"]
    assert two_var["fit"]["alpha"] == pytest.approx(0.34, abs=0.01)
    assert two_var["prediction"]["loss"] == pytest.approx(1.7 + 400 / 1e9**0.34 + 410 / 2e10**0.28, rel=1e-3)
    assert "Two-variable fit" in capsys.readouterr().out
    assert predict_tool.main(["--points", csv, "--two-var", "--target", "1e9"]) == 2
    assert "--target-tokens" in capsys.readouterr().err


def test_tool_bootstrap_interval_from_csv(tmp_path):
    params = np.geomspace(1e6, 3e7, 7)
    loss = final_loss_law(params) + np.random.default_rng(2).normal(0, 0.01, len(params))
    csv = write_csv(tmp_path / "p.csv", "params,loss\n" + "".join(f"{n},{v}\n" for n, v in zip(params, loss)))
    out = tmp_path / "boot.json"
    assert predict_tool.main(["--points", csv, "--holdout", "1", "--target", "1e8", "--bootstrap", "200",
                              "--level", "0.95", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["interval_method"] == "bootstrap" and report["level"] == 0.95
    lo, hi = report["prediction"]["interval"]
    assert lo < report["prediction"]["loss"] < hi
    assert report["holdout"][0]["interval"][0] < report["holdout"][0]["predicted"] < report["holdout"][0]["interval"][1]


def test_tool_seed_offsets_from_a_csv_seed_column(tmp_path, capsys):
    params = np.geomspace(1e6, 3e7, 6)
    offsets = {7: 0.12, 8: -0.12}
    rows = "".join(f"{n},{final_loss_law(n) + d},{s}\n" for n in params for s, d in offsets.items())
    csv = write_csv(tmp_path / "seeds.csv", "params,loss,seed\n" + rows)
    out = tmp_path / "seeds.json"
    plot = tmp_path / "seeds.png"
    assert predict_tool.main(["--points", csv, "--holdout", "1", "--seed-offsets", "--json", str(out),
                              "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    assert plot.stat().st_size > 10_000
    assert report["seed_offsets"] == pytest.approx({"7": 0.12, "8": -0.12}, abs=1e-6)
    assert abs(report["holdout_mean"][0]["rel_error"]) < 1e-6
    assert "mean of 2 seeds" in capsys.readouterr().out


def test_tool_reports_the_cross_validated_form_beside_the_classic_fit(tmp_path, capsys):
    params = np.geomspace(1e6, 1e9, 9)
    loss = 25.0 * params**-0.12 * np.exp(np.random.default_rng(5).normal(0, 0.0005, len(params)))  # no floor
    csv = write_csv(tmp_path / "p.csv", "params,loss\n" + "".join(f"{n},{v}\n" for n, v in zip(params, loss)))
    out = tmp_path / "sel.json"
    assert predict_tool.main(["--points", csv, "--holdout", "1", "--target", "1e10", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["form"] == "a*x^b+c" and set(report["fit"]) == {"a", "b", "c"}  # the contract is unchanged
    selection = report["selection"]
    assert selection["chosen"] == "a*x^b" and selection["folds"] >= 3
    assert set(selection["cv_error"]) == {"a*x^b+c", "a*x^b"}
    (held,) = selection["holdout"]
    assert held["x"] == params[-1] and abs(held["rel_error"]) < 0.005
    assert held["interval"][0] <= held["actual"] <= held["interval"][1]
    lo, hi = selection["prediction"]["interval"]
    assert 0 < lo < 25.0 * 1e10**-0.12 < hi
    assert "Form selection by expanding-window cross-validation: a*x^b" in capsys.readouterr().out


def test_tool_says_when_points_cannot_measure_their_own_error(tmp_path, capsys):
    params = np.geomspace(1e6, 3e7, 4)
    csv = write_csv(tmp_path / "p.csv", "params,loss\n" + "".join(f"{n},{final_loss_law(n)}\n" for n in params))
    out = tmp_path / "exact.json"
    assert predict_tool.main(["--points", csv, "--holdout", "1", "--json", str(out)]) == 0
    selection = json.loads(out.read_text())["selection"]
    printed = capsys.readouterr().out
    # Three fitted points: no fold fits both forms, so the classic one stands, exactly, with no interval.
    assert selection["chosen"] == "a*x^b+c" and selection["folds"] == 0 and "by default" in selection["reason"]
    assert any("as many points as parameters" in n for n in selection["notes"])
    assert selection["holdout"][0]["interval"] is None
    assert "as many points as parameters" in printed and "no interval can be given" in printed
    assert "exact fit: no residual degrees of freedom, no uncertainty" in printed


def ladder_points(losses, start=1e5):
    x = np.geomspace(start, start * 2 ** (len(losses) - 1), len(losses))
    return [LossPoint(f"r{i}", float(loss), params=float(n)) for i, (n, loss) in enumerate(zip(x, losses))]


def test_one_residual_degree_of_freedom_takes_the_selections_interval_and_says_why():
    # The demo's case: four fitted rungs and three parameters; the classic delta method would rest on one residual.
    x = np.geomspace(1e5, 1.6e6, 5)
    losses = final_loss_law(x) * np.exp(np.random.default_rng(3).normal(0, 0.01, 5))
    report, _ = predict(ladder_points(losses), "params", holdout=1, target=1.3e7)
    assert report["dof"] == 1 and report["interval_source"] == "selection"
    assert "1 residual degree(s) of freedom" in report["interval_note"] and "selection's" in report["interval_note"]
    held, sel = report["holdout"][0], report["selection"]["holdout"][0]
    # The selection's interval relative to its own prediction, placed on the classic prediction.
    np.testing.assert_allclose(np.divide(held["interval"], held["predicted"]),
                               np.divide(sel["interval"], sel["predicted"]))
    prediction = report["prediction"]
    for lo, hi, centre in [(*held["interval"], held["predicted"]), (*prediction["interval"], prediction["loss"])]:
        assert 0 < lo < centre < hi < 6 * centre
    assert "note on the intervals above" in format_report(report)


def test_enough_points_keep_the_classic_delta_interval():
    report, _ = predict(ladder_points(final_loss_law(np.geomspace(1e5, 1e5 * 2**7, 8))), "params", holdout=1)
    assert report["interval_source"] == "delta" and report["interval_note"] is None and report["warnings"] == []


def test_a_rising_ladder_is_warned_about_and_a_missed_point_is_no_exact_fit():
    report, _ = predict(ladder_points([3.0, 3.1, 2.5, 2.4]), "params", holdout=1)
    assert len(report["warnings"]) == 1
    assert "does not fall with params (3 at params = 1e+05 -> 3.1" in report["warnings"][0]
    printed = format_report(report)
    assert "exact fit" not in printed and "cannot pass through these points" in printed


def test_an_extreme_exponent_is_warned_about():
    report, _ = predict(ladder_points([3.0, 2.5, 2.45, 2.44]), "params", holdout=1)
    assert any("fitted exponent b = -3.32 is extreme" in w for w in report["warnings"])
    assert "exact fit: no residual degrees of freedom" in format_report(report)  # it does pass through all three
    assert extreme_exponent("b", -0.3) == [] and non_monotone(np.array([1.0, 2.0]), np.array([3.0, 2.0]), "x") == []
