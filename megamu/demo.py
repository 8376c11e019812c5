"""`make demo`: megamu end to end on the built-in sample corpus (the Python standard library's source).

Stages (each prints what it did; re-running reuses finished stages and runs):
  1. train a SentencePiece tokenizer on the sample corpus,
  2. preprocess the corpus into Megatron-compatible .bin/.idx, print the summary and decoded samples,
  3. μScaling: sweep η on the μP proxy, train a width ladder with the transferred η once per seed (each
     run's directory has its metrics.jsonl and loss_curve.png), fit on all but the largest rung (the law
     chosen by cross-validation, with seed offsets), predict it and a model 8× larger, and say which goals
     the forecast meets (prediction.json, the predict JSON contract, beside prediction.png).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from megamu.cli import ArgumentParser, console_script
from megamu.data.preprocess import document_prefix, preprocess
from megamu.data.sources import iter_texts
from megamu.data.tokenizer import Tokenizer, train_tokenizer
from megamu.fileio import atomic_write
from megamu.scaling.ladder import TokenBudget, format_ladder, plan_ladder, predict_ladder
from megamu.scaling.launch import DEFAULT_TRAINER, MetricRule, run_all
from megamu.scaling.plot import plot_forecast, plot_prediction
from megamu.scaling.predict import format_report
from megamu.scaling.seeds import holdout_by_size
from megamu.scaling.sweep import SweepPlan, format_best, format_table, overlay_overrides, run_sweep
from megamu.shipped import resolve_config


@dataclass
class SampleData:
    tokenizer_model: str
    data_prefix: str


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 72 - len(text)), flush=True)


DEMO_VOCAB = 1024  # at 4096, embeddings would be most of a narrow rung's params (w16: 131k of 139k)


def prepare_sample_data(data_dir: str = "data", documents: int = 600, vocab_size: int = DEMO_VOCAB,
                        tokenizer_sentences: int = 20_000, workers: int = 2) -> SampleData:
    """Tokenizer + .bin/.idx for the first `documents` files of the sample corpus (reused if present with
    this vocabulary size, else rebuilt).

    The defaults write data/tokenizer.model and data/sample_text_document.{bin,idx}, the paths that
    configs/tiny.yaml names; delete the folder to rebuild with other settings.
    """
    os.makedirs(data_dir, exist_ok=True)
    spec = f"sample:{documents}"
    model_prefix = os.path.join(data_dir, "tokenizer")
    tokenizer_model = model_prefix + ".model"
    output_prefix = os.path.join(data_dir, "sample")
    data_prefix = document_prefix(output_prefix, "text")
    if os.path.isfile(tokenizer_model) and (found := Tokenizer(tokenizer_model).vocab_size) != vocab_size:
        # An earlier build with another vocabulary (the demo's budget is tuned for its own): rebuild both.
        print(f"{tokenizer_model} has vocab {found}, not {vocab_size}: rebuilding it and {data_prefix}")
        os.remove(tokenizer_model)
        if os.path.isfile(data_prefix + ".idx"):
            os.remove(data_prefix + ".idx")
    if not os.path.isfile(tokenizer_model):
        banner(f"1. tokenizer: SentencePiece BPE, vocab {vocab_size}, on {spec}")
        train_tokenizer(iter_texts([spec]), model_prefix, vocab_size, max_sentences=tokenizer_sentences)
        print(f"wrote {tokenizer_model}")
    if not os.path.isfile(data_prefix + ".idx"):
        banner(f"2. preprocess {spec} into {data_prefix}.{{bin,idx}}")
        for summary in preprocess([spec], output_prefix, tokenizer_model, workers=workers, append_eod=True).values():
            print(summary.format())
    return SampleData(tokenizer_model=tokenizer_model, data_prefix=data_prefix)


def show_samples(data: SampleData, count: int = 2, chars: int = 240) -> None:
    """Decode the first tokens of a few documents straight from the memmapped .bin."""
    from megamu.data.indexed import IndexedDataset

    tokenizer = Tokenizer(data.tokenizer_model)
    dataset = IndexedDataset(data.data_prefix)
    print(f"{len(dataset.doc_idx) - 1} documents, {int(dataset.sizes.sum()):,} tokens, "
          f"vocab {tokenizer.vocab_size}, dtype {dataset.dtype}")
    for i in range(min(count, len(dataset))):
        text = tokenizer.decode(dataset[i][:200].tolist())
        print(f"--- document {i} (first {min(chars, len(text))} characters of its first 200 tokens) ---")
        print(text[:chars])


# ---- μScaling stages: sweep the proxy, transfer to a width ladder, predict the largest -------
MUP_PROXY = "mup_proxy"  # the shipped config
# The demo's budget for every run (sweep and ladder), chosen by measurement (BENCHMARKS.md, "make demo").
# mup.zero_readout=false: with the readout at zero, these 2-layer proxies sat on the unigram plateau (~5.8) for
# tens of steps, a different number per seed, so final losses spread 4-7% between seeds and did not fall with
# width; a σ-initialised readout leaves it at once (val loss 4.3 instead of 5.0 at width 48).
# train.warmup_steps=50: with 20, a rung could spike at peak η (grad norm 6.5 at step 19 at width 32, seed 1) and
# end 7% above its other seed; with 50 the two seeds ended 0.4% apart.
# model.ffn_multiple_of=1: the MLP is 8/3 of every width, not rounded up to 64 (4× at width 32, 2.67× at 96,
# 2.86× at 112), so the rungs differ in width only.
# Batch 32 × 200 steps: a third more tokens than 16 × 300 for the same CPU (small widths are overhead-bound).
# The learning rate is annealed to 0 so the final weights do not carry the last batches' noise; 44 eval
# batches × 32 × 64 tokens cover 97% of the validation split. log.interval=1 keeps every step's loss.
DEMO_OVERRIDES = ["mup.zero_readout=false", "model.ffn_multiple_of=1", "train.max_steps=200",
                  "train.micro_batch_size=32", "train.global_batch_size=32", "train.warmup_steps=50",
                  "train.min_lr_ratio=0.0", "train.eval_iters=44", "log.interval=1"]
DEMO_LRS = [2.0 ** e for e in (-9, -8, -7, -6)]  # centred on the optimum at this budget
DEMO_WIDTHS = [16, 32, 48, 64, 80, 96, 112, 128]  # the last is held out
# One ladder per seed, fitted with seed offsets. The sweep runs at the config's seed (1234), not these: the
# proxy-width rung is then a fresh run, not the sweep's winner, whose luck selected the learning rate.
DEMO_SEEDS = [1, 2]
# Every run sees the same held-out batches: the final validation loss compares them fairly.
DEMO_RULE = MetricRule(metric="val")
TARGET_MULT = 8.0  # the target: this many times the params of the largest rung
# What a trustworthy demo forecast means (issue 12): held-out error, held-out and target interval half-widths.
GOALS = {"held_out_error": 0.02, "held_out_half_width": 0.05, "target_half_width": 0.10}


def sweep_proxy(data: SampleData, out_dir: str, parallel: int, config: str = MUP_PROXY,
                trainer: Sequence[str] = DEFAULT_TRAINER) -> dict:
    """A learning-rate sweep at the proxy width; returns the sweep summary (best point in best.yaml)."""
    banner(f"μScaling 1/3: sweep η over {len(DEMO_LRS)} values at the proxy width (config {config})")
    plan = SweepPlan(resolve_config(config), [*_data_overrides(data), *DEMO_OVERRIDES],
                     [{"train.lr": lr} for lr in DEMO_LRS], [None], os.path.join(out_dir, "sweep"))
    results, summary = run_sweep(plan, DEMO_RULE, parallel, trainer)
    print(format_table(results, DEMO_RULE))
    print(format_best(summary))
    if summary["best"] is None:
        raise SystemExit("no sweep run finished: see the train.log files in " + plan.out_dir)
    return summary


def run_ladder(data: SampleData, out_dir: str, best_yaml: str, parallel: int, config: str = MUP_PROXY,
               trainer: Sequence[str] = DEFAULT_TRAINER) -> list:
    """The proxy's best hyper-parameters, unchanged, at every width of DEMO_WIDTHS (and seed of DEMO_SEEDS)."""
    banner(f"μScaling 2/3: width ladder {DEMO_WIDTHS} with the transferred hyper-parameters ({best_yaml})")
    overrides = [*_data_overrides(data), *DEMO_OVERRIDES, *overlay_overrides(best_yaml)]
    specs = plan_ladder(resolve_config(config), overrides, DEMO_WIDTHS, TokenBudget(), os.path.join(out_dir, "ladder"),
                        DEMO_SEEDS)
    results = run_all(specs, DEMO_RULE, parallel, trainer)
    print(format_ladder(results, DEMO_RULE))
    print("loss curves: " + ", ".join(os.path.join(spec.run_dir, "loss_curve.png") for spec in specs))
    return results


