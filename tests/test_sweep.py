"""Hyper-parameter sweep: statuses (done / diverged / failed), best point by either metric, the
best.yaml overlay, resume without relaunching finished runs, random search, bad input, the
tool, and one real 2-point sweep with megamu.train."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import yaml

from megamu.cli import sweep as sweep_tool
from megamu.config import ConfigError, load_config
from megamu.scaling.launch import MetricRule, RunSpec, classify
from megamu.scaling.sweep import (
    SweepPlan,
    check_axes,
    grid_points,
    overlay_overrides,
    parse_axis,
    random_points,
    run_name,
    run_sweep,
)

TESTS = os.path.dirname(os.path.abspath(__file__))
FAKE = [sys.executable, os.path.join(TESTS, "fake_trainer.py")]


@pytest.fixture
def base_config(tmp_path) -> str:
    """A config the fake trainer can 'train': data files exist (empty), vocab given."""
    prefix = tmp_path / "data" / "fake_text_document"
    prefix.parent.mkdir()
    for ext in (".bin", ".idx"):
        (tmp_path / "data" / f"fake_text_document{ext}").write_bytes(b"")
    cfg = {"model": {"hidden_size": 64, "n_heads": 4, "vocab_size": 512},
           "mup": {"base_hidden_size": 64},
           "data": {"path": str(prefix)},
           "train": {"max_steps": 10, "warmup_steps": 1}}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def calls(tmp_path, monkeypatch) -> str:
    path = str(tmp_path / "calls.txt")
    monkeypatch.setenv("FAKE_TRAINER_CALLS", path)
    return path


def launched(calls_file: str) -> list[str]:
    if not os.path.exists(calls_file):
        return []
    with open(calls_file) as f:
        return [os.path.basename(line.strip()) for line in f]


def sweep(base_config: str, out: str, grid: list[str], widths=(None,), metric: str = "train", **kw):
    points = grid_points([parse_axis(s, allow_range=False) for s in grid])
    plan = SweepPlan(base_config, ["train.max_steps=10"], points, list(widths), out)
    return run_sweep(plan, MetricRule(metric, smooth=3), parallel=kw.get("parallel", 2), trainer=FAKE, echo=False)


def test_statuses_best_point_and_overlay(base_config, tmp_path, calls):
    out = str(tmp_path / "sweep")
    results, summary = sweep(base_config, out, ["train.lr=1e-3,3e-3,1e-2,0.25,0.5,1"])
    status = {r.labels["hps"]["train.lr"]: r for r in results}
    assert [status[lr].status for lr in (1e-3, 3e-3, 1e-2)] == ["done"] * 3
    assert status[0.25].status == "failed" and "boom" in status[0.25].log_tail
    assert status[0.5].status == "diverged" and "threshold" in status[0.5].reason  # finite loss above ln(vocab)
    assert status[1].status == "diverged" and "non-finite" in status[1].reason  # exit 3 / NaN
    # The fake's optimum is lr = 10^-2.5: 3e-3 is the closest grid point.
    assert summary["best"]["hps"] == {"train.lr": 3e-3}
    expected = 2 + 40 * (24 * 64 ** 2 + 1024 * 64) ** -0.3 + (math.log10(3e-3) + 2.5) ** 2 + 0.05
    assert summary["best"]["value"] == pytest.approx(expected + (1 / 8 + 1 / 9 + 1 / 10) / 3)
    with open(os.path.join(out, "sweep.json")) as f:
        on_disk = json.load(f)
    assert len(on_disk["runs"]) == 6 and on_disk["best"]["name"] == "lr-0.003"
    # The overlay loads as a config and as overrides.
    assert load_config(os.path.join(out, "best.yaml")).train.lr == pytest.approx(3e-3)
    assert overlay_overrides(os.path.join(out, "best.yaml")) == ["train.lr=0.003"]
    assert os.path.isfile(os.path.join(out, "sweep.png"))


def test_resume_relaunches_only_unfinished_runs(base_config, tmp_path, calls):
    out = str(tmp_path / "sweep")
    sweep(base_config, out, ["train.lr=1e-3,3e-3,0.25,1"])
    assert sorted(launched(calls)) == sorted(["lr-0.001", "lr-0.003", "lr-0.25", "lr-1"])
    # Make lr=1e-3 half-finished: its process was killed before the last step and the status file.
    run = os.path.join(out, "lr-0.001")
    os.remove(os.path.join(run, "run_status.json"))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        lines = f.readlines()[:4]
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(lines)
    open(calls, "w").close()
    results, summary = sweep(base_config, out, ["train.lr=1e-3,3e-3,0.25,1"])
    # Finished (3e-3) and diverged (1) runs are kept; the failed and the half-finished ones run again.
    assert sorted(launched(calls)) == ["lr-0.001", "lr-0.25"]
    assert {r.name: r.status for r in results} == {"lr-0.001": "done", "lr-0.003": "done", "lr-0.25": "failed",
                                                   "lr-1": "diverged"}


def test_resume_refuses_a_finished_run_launched_with_other_settings(base_config, tmp_path, calls):
    out = str(tmp_path / "sweep")
    sweep(base_config, out, ["train.lr=1e-3"])
    points = grid_points([parse_axis("train.lr=1e-3", allow_range=False)])
    changed = SweepPlan(base_config, ["train.max_steps=10", "mup.output_mult=4"], points, [None], out)
    with pytest.raises(ConfigError, match=r"lr-0.001 holds a finished run launched with other settings "
                                          r"\(differences: mup.output_mult=4\)"):
        run_sweep(changed, MetricRule("train", smooth=3), parallel=1, trainer=FAKE, echo=False)


def test_best_follows_the_metric_and_heatmap_for_two_axes(base_config, tmp_path, calls):
    grid = ["train.lr=3e-3,1e-2", "mup.output_mult=1,4"]
    _, by_train = sweep(base_config, str(tmp_path / "a"), grid, metric="train")
    _, by_val = sweep(base_config, str(tmp_path / "b"), grid, metric="val")
    assert by_train["best"]["hps"] == {"train.lr": 3e-3, "mup.output_mult": 1}
    assert by_val["best"]["hps"] == {"train.lr": 3e-3, "mup.output_mult": 4}
    assert os.path.isfile(tmp_path / "b" / "heatmap.png")


def test_widths_scale_heads_and_best_is_at_the_base_width(base_config, tmp_path, calls):
    results, summary = sweep(base_config, str(tmp_path / "w"), ["train.lr=3e-3,1e-2"], widths=(32, 64, 128))
    assert {r.name for r in results} >= {"w32__lr-0.003", "w128__lr-0.01"}
    spec_overrides = json.load(open(tmp_path / "w" / "sweep.json"))["runs"]
    assert len(spec_overrides) == 6
    assert summary["selection_width"] == 64 and summary["best"]["width"] == 64
    assert set(summary["best_per_width"]) == {"32", "64", "128"}
    # Wider is better in the fake at the same lr.
    assert summary["best_per_width"]["128"]["value"] < summary["best_per_width"]["32"]["value"]


def test_plan_scales_heads_with_width(base_config, tmp_path):
    plan = SweepPlan(base_config, [], [{"train.lr": 1e-3}], [128], str(tmp_path))
    (spec,) = plan.specs()
    assert "model.hidden_size=128" in spec.overrides and "model.n_heads=8" in spec.overrides
    assert load_config(base_config, spec.overrides).mup.base_hidden_size == 64


def test_random_search_is_log_uniform_seeded_and_typed():
    axes = [parse_axis("train.lr=1e-4:1e-1", allow_range=True), parse_axis("train.warmup_steps=2:50", True),
            parse_axis("mup.output_mult=1,2,4", True)]
    points = random_points(axes, 200, seed=3)
    assert points == random_points(axes, 200, seed=3) and points != random_points(axes, 200, seed=4)
    lrs = [p["train.lr"] for p in points]
    assert all(1e-4 <= lr <= 1e-1 for lr in lrs)
    # Log-uniform: about half the points below the geometric midpoint 10^-2.5, not ~3% as uniform would give.
    assert 0.35 < sum(lr < 10 ** -2.5 for lr in lrs) / len(lrs) < 0.65
    assert all(isinstance(p["train.warmup_steps"], int) for p in points)
    assert {p["mup.output_mult"] for p in points} == {1, 2, 4}


def test_run_names_are_unique_and_readable():
    assert run_name({"train.lr": 0.003, "mup.output_mult": 4}, 64) == "w64__lr-0.003__output_mult-4"
    assert run_name({"train.seed": 1, "data.seed": 2}, None) == "train_seed-1__data_seed-2"


@pytest.mark.parametrize("spec, allow_range, message", [
    ("train.lr", False, "must look like section.key=v1,v2"),
    ("model.hidden_size=64,128", False, "--widths"),
    ("train.lr=1e-4:1e-2", False, "needs --random"),
    ("train.lr=1e-2:1e-4", True, "0 < LOW < HIGH"),
    ("train.lr=1e-3,1e-3", False, "repeats a value"),
    ("log.wandb_project=[oops", False, "a value is neither a number nor a YAML scalar"),
])
def test_bad_axis_messages(spec, allow_range, message):
    with pytest.raises(ConfigError, match=message):
        parse_axis(spec, allow_range)


def test_unknown_key_and_bad_value_are_named(base_config):
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        check_axes([parse_axis("train.lrr=1,2", False)], base_config, [])
    with pytest.raises(ConfigError, match="train.warmup_steps: expected an integer"):
        check_axes([parse_axis("train.warmup_steps=1,x", False)], base_config, [])


def test_missing_run_is_failed_not_crashed(tmp_path):
    spec = RunSpec("r", str(tmp_path / "never"), None, [], max_steps=5, labels={})
    result = classify(spec, 1, MetricRule())
    assert result.status == "failed" and "does not exist: check the path (or the run never started)" in result.reason


def test_tool_prints_table_and_rejects_bad_input(base_config, tmp_path, calls, capsys):
    out = str(tmp_path / "tool")
    code = sweep_tool.main(["--config", base_config, "--out", out, "--trainer", " ".join(FAKE),
                            "--grid", "train.lr=1e-3,3e-3", "--parallel", "2", "--", "train.max_steps=6"])
    printed = capsys.readouterr().out
    assert code == 0 and "best at width 64: train.lr=0.003" in printed
    assert load_config(os.path.join(out, "best.yaml")).train.lr == pytest.approx(3e-3)
    code = sweep_tool.main(["--config", base_config, "--out", out, "--grid", "train.lr=1e-3", "--widths", "100"])
    assert code == 2 and "width 100 is not a positive multiple of the head dimension 16" in capsys.readouterr().err


def test_real_two_point_sweep(tmp_path, tiny_tokenizer, tiny_dataset_prefix):
    """megamu.train itself: two learning rates, a few steps each, both finish with finite losses."""
    cfg = {"model": {"hidden_size": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32},
           "mup": {"base_hidden_size": 32},
           "data": {"path": tiny_dataset_prefix, "tokenizer_model": tiny_tokenizer.model_path, "split": "90,10,0"},
           "train": {"micro_batch_size": 4, "global_batch_size": 4, "max_steps": 4, "warmup_steps": 1,
                     "eval_iters": 1},
           "log": {"interval": 1, "progress_bar": False}}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    plan = SweepPlan(str(config), [], grid_points([parse_axis("train.lr=1e-3,1e-2", False)]), [None],
                     str(tmp_path / "sweep"))
    results, summary = run_sweep(plan, MetricRule("val"), parallel=2, echo=False)
    assert [r.status for r in results] == ["done", "done"], [r.log_tail for r in results]
    assert all(math.isfinite(r.value) and r.value < math.log(512) for r in results)
    assert summary["best"]["value"] == min(r.value for r in results)
