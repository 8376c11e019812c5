"""`make demo`'s μScaling stages with the fake trainer (no training): sweep → ladder → forecast, and the
forecast's report files (prediction.json, the predict JSON contract, beside prediction.png) and verdict."""
from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

from megamu import demo

TESTS = os.path.dirname(os.path.abspath(__file__))
FAKE = [sys.executable, os.path.join(TESTS, "fake_trainer.py")]
CONTRACT_KEYS = {"form", "x", "fit", "stderr", "points", "holdout", "prediction"}


@pytest.fixture
def fake_setup(tmp_path) -> tuple:
    """A proxy config (head dim 16, base width 64) and empty data files: enough to plan runs for the fake trainer."""
    prefix = tmp_path / "fake_text_document"
    for name in ("fake_text_document.bin", "fake_text_document.idx", "tokenizer.model"):
        (tmp_path / name).write_bytes(b"")
    cfg = {"model": {"hidden_size": 64, "n_heads": 4, "n_layers": 2, "seq_len": 32, "vocab_size": 512},
           "mup": {"base_hidden_size": 64},
           "train": {"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 10, "warmup_steps": 2}}
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return str(config), demo.SampleData(str(tmp_path / "tokenizer.model"), str(prefix))


def test_muscaling_sweeps_transfers_and_writes_the_forecast(fake_setup, tmp_path, capsys):
    config, data = fake_setup
    out = str(tmp_path / "muscaling")
    report = demo.muscaling(data, out, parallel=2, config=config, trainer=FAKE)

    # The fake trainer's loss is lowest at η = 10^-2.5: of the demo's grid, 2^-8 is nearest in log.
    best = yaml.safe_load(open(os.path.join(out, "sweep", "best.yaml")))
    assert best["train"]["lr"] == 2.0 ** -8
    ladder = sorted(os.listdir(os.path.join(out, "ladder")))
    assert ladder == sorted(f"w{w}_s{s}" for w in demo.DEMO_WIDTHS for s in demo.DEMO_SEEDS)
    with open(os.path.join(ladder_dir := os.path.join(out, "ladder", ladder[0]), "config.yaml")) as handle:
        assert yaml.safe_load(handle)["train"]["lr"] == 2.0 ** -8, ladder_dir  # η transferred unchanged

    with open(os.path.join(out, "prediction.json")) as handle:
        written = json.load(handle)
    assert written == json.loads(json.dumps(report))
    assert CONTRACT_KEYS <= set(written)
    assert set(written["fit"]) == {"a", "b", "c"}
    largest = max(p["x"] for p in written["points"])
    # Every seed's run at the largest width is held out; every other run is fitted.
    assert [p["used"] for p in written["points"]] == [p["x"] != largest for p in written["points"]]
    assert len(written["points"]) == len(demo.DEMO_WIDTHS) * len(demo.DEMO_SEEDS)
    assert written["holdout"] and all(h["x"] == largest for h in written["holdout"])
    assert {"x", "actual", "predicted", "rel_error", "interval"} <= set(written["holdout"][0])
    # The target is TARGET_MULT× the largest rung's planned params (the fake trainer counts them a little differently).
    assert written["prediction"]["x"] / largest == pytest.approx(demo.TARGET_MULT, rel=0.1)
    selection = written["selection"]
    assert "error" not in selection and selection["prediction"]["x"] == written["prediction"]["x"]
    with open(os.path.join(out, "prediction.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    # The fake law is exact up to a seed offset, which the fit removes: the forecast meets every goal (two for
    # the held-out rung, scored by the mean of its seeds, one for the target).
    printed = capsys.readouterr().out
    assert "NOT met" not in printed and printed.count(": met") == 3
    assert f"mean of {len(demo.DEMO_SEEDS)} seeds" in printed
    assert os.path.join(out, "prediction.json") in printed


def _report(held_interval, target_interval) -> dict:
    return {"level": 0.9, "selection": {
        "chosen": "a*x^b+c",
        "holdout": [{"x": 1e6, "actual": 4.0, "predicted": 4.1, "rel_error": 0.025, "interval": held_interval}],
        "prediction": {"x": 8e6, "predicted": 3.5, "interval": target_interval}}}


def test_forecast_summary_says_which_goals_are_not_met():
    lines = demo.forecast_summary(_report([4.0, 4.2], [3.0, 4.0]))
    held, target = lines[1], lines[2]
    assert "+2.50%; goal within 2%: NOT met" in held and "interval ±2.44% (goal ≤ ±5%: met)" in held
    assert "interval ±14.29% (goal ≤ ±10%: NOT met)" in target
    assert "interval none" in demo.forecast_summary(_report(None, [3.4, 3.6]))[1]
    assert "goals not met" in demo.forecast_summary({"level": 0.9, "selection": {"error": "too few points"}})[0]


def test_forecast_summary_scores_a_rung_by_the_mean_of_its_seeds():
    report = _report([4.0, 4.2], [3.0, 4.0])
    seeds = [{**report["selection"]["holdout"][0], "actual": actual} for actual in (3.9, 4.3)]
    report["selection"]["holdout"] = seeds  # each seed's run 2.5% off, their mean (4.1) right on
    lines = demo.forecast_summary(report)
    assert len(lines) == 3
    assert "mean of 2 seeds): predicted 4.1000, actual 4.1000 (+0.00%; goal within 2%: met)" in lines[1]


def test_sample_data_is_rebuilt_when_its_vocabulary_differs(tmp_path):
    from megamu.data.preprocess import read_stats
    from megamu.data.tokenizer import Tokenizer

    built = {}
    for vocab in (400, 450):
        data = demo.prepare_sample_data(str(tmp_path), documents=2, vocab_size=vocab, tokenizer_sentences=1000,
                                        workers=1)
        built[vocab] = (Tokenizer(data.tokenizer_model).vocab_size, read_stats(data.data_prefix)["tokenizer_sha256"])
    assert built[400][0] == 400 and built[450][0] == 450
    assert built[400][1] != built[450][1]  # the corpus was re-tokenized with the new tokenizer