def predict_largest(results: list, out_dir: str, target_mult: float = TARGET_MULT) -> dict:
    """Fit all but the largest rung, predict it and a model `target_mult`× its params; write the report as
    prediction.json (the predict JSON contract) beside prediction.png, and say how it meets GOALS."""
    banner(f"μScaling 3/3: fit on all but the largest rung, predict it and {target_mult:g}× it")
    largest = max(r.labels["params"] for r in results)
    report, fit, dropped = predict_ladder(results, holdout=1, target=target_mult * largest, metric=DEMO_RULE.metric,
                                        smooth=DEMO_RULE.smooth, seed_offsets=len(DEMO_SEEDS) > 1)
    for note in dropped:
        print(f"left out of the fit: {note}")
    print(format_report(report))
    json_path, plot_path = os.path.join(out_dir, "prediction.json"), os.path.join(out_dir, "prediction.png")
    with atomic_write(json_path) as handle:
        json.dump(report, handle, indent=2)
    if "error" in report["selection"]:  # no cross-validated forecast: the classic fit is all there is
        plot_prediction(report, fit, plot_path)
    else:
        plot_forecast(report, plot_path)
    print("\n" + "\n".join(forecast_summary(report)))
    print(f"report: {json_path}\nplot: {plot_path}")
    return report


