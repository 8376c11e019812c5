"""Width ladder: widths -> configs (fixed head dim, base width kept), token budget rules, target
parameter counts -> widths, bad input, and running + predicting a ladder with the fake trainer."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import yaml

from megamu.cli import scale as scale_tool
from megamu.config import ConfigError, load_config
from megamu.model import build_model, mup, param_counts
from megamu.scaling.fit import FitError
from megamu.scaling.ladder import (
    TokenBudget,
    params_at,
    plan_ladder,
    predict_ladder,
    width_for_params,
    width_overrides,
)
from megamu.scaling.launch import MetricRule, adopt_finished_run, run_all

TESTS = os.path.dirname(os.path.abspath(__file__))
FAKE = [sys.executable, os.path.join(TESTS, "fake_trainer.py")]


@pytest.fixture
def base_config(tmp_path) -> str:
    """Proxy: width 64, 4 heads of 16, 2 kv heads, base width 64; data files exist (empty)."""
    prefix = tmp_path / "fake_text_document"
    for ext in (".bin", ".idx"):
        (tmp_path / f"fake_text_document{ext}").write_bytes(b"")
    cfg = {"model": {"hidden_size": 64, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "seq_len": 32,
                     "vocab_size": 512},
           "mup": {"base_hidden_size": 64},
           "data": {"path": str(prefix)},
           "train": {"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 10, "warmup_steps": 2}}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_width_overrides_keep_head_dim_and_group_ratio(base_config):
    cfg = load_config(base_config)
    assert width_overrides(cfg, 256) == ["model.hidden_size=256", "model.n_heads=16", "mup.attn_mult=4.0",
                                         "model.n_kv_heads=8"]
    with pytest.raises(ConfigError, match="width 72 is not a positive multiple of the head dimension 16"):
        width_overrides(cfg, 72)
    with pytest.raises(ConfigError, match="grouped-query group size 2"):
        width_overrides(cfg, 48)  # 3 heads cannot share kv heads in pairs


@pytest.mark.parametrize("width", [64, 128, 512])
def test_every_rung_keeps_the_proxy_attention_scale(base_config, width):
    """With a fixed head dim, μP's attention scale α_attn/d_head must not change with width."""
    proxy = load_config(base_config)
    rung = load_config(base_config, width_overrides(proxy, width))
    assert rung.head_dim == proxy.head_dim
    assert mup.attention_scale(rung) == pytest.approx(mup.attention_scale(proxy), rel=1e-12)
    assert mup.attention_scale(proxy) == pytest.approx(proxy.head_dim ** -0.5)  # μP = SP at the proxy


def test_planned_rungs_keep_the_proxy_attention_scale(base_config, tmp_path):
    """The overrides each rung is launched with (not just width_overrides) must carry the proxy's α_attn."""
    proxy = load_config(base_config)
    for spec in plan_ladder(base_config, [], [64, 128, 256], TokenBudget(steps=10), str(tmp_path)):
        rung = load_config(spec.config, spec.overrides)
        assert rung.model.hidden_size == spec.labels["width"]
        assert mup.attention_scale(rung) == pytest.approx(mup.attention_scale(proxy), rel=1e-12)


def test_explicit_ffn_width_scales(base_config):
    cfg = load_config(base_config, ["model.ffn_hidden_size=192"])
    assert "model.ffn_hidden_size=384" in width_overrides(cfg, 128)


def test_plan_fixed_steps(base_config, tmp_path):
    specs = plan_ladder(base_config, ["train.lr=0.01"], [128, 64, 256], TokenBudget(steps=7), str(tmp_path / "l"))
    assert [s.name for s in specs] == ["w64", "w128", "w256"]
    assert [s.max_steps for s in specs] == [7, 7, 7]
    cfgs = [load_config(base_config, s.overrides) for s in specs]
    assert [c.model.hidden_size for c in cfgs] == [64, 128, 256]
    assert [c.head_dim for c in cfgs] == [16, 16, 16]
    assert all(c.mup.base_hidden_size == 64 and c.train.lr == 0.01 for c in cfgs)  # HPs transfer unchanged
    assert [s.labels["tokens"] for s in specs] == [7 * 4 * 32] * 3


