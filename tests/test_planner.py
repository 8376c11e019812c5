"""The compute-optimal planner: numeric optimum against Chinchilla's closed form, constraints, laws from
files and fits with their intervals, the shape and config it writes, and megamu-plan end to end."""
import json
import math

import numpy as np
import pytest
import yaml

from megamu.cli import plan as plan_tool  # the tool's main, called in-process
from megamu.config import ConfigError, load_config, resolve
from megamu.errors import FitError
from megamu.model import param_counts
from megamu.scaling.forms import FORMS, design, fit_form, t_quantile
from megamu.scaling.nd_law import PUBLISHED, NDLaw, law_from_fit, load_law_file
from megamu.scaling.planner import allocate, closed_form_params, optimal_params, plan, shape_for_params
from megamu.shipped import shipped_path

VOCAB = ["model.vocab_size=32000"]
TRUE_LAW = NDLaw(1.9, 400.0, 0.34, 1500.0, 0.36, "synthetic")


def write_runs_csv(path, law: NDLaw, noise: float = 0.004, seed: int = 0):
    """An N × D grid of runs on `law` with multiplicative noise, in megamu-predict's CSV format."""
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.geomspace(2e7, 4e8, 5), np.geomspace(4e8, 2e10, 5))
    loss = law.loss(n.ravel(), d.ravel()) * np.exp(rng.normal(0, noise, n.size))
    lines = ["params,tokens,loss"] + [f"{a},{b},{c}" for a, b, c in zip(n.ravel(), d.ravel(), loss)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_numeric_optimum_matches_the_closed_form(name):
    law = PUBLISHED[name]
    for flops in (1e18, 5.76e23, 1e26):
        numeric, closed = optimal_params(law, flops), closed_form_params(law, flops)
        assert numeric == pytest.approx(closed, rel=1e-3)
        # and it is a minimum of the IsoFLOP curve, not a point the optimiser stopped at
        loss = lambda n: float(law.loss(n, flops / (6 * n)))  # noqa: E731
        assert loss(numeric) < min(loss(numeric * 1.05), loss(numeric / 1.05))
    # N_opt ∝ C^(β/(α+β)) across three decades
    slope = math.log(optimal_params(law, 1e24) / optimal_params(law, 1e21)) / math.log(1e3)
    assert slope == pytest.approx(law.beta / (law.alpha + law.beta), rel=1e-3)


def test_constraints_fix_the_ratio_or_the_size_on_the_budget():
    law = PUBLISHED["chinchilla-besiroglu"]
    ratio = allocate(law, 1e22, tokens_per_param=5.0)
    assert ratio.tokens / ratio.params == pytest.approx(5.0)
    assert 6 * ratio.params * ratio.tokens == pytest.approx(1e22)
    fixed = allocate(law, 1e22, params=1e9)
    assert fixed.params == 1e9 and 6 * fixed.params * fixed.tokens == pytest.approx(1e22)
    optimum = allocate(law, 1e22)
    assert optimum.loss < min(ratio.loss, fixed.loss)  # a constraint costs loss
    assert optimum.interval is None  # published coefficients: no covariance, no invented interval
    for bad in (dict(flops=0.0), dict(flops=float("nan")), dict(flops=1e22, tokens_per_param=-1.0),
                dict(flops=1e22, params=1e9, tokens_per_param=20.0), dict(flops=1e22, level=1.5)):
        with pytest.raises(ConfigError):
            allocate(law, **bad)


def test_law_from_a_fit_carries_its_delta_method_interval(tmp_path):
    """The natural-unit covariance gives the same interval as the fit's own parametrisation."""
    rows = np.loadtxt(write_runs_csv(tmp_path / "runs.csv", TRUE_LAW), delimiter=",", skiprows=1)
    form = FORMS["nd_sum"]
    fit = fit_form(form, design(form, {"params": rows[:, 0], "tokens": rows[:, 1]}), rows[:, 2])
    law = law_from_fit(fit, "test")
    at = np.array([[3e9, 6e10], [1e8, 1e9]])
    assert law.loss(at[:, 0], at[:, 1]) == pytest.approx(fit.predict(at)[:], rel=1e-9)
    half = t_quantile(0.9, fit.dof) * fit.log_sd(at)
    expected = np.exp(np.log(fit.predict(at))[:, None] + np.stack([-half, half], axis=1))
    np.testing.assert_allclose(law.interval(at[:, 0], at[:, 1], 0.9), expected, rtol=1e-6)
    # round trip through a law file keeps it
    path = tmp_path / "law.json"
    path.write_text(json.dumps({"law": law.to_dict()}))
    again = load_law_file(str(path))
    np.testing.assert_allclose(again.interval(at[:, 0], at[:, 1], 0.9), expected, rtol=1e-6)
    # a law the planner's Chinchilla form cannot hold is refused, not reduced to its terms
    smax = FORMS["nd_smax"]
    with pytest.raises(FitError, match="not a Chinchilla-form"):
        law_from_fit(fit_form(smax, design(smax, {"params": rows[:, 0], "tokens": rows[:, 1]}), rows[:, 2]), "test")


def test_law_files_of_predict_and_bad_law_files(tmp_path):
    predict_json = tmp_path / "prediction.json"
    predict_json.write_text(json.dumps({"two_var": {"fit": {"E": 1.8, "A": 480.0, "alpha": 0.35, "B": 2000.0,
                                                            "beta": 0.37}, "stderr": {}}}))
    law = load_law_file(str(predict_json))
    assert (law.E, law.beta, law.covariance) == (1.8, 0.37, None) and "covariance" in law.no_interval
    cases = {"not json {": "not valid JSON", '{"law": {"E": 1.8}}': "no 'A'",
             '{"E": 1, "A": 1, "alpha": -0.3, "B": 1, "beta": 0.3}': "alpha must be a positive",
             '{"E": 1, "A": 1, "alpha": 0.3, "B": 1, "beta": 0.3, "covariance": [[1, 2]], "dof": 3}': "5×5"}
    for text, message in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(FitError, match=message) as info:
            load_law_file(str(bad))
        assert str(bad) in str(info.value)


def test_shape_follows_the_width_rule_and_the_depth_rule():
    proxy = load_config(shipped_path("llama_proxy"), VOCAB)
    shape = shape_for_params(proxy, 1e9)
    assert shape.cfg.model.n_layers == proxy.model.n_layers and shape.cfg.head_dim == proxy.head_dim
    assert shape.cfg.model.n_heads // shape.cfg.kv_heads == proxy.model.n_heads // proxy.kv_heads
    assert param_counts(shape.cfg)["total"] == pytest.approx(1e9, rel=0.05)
    deep = shape_for_params(proxy, 1e9, depth=24)
    assert deep.cfg.model.n_layers == 24 and deep.cfg.model.hidden_size < shape.cfg.model.hidden_size
    wide = shape_for_params(proxy, 3e9, aspect=128)
    assert wide.cfg.model.hidden_size / wide.cfg.model.n_layers == pytest.approx(128, rel=0.25)
    assert param_counts(wide.cfg)["total"] == pytest.approx(3e9, rel=0.03)


def test_under_mup_the_learning_rate_does_not_depend_on_width():
    """Same tokens, two sizes: μP gives one η (the base-width model's), SP gives each size its own."""
    law, tokens = PUBLISHED["chinchilla-besiroglu"], 2e10
    lrs = {}
    for mup in (True, False):
        for n in (5e8, 2e9):
            report, cfg = plan(law, 6 * n * tokens, "llama_proxy", [*VOCAB, f"mup.enabled={mup}"], params=n,
                               hp_rule="steplaw")
            lrs[mup, n] = cfg.train.lr
            assert report["plan"]["tokens"] == pytest.approx(tokens)
    assert lrs[True, 5e8] == pytest.approx(lrs[True, 2e9])
    assert lrs[False, 5e8] > 1.5 * lrs[False, 2e9]


def test_a_sweep_wins_over_the_published_rule(tmp_path):
    (tmp_path / "best.yaml").write_text("train:\n  lr: 0.0123\nmup:\n  output_mult: 2.0\n")
    report, cfg = plan(PUBLISHED["chinchilla-besiroglu"], 1e20, "llama_proxy", VOCAB, sweep=str(tmp_path))
    assert cfg.train.lr == 0.0123 and cfg.mup.output_mult == 2.0
    assert report["hyper_parameters"]["lr_source"].startswith("sweep")
    assert report["hyper_parameters"]["rule_lr"] != 0.0123  # the rule is still reported beside it
    with pytest.raises(ConfigError, match="not found"):
        plan(PUBLISHED["chinchilla-besiroglu"], 1e20, "llama_proxy", VOCAB, sweep=str(tmp_path / "none"))


def test_tool_plans_a_fitted_law_and_writes_a_config_that_resolves(tmp_path, capsys):
    runs = write_runs_csv(tmp_path / "runs.csv", TRUE_LAW)
    out = tmp_path / "plan"
    code = plan_tool.main(["--flops", "1e21", "--points", runs, "--json", f"{out}.json", "--config-out",
                           f"{out}.yaml", "--plot", f"{out}.png", "--", *VOCAB])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "plan.json").read_text())
    assert "compute-optimal" in printed and "fitted here" in report["law"]["source"]
    optimum = report["optimum"]
    assert optimum["params"] == pytest.approx(closed_form_params(TRUE_LAW, 1e21), rel=0.25)
    lo, hi = optimum["interval"]
    assert lo < float(TRUE_LAW.loss(optimum["params"], optimum["tokens"])) < hi
    cfg = load_config(f"{out}.yaml")
    resolve(cfg, check_files=False)
    assert param_counts(cfg)["total"] == pytest.approx(optimum["params"], rel=0.1)
    tokens = cfg.train.max_steps * cfg.train.global_batch_size * cfg.model.seq_len
    assert optimum["tokens"] <= tokens < optimum["tokens"] + cfg.train.global_batch_size * cfg.model.seq_len
    assert cfg.train.lr == pytest.approx(report["hyper_parameters"]["rule_lr"])
    header = [line for line in (tmp_path / "plan.yaml").read_text().splitlines() if line.startswith("#")]
    assert any("train.lr: deepseek rule" in line for line in header)
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    assert load_law_file(f"{out}.json").covariance is not None  # the report's law is a law file


@pytest.mark.parametrize("argv, message", [
    ([], "give the compute budget: --flops"),
    (["--flops=-1e20"], "FLOP budget must be a positive"),
    (["--flops", "1e20", "--params", "1e9", "--tokens-per-param", "20"], "not allowed with argument"),
    (["--flops", "1e20", "--config", "llama_proxy", "data.tokenizer_model=/nonexistent"],
     "add model.vocab_size=V"),
    (["--flops", "1e20", "--huber", "1e-3"], "--huber applies to a fit"),
    (["--flops", "1e10"], "the smallest model of this proxy's shape has"),
    (["--flops", "1e21", "--params", "1e15"], "one step of"),
])
def test_tool_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert plan_tool.main([*argv, *([] if "vocab" in message else VOCAB)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_tool_refuses_a_law_file_that_does_not_parse(tmp_path, capsys):
    bad = tmp_path / "law.json"
    bad.write_text("{\"law\": ")
    assert plan_tool.main(["--flops", "1e20", "--law-file", str(bad), *VOCAB]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: not valid JSON") and err.count("\n") == 1