def forecast_summary(report: dict) -> list[str]:
    """The demo's verdict: the cross-validated forecast of the held-out rung and the target against GOALS."""
    selection = report["selection"]
    if "error" in selection:
        return [f"no cross-validated forecast ({selection['error']}): goals not met"]
    pct = f"{report['level'] * 100:g}%"
    lines = [f"Forecast ({selection['chosen']}, chosen by cross-validation; {pct} intervals):"]
    for h in holdout_by_size(selection["holdout"]):  # a rung trained once per seed is scored by their mean
        half = _half_width(h["interval"], h["predicted"])
        runs = f", mean of {h['runs']} seeds" if h["runs"] > 1 else ""
        lines.append(f"  held-out rung ({h['x']:,.0f} params{runs}): predicted {h['predicted']:.4f}, "
                     f"actual {h['actual']:.4f} ({h['rel_error'] * 100:+.2f}%; goal within {GOALS['held_out_error'] * 100:g}%: "
                     f"{_met(abs(h['rel_error']) <= GOALS['held_out_error'])}), interval {_format_half(half)} "
                     f"(goal ≤ ±{GOALS['held_out_half_width'] * 100:g}%: {_met(half <= GOALS['held_out_half_width'])})")
    target = selection["prediction"]
    if target:
        half = _half_width(target["interval"], target["predicted"])
        lines.append(f"  target ({target['x']:,.0f} params): {target['predicted']:.4f}, interval {_format_half(half)} "
                     f"(goal ≤ ±{GOALS['target_half_width'] * 100:g}%: {_met(half <= GOALS['target_half_width'])})")
    return lines


def _half_width(interval: Optional[list], centre: float) -> float:
    return math.inf if not interval else (interval[1] - interval[0]) / 2 / centre


def _format_half(half: float) -> str:
    return "none" if math.isinf(half) else f"±{half * 100:.2f}%"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _data_overrides(data: SampleData) -> list[str]:
    return [f"data.path={data.data_prefix}", f"data.tokenizer_model={data.tokenizer_model}"]


def muscaling(data: SampleData, out_dir: str, parallel: int = 2, config: str = MUP_PROXY,
              trainer: Sequence[str] = DEFAULT_TRAINER) -> dict:
    """Sweep at the proxy width → ladder with the transferred η → fit and predict (resumable). `config` and
    `trainer` are the shipped proxy and megamu.train; tests pass their own."""
    sweep_proxy(data, out_dir, parallel, config, trainer)
    results = run_ladder(data, out_dir, os.path.join(out_dir, "sweep", "best.yaml"), parallel, config, trainer)
    return predict_largest(results, out_dir)


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="demo directory (runs, plots)")
    parser.add_argument("--data-dir", default="data", help="tokenizer and preprocessed sample corpus")
    parser.add_argument("--documents", type=int, default=600, help="sample-corpus files to use")
    parser.add_argument("--parallel", type=int, default=2, help="training runs at a time in the μScaling stages")
    args = parser.parse_args(argv)
    data = prepare_sample_data(args.data_dir, documents=args.documents)
    banner("decoded samples from the memmapped dataset")
    show_samples(data)
    muscaling(data, os.path.join(args.out, "muscaling"), args.parallel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