def test_plan_tokens_proportional_to_params(base_config, tmp_path):
    specs = plan_ladder(base_config, [], [64, 128, 256], TokenBudget(tokens_per_param=0.5), str(tmp_path))
    for spec in specs:
        cfg = load_config(base_config, spec.overrides)
        params = param_counts(cfg)["total"]
        assert spec.labels["params"] == params
        assert spec.max_steps == -(-params // 2 // (4 * 32)) or spec.max_steps == int(-(-0.5 * params // 128))
        assert spec.max_steps * 128 >= 0.5 * params > (spec.max_steps - 1) * 128
    assert specs[0].max_steps < specs[1].max_steps < specs[2].max_steps


ENCODERS = [["model.arch=bert", "data.mask_token_id=3"], ["model.arch=t5", "model.vocab_size=612"]]


@pytest.mark.parametrize("arch", ENCODERS, ids=["bert", "t5"])
def test_an_encoder_ladder_is_planned_with_its_own_parameter_counts(base_config, tmp_path, arch):
    specs = plan_ladder(base_config, arch, [64, 128], TokenBudget(tokens_per_param=0.5), str(tmp_path / "l"))
    for spec in specs:
        rung = load_config(spec.config, spec.overrides)
        assert rung.model.arch == arch[0].split("=")[1] and rung.model.hidden_size == spec.labels["width"]
        model_params = sum(p.numel() for p in build_model(rung).parameters())
        assert spec.labels["params"] == param_counts(rung)["total"] == model_params


def test_budget_and_plan_errors(base_config, tmp_path):
    with pytest.raises(ConfigError, match="either a fixed number of steps or a tokens-per-param ratio"):
        TokenBudget(steps=5, tokens_per_param=20)
    # A budget shorter than the warm-up is no error: the trainer warms up over the whole run.
    assert plan_ladder(base_config, [], [64], TokenBudget(steps=1), str(tmp_path))[0].max_steps == 1
    with pytest.raises(ConfigError, match="widths repeat"):
        plan_ladder(base_config, [], [64, 64], TokenBudget(), str(tmp_path))
    with pytest.raises(ConfigError, match="fake_text_document.bin not found"):
        plan_ladder(base_config, ["data.path=" + str(tmp_path / "missing" / "fake_text_document")], [64],
                    TokenBudget(), str(tmp_path))


def test_width_for_params_picks_the_nearest_multiple_of_head_dim(base_config):
    for width in (64, 160, 320):
        assert width_for_params(base_config, [], params_at(base_config, [], width)) == width
    between = (params_at(base_config, [], 96) * params_at(base_config, [], 128)) ** 0.5 * 0.97
    assert width_for_params(base_config, [], between) == 96


def test_run_and_predict_a_ladder(base_config, tmp_path):
    """The fake's loss is 2 + 40·params^-0.3 + const: the held-out largest rung is predicted closely."""
    specs = plan_ladder(base_config, [], [32, 64, 96, 128, 192, 256, 512], TokenBudget(steps=10), str(tmp_path))
    results = run_all(specs, MetricRule(smooth=1), parallel=2, trainer=FAKE, echo=False)
    assert all(r.status == "done" for r in results)
    report, _, dropped = predict_ladder(results, holdout=1, target=4e7, smooth=1, min_step=0)
    assert dropped == []
    (held,) = report["holdout"]
    assert held["x"] == results[-1].params and abs(held["rel_error"]) < 1e-3
    assert report["fit"]["b"] == pytest.approx(-0.3, abs=0.02)


def test_seeded_ladder_runs_every_width_per_seed_and_holds_out_whole_widths(base_config, tmp_path):
    specs = plan_ladder(base_config, [], [32, 64, 128, 256], TokenBudget(steps=10), str(tmp_path), seeds=[1, 2, 3])
    assert [s.name for s in specs[:3]] == ["w32_s1", "w32_s2", "w32_s3"] and len(specs) == 12
    assert all(s.overrides[-1] == f"train.seed={s.labels['seed']}" for s in specs)
    results = run_all(specs, MetricRule(smooth=1), parallel=2, trainer=FAKE, echo=False)
    report, _, _ = predict_ladder(results, holdout=1, smooth=1, min_step=0, seed_offsets=True)
    held = report["holdout"]
    assert len(held) == 3 and {h["x"] for h in held} == {results[-1].params}  # all three seeds of width 256
    # The fake's seed offsets (0, +0.001, -0.001 for seeds 1, 2, 3) are recovered and predicted per seed.
    assert report["seed_offsets"] == pytest.approx({"1": 0.0, "2": 0.001, "3": -0.001}, abs=1e-6)
    assert all(abs(h["rel_error"]) < 1e-4 for h in held)
    (mean,) = report["holdout_mean"]
    assert mean["runs"] == 3 and abs(mean["rel_error"]) < 1e-4
    with pytest.raises(ConfigError, match="seeds repeat"):
        plan_ladder(base_config, [], [32], TokenBudget(steps=10), str(tmp_path), seeds=[1, 1])


def test_an_adopted_run_is_reused_not_retrained(base_config, tmp_path, monkeypatch):
    """A finished run with an identical resolved config (here: the default seed spelled out) is adopted."""
    (first,) = plan_ladder(base_config, [], [64], TokenBudget(steps=10), str(tmp_path / "a"))
    (done,) = run_all([first], MetricRule(smooth=1), trainer=FAKE, echo=False)
    (seeded,) = plan_ladder(base_config, ["train.seed=1234"], [64], TokenBudget(steps=10), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="launched with other settings"):  # a plain copy is refused
        shutil.copytree(first.run_dir, seeded.run_dir)
        run_all([seeded], MetricRule(smooth=1), trainer=FAKE, echo=False)
    shutil.rmtree(seeded.run_dir)
    adopt_finished_run(first.run_dir, seeded)
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_TRAINER_CALLS", str(calls))
    (again,) = run_all([seeded], MetricRule(smooth=1), trainer=FAKE, echo=False)
    assert again.status == "done" and again.value == done.value and not calls.exists()


def test_failed_rungs_are_reported_not_fitted(base_config, tmp_path):
    specs = plan_ladder(base_config, ["train.lr=0.25"], [64, 128], TokenBudget(steps=5), str(tmp_path))
    results = run_all(specs, MetricRule(), trainer=FAKE, echo=False)
    with pytest.raises(FitError, match="no rung of the ladder finished.*w64: failed"):
        predict_ladder(results)


def test_scale_tool_with_overlay_and_prediction(base_config, tmp_path, capsys):
    overlay = tmp_path / "best.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"lr": 0.003}}))
    out = str(tmp_path / "ladder")
    code = scale_tool.main(["--config", base_config, "--overlay", str(overlay), "--widths", "32,64,96,128,256",
                            "--steps", "6", "--out", out, "--trainer", " ".join(FAKE), "--parallel", "2",
                            "--predict", "--smooth", "1", "--min-step", "0", "--target-mult", "8"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Holdout" in printed and "Prediction at params" in printed
    report = json.load(open(os.path.join(out, "prediction.json")))
    assert report["prediction"]["x"] == pytest.approx(8 * params_at(base_config, [], 256))
    assert os.path.isfile(os.path.join(out, "prediction.png"))
    with open(os.path.join(out, "w128", "train.log")) as log:
        assert "train.lr=0.003" in log.readline()  # the overlay reached every rung
    code = scale_tool.main(["--config", base_config, "--overlay", str(tmp_path / "nope.yaml"), "--widths", "64",
                            "--out", out])
    assert code == 2 and "config file not found" in capsys.readouterr().err
