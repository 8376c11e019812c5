"""benchmarks/bench_prediction.py's own logic: the demo recipe's budget, the cross-validated forecast's row,
the CPU-time count and the --ladders check (training is covered by `make bench`'s smoke entry)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # the benchmark imports its siblings by name

import bench_prediction as bench  # noqa: E402

from megamu.config import load_config  # noqa: E402
from megamu.demo import DEMO_OVERRIDES, MUP_PROXY  # noqa: E402
from megamu.shipped import resolve_config  # noqa: E402


def test_demo_recipe_trains_as_the_demo_and_ignores_steps_and_batch():
    ours = load_config(bench.PROXY_CONFIG, bench.budget_overrides(True, steps=7, batch=3)).to_dict()
    assert ours == load_config(resolve_config(MUP_PROXY), DEMO_OVERRIDES).to_dict()
    assert ours["train"]["max_steps"] != 7 and ours["train"]["micro_batch_size"] != 3


def test_plain_budget_is_steps_times_batch():
    cfg = load_config(bench.PROXY_CONFIG, bench.budget_overrides(False, steps=7, batch=3))
    assert (cfg.train.max_steps, cfg.train.global_batch_size, cfg.train.micro_batch_size) == (7, 3, 3)


def _report(predicted: float, actuals: list[float], interval: list[float]) -> dict:
    holdout = [{"x": 2.5e6, "actual": a, "predicted": predicted, "interval": interval, "rel_error": predicted / a - 1}
               for a in actuals]
    fitted = {"x": 3e5, "actual": 4.3, "predicted": 4.3, "interval": None, "rel_error": 0.0}
    return {"selection": {"chosen": "a*x^b+c", "reason": "smallest cross-validated error",
                          "holdout": [fitted, *holdout]}}


def test_selection_row_scores_the_mean_of_the_held_out_seeds():
    row = bench.selection_row("μP", _report(4.141, [4.0, 4.2], [4.05, 4.2]))  # seeds' mean 4.1
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "μP" and cells[1].startswith("a*x^b+c")
    assert cells[2] == "4.1410 vs 4.1000" and cells[3] == "+1.00%"
    assert cells[4] == "[4.0500, 4.2000] yes"
    assert bench.selection_row("μP", _report(4.3, [4.0, 4.2], [4.25, 4.35])).endswith("[4.2500, 4.3500] no |")


def test_selection_row_says_why_there_is_no_forecast():
    row = bench.selection_row("SP", {"selection": {"error": "too few sizes"}})
    assert "no cross-validated forecast: too few sizes" in row
    assert "no cross-validated forecast: no fit" in bench.selection_row("SP", {"error": "loss does not fall"})


def test_cpu_minutes_counts_finished_child_processes():
    before = bench.cpu_minutes()
    subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 0.6\n"
                    "while time.process_time() < end: pass"], check=True)
    assert bench.cpu_minutes() - before >= 0.5 / 60


@pytest.mark.parametrize("value", ["xp", "mup,tp", ","])
def test_ladders_flag_rejects_unknown_names(value, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--ladders", value])
    assert exc.value.code == 2
    assert "--ladders takes mup, sp or mup,sp" in capsys.readouterr().err
